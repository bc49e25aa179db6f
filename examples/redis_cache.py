"""A Redis cache of users kept in sync with the log, with exactly-once effects.

:class:`RedisProjection` adapts the projection runtime to Redis: the
checkpoint is a key in the same Redis database, and each batch is applied in
one ``MULTI``/``EXEC`` transaction that writes the cache *and* the checkpoint,
under ``WATCH`` of the checkpoint. Redis runs a transaction all or nothing,
so a crash of the runner cannot separate an effect from its checkpoint, and a
second runner that applied the same batch first makes ``EXEC`` fail here (the
batch is then retried against the new checkpoint and its events skipped).
For the effects to survive a crash of Redis itself, run it with
``appendonly yes`` and ``appendfsync always``; with weaker settings Redis may
lose its last writes, but always together with their checkpoint, and the
runner then simply applies those events again.

:class:`UserCache` keeps, under a key prefix (default ``users:``):

* ``users:user:<subject_id>``: a hash ``{email, name, version}``;
* ``users:email:<email>``: the subject id registered with that email;
* ``users:checkpoint``: the position of the last event applied.

Forgetting a subject deletes its hash and its email key.

    lethedb project examples.redis_cache:UserCache --db redis://127.0.0.1:6379/0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.client import Pipeline

from lethedb import RecordedEvent
from lethedb.projections import Projection, handles


class RedisProjection(Projection):
    """A projection whose state and checkpoint live in one Redis database.

    Handlers queue their writes on :attr:`pipe` (a ``MULTI`` pipeline); they
    may read through :attr:`redis`, whose view is the state before the batch,
    so a handler that reads what an earlier event of the same batch wrote
    must keep that in memory (see :class:`UserCache`). Keys start with
    ``prefix``; :meth:`reset` deletes every one of them.
    """

    prefix = "projection:"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str | None = None) -> None:
        self.url = url
        if prefix is not None:
            self.prefix = prefix
        self._redis: redis.Redis | None = None
        self._pipe: Pipeline | None = None

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            raise RuntimeError(f"{type(self).__name__} is not open")
        return self._redis

    @property
    def pipe(self) -> Pipeline:
        if self._pipe is None:
            raise RuntimeError("pipe is only available to handlers, inside apply()")
        return self._pipe

    @property
    def checkpoint_key(self) -> str:
        return self.prefix + "checkpoint"

    def open(self, *, rebuild: bool = False) -> None:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.url, decode_responses=True)
            self._redis.ping()
        if rebuild:
            self.reset()

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    def checkpoint(self) -> int:
        return int(self.redis.get(self.checkpoint_key) or 0)

    def apply(self, events: Sequence[RecordedEvent], position: int) -> int:
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self.checkpoint_key)  # type: ignore[no-untyped-call]
                    stored = int(pipe.get(self.checkpoint_key) or 0)
                    checkpoint = max(stored, position)
                    pending = [e for e in events if e.position > stored]
                    if checkpoint == stored and not pending:
                        pipe.unwatch()
                        return stored
                    pipe.multi()
                    self._pipe = pipe
                    self.begin()
                    for event in pending:
                        self.handle(event)
                    pipe.set(self.checkpoint_key, checkpoint)
                    pipe.execute()
                    return checkpoint
                except redis.WatchError:
                    continue  # another runner moved the checkpoint: skip what it applied
                finally:
                    self._pipe = None

    def begin(self) -> None:
        """Called at the start of each transaction, before the handlers (no-op by default)."""

    def reset(self) -> None:
        keys = list(self.redis.scan_iter(match=self._escaped_prefix() + "*", count=1000))
        for start in range(0, len(keys), 1000):
            self.redis.delete(*keys[start : start + 1000])

    def _escaped_prefix(self) -> str:
        return "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)


class UserCache(RedisProjection):
    """Users by subject id and by email, as the application's cache."""

    prefix = "users:"

    def begin(self) -> None:
        # Emails written earlier in this batch: reads through self.redis do not see them.
        self._emails: dict[str, str] = {}

    @handles("UserRegistered")
    def registered(self, event: RecordedEvent) -> None:
        data = event.json()
        self._set_email(event.subject_id, data.get("email", ""))
        self.pipe.hset(
            self._user(event.subject_id),
            mapping={"name": data.get("name", ""), "version": event.stream_version},
        )

    @handles("EmailChanged")
    def email_changed(self, event: RecordedEvent) -> None:
        self._set_email(event.subject_id, event.json()["email"])
        self.pipe.hset(self._user(event.subject_id), "version", event.stream_version)

    @handles("NameChanged")
    def name_changed(self, event: RecordedEvent) -> None:
        user = self._user(event.subject_id)
        self.pipe.hset(
            user, mapping={"name": event.json()["name"], "version": event.stream_version}
        )

    def forget(self, subject_id: str) -> None:
        email = self._email_of(subject_id)
        if email:
            self.pipe.delete(self.prefix + "email:" + email)
        self.pipe.delete(self._user(subject_id))
        self._emails[subject_id] = ""

    def _set_email(self, subject_id: str, email: str) -> None:
        old = self._email_of(subject_id)
        if old and old != email:
            self.pipe.delete(self.prefix + "email:" + old)
        self.pipe.hset(self._user(subject_id), "email", email)
        self.pipe.set(self.prefix + "email:" + email, subject_id)
        self._emails[subject_id] = email

    def _email_of(self, subject_id: str) -> str:
        if subject_id in self._emails:
            return self._emails[subject_id]
        value = self.redis.hget(self._user(subject_id), "email")
        return str(value) if value else ""

    def _user(self, subject_id: str) -> str:
        return self.prefix + "user:" + subject_id

    # -- queries -----------------------------------------------------------------------

    def get(self, subject_id: str) -> dict[str, Any] | None:
        user = self.redis.hgetall(self._user(subject_id))
        return {str(key): value for key, value in user.items()} if user else None

    def by_email(self, email: str) -> str | None:
        value = self.redis.get(self.prefix + "email:" + email)
        return str(value) if value is not None else None

    def snapshot(self) -> dict[str, Any]:
        """Every key of the cache with its value (the checkpoint included): for comparisons."""
        state: dict[str, Any] = {}
        for key in self.redis.scan_iter(match=self._escaped_prefix() + "*", count=1000):
            kind = self.redis.type(key)
            state[key] = self.redis.hgetall(key) if kind == "hash" else self.redis.get(key)
        return state
