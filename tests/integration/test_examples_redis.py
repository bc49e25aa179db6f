"""examples/redis_cache.py: a Redis cache kept in sync, against a real redis-server.

The tests start their own ``redis-server`` on a free loopback port (no
persistence). ``.ci/run`` installs it from the system package manager. When
it is missing these tests fail in CI (``CI`` set), so a broken install is
never mistaken for a pass, and are skipped on a developer machine without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from examples.redis_cache import UserCache
from lethedb import Event
from tests.integration.projecting import Running, Users, connect, head, run_until_caught_up
from tests.integration.serverproc import ServerProcess
from tests.ports import free_port


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (.ci/run installs it with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


def cache(url: str, prefix: str) -> UserCache:
    return UserCache(url, prefix=prefix)


def unprefixed(state: dict[str, object], prefix: str) -> dict[str, object]:
    return {key.removeprefix(prefix): value for key, value in state.items()}


def test_the_cache_follows_the_log_forgets_and_equals_a_rebuild(
    server: ServerProcess, redis_url: str, tmp_path: Path
):
    db = connect(server.address)
    users = Users(db, uuid.uuid4().hex[:8])
    live_prefix = f"live-{users.tag}:"
    live = Running(cache(redis_url, live_prefix), server.address, group_commit_interval=0.1)
    users.populate(20)
    forgotten = users.register(50, email=f"gone-{users.tag}@canary.test")
    users.change_email(50, f"gone-again-{users.tag}@canary.test")
    live.wait_position(head(db))
    view = cache(redis_url, live_prefix)
    view.open()
    assert view.get(forgotten) is not None
    assert view.by_email(f"gone-again-{users.tag}@canary.test") == forgotten
    assert view.by_email(f"gone-{users.tag}@canary.test") is None  # the old email's key moved

    db.forget_subject(forgotten, reason="test")
    users.populate(2)
    end = head(db)
    live.wait_position(end)
    live.stop()
    assert view.get(forgotten) is None
    assert view.by_email(f"gone-again-{users.tag}@canary.test") is None
    assert view.get(users.subject(3)) == {
        "email": f"changed3@{users.tag}.test",
        "name": "User Number3",
        "version": "1",
    }
    assert view.checkpoint() == end
    live_state = unprefixed(view.snapshot(), live_prefix)
    assert not any("canary" in key + str(value) for key, value in live_state.items())
    view.close()

    rebuilt_prefix = f"rebuilt-{users.tag}:"
    rebuilt = cache(redis_url, rebuilt_prefix)
    assert run_until_caught_up(rebuilt, server.address, rebuild=True) == end
    rebuilt.open()
    assert unprefixed(rebuilt.snapshot(), rebuilt_prefix) == live_state
    rebuilt.close()


def test_a_batch_is_applied_once_with_its_checkpoint_in_one_transaction(
    server: ServerProcess, redis_url: str
):
    db = connect(server.address)
    tag = uuid.uuid4().hex[:8]
    subject = f"{tag}-1"
    first = db.append(
        f"user-{subject}",
        [
            Event("UserRegistered", {"email": f"a-{tag}@x.test", "name": "A"}, subject_id=subject),
            Event("NameChanged", {"name": "B"}, subject_id=subject),
        ],
    ).first_position
    batch = list(db.read_all(from_position=first, max_count=2))
    projection = cache(redis_url, f"once-{tag}:")
    projection.open()
    try:
        # Earlier events would matter only to the checkpoint: start just before the batch.
        projection.redis.set(projection.checkpoint_key, first - 1)
        assert projection.apply(batch, batch[-1].position) == first + 1
        state = projection.snapshot()
        # The same batch again (a re-delivery): nothing changes, not even the version.
        assert projection.apply(batch, batch[-1].position) == first + 1
        assert projection.apply(batch[:1], batch[0].position) == first + 1
        assert projection.snapshot() == state
        assert projection.get(subject) == {"email": f"a-{tag}@x.test", "name": "B", "version": "1"}

        # A handler failing mid-batch: EXEC never runs, so neither writes nor checkpoint land.
        later = db.append(
            f"user-{subject}", Event("NameChanged", {"name": "C"}, subject_id=subject)
        ).first_position
        event = next(iter(db.read_all(from_position=later, max_count=1)))

        def broken(*_: object) -> None:
            raise RuntimeError("crash in the handler")

        projection.name_changed = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            projection.apply([event], later)
        assert projection.snapshot() == state
    finally:
        projection.close()
