"""Bearer tokens: the tokens file, hashing, verification and ``lethedb token``.

A token is 32 random bytes (256 bits) from :mod:`secrets`, printed once by
``lethedb token create`` as ``lethedb_<base64url>``. The token itself is
never stored: the tokens file (JSON, the ``tokens_file`` option) keeps its
SHA-256 digest, a name and a role::

    {"format": "lethedb.tokens.v1",
     "tokens": [{"name": "ingest", "role": "writer", "sha256": "9f2c...",
                 "created_at": "2025-01-31T12:00:00Z"}]}

A fast hash is the right tool here. Slow password hashes (scrypt, argon2)
exist to make *guessing* a low-entropy secret expensive; nobody can
enumerate 2^256 tokens however cheap each guess is, so a slow hash would only
add milliseconds of CPU to every call without making a stolen tokens file any
more useful: it yields no token either way. A presented token is hashed and
compared with :func:`hmac.compare_digest` against every entry, without
stopping at a match, so timing tells nothing about the file.

The file is re-read when it changes (:meth:`TokenStore.watch` checks it four
times a second, and SIGHUP forces a re-read), so ``lethedb token create`` and
``lethedb token revoke`` take effect on a running server, also on the calls
it is already serving: every reload is announced to the listeners
(:meth:`TokenStore.add_listener`), and the access interceptor ends the
streaming calls of a revoked or downgraded token. Writes are atomic (temporary file, fsync, rename),
mode 0600, and serialised by a lock file next to the tokens file.

This module never logs, prints or stores a token, except the one ``print``
that hands a new token to its creator; and it does not import grpc.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from lethedb_server.errors import ValidationError
from lethedb_server.files import make_private_dir, open_private, write_atomically

log = logging.getLogger(__name__)

Role = Literal["reader", "consumer", "writer", "admin", "replica"]
#: The ladder of client roles, least first; each may do what the roles before it may.
LADDER: Final[tuple[Role, ...]] = ("reader", "consumer", "writer", "admin")
#: Every role: the ladder, then ``replica``, which stands outside it (a
#: follower node's token may call the Replication service and nothing else;
#: no client role may replicate, not even admin).
ROLES: Final[tuple[Role, ...]] = (*LADDER, "replica")
#: Seconds between checks of the tokens file for changes: a revoked token's
#: calls must end within a second, and a stat() four times a second is free.
RECHECK_S: Final = 0.25
TOKEN_PREFIX: Final = "lethedb_"
TOKENS_FORMAT: Final = "lethedb.tokens.v1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Identity:
    """Who is calling: the token's name (not the token) and its role.

    ``digest`` is the token's SHA-256, kept so that a call can be checked
    again when the tokens file changes; it is never shown (``repr``) nor
    compared.
    """

    name: str
    role: str
    digest: bytes = field(default=b"", repr=False, compare=False)


class TokenEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    role: Role
    sha256: str
    created_at: str = ""


class TokensFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str = TOKENS_FORMAT
    tokens: list[TokenEntry] = msgspec.field(default_factory=list)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def new_token() -> str:
    raw = secrets.token_bytes(32)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def read_tokens_file(path: Path) -> TokensFile:
    """Parse and check a tokens file; ValidationError names what is wrong (never a digest)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValidationError(
            f"tokens file {path} does not exist; create a token with "
            f"`lethedb token create --role admin --tokens-file {path}`"
        ) from None
    except OSError as exc:
        raise ValidationError(f"tokens file {path}: {exc}") from exc
    try:
        parsed = msgspec.json.decode(raw, type=TokensFile)
    except msgspec.ValidationError as exc:
        raise ValidationError(f"tokens file {path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ValidationError(f"tokens file {path} is not valid JSON: {exc}") from None
    if parsed.format != TOKENS_FORMAT:
        raise ValidationError(
            f"tokens file {path} has format {parsed.format!r}; expected {TOKENS_FORMAT!r}"
        )
    seen: set[str] = set()
    for i, entry in enumerate(parsed.tokens):
        if not _NAME.fullmatch(entry.name):
            raise ValidationError(
                f"tokens file {path}: tokens[{i}].name {entry.name[:40]!r} must be 1-64 "
                "letters, digits, '.', '_' or '-'"
            )
        if entry.name in seen:
            raise ValidationError(f"tokens file {path}: the name {entry.name!r} appears twice")
        seen.add(entry.name)
        if not _DIGEST.fullmatch(entry.sha256):
            raise ValidationError(
                f"tokens file {path}: tokens[{i}] ({entry.name!r}) sha256 must be 64 "
                "lower-case hex digits"
            )
    return parsed


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class TokenStore:
    """The tokens the server accepts, re-read when the file changes.

    The file is checked for changes every ``recheck_s`` by :meth:`watch`,
    before a call when the last check is older than that, and on SIGHUP
    through :meth:`reload`, so a created or revoked token takes effect within
    a second, without a restart. A file that turns out invalid is logged and
    ignored: the tokens loaded before stay in force. Every replacement of the
    tokens is announced to the listeners, which re-check what the old tokens
    were allowed (the calls in progress).
    """

    def __init__(self, path: Path, *, recheck_s: float = RECHECK_S) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._known: tuple[tuple[bytes, Identity], ...] = ()
        self._signature: tuple[int, int, int, int] | None = None
        self._checked_at = 0.0
        self._listeners: list[Callable[[], None]] = []

    @classmethod
    def open(cls, path: Path) -> TokenStore:
        """Load at start-up; an unusable file stops the server (fail closed)."""
        store = cls(path)
        store._load(read_tokens_file(path), _signature(path))
        _warn_if_writable_by_others(path)
        if not store._known:
            log.warning("tokens file %s holds no tokens: every call will be refused", path)
        return store

    def __len__(self) -> int:
        return len(self._known)

    def _load(self, parsed: TokensFile, signature: tuple[int, int, int, int] | None) -> None:
        self._known = tuple(
            (digest, Identity(e.name, e.role, digest))
            for e in parsed.tokens
            for digest in (bytes.fromhex(e.sha256),)
        )
        self._signature = signature
        self._checked_at = time.monotonic()

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed (or when forced); True when tokens were replaced."""
        self._checked_at = time.monotonic()
        signature = _signature(self.path)
        if not force and signature == self._signature:
            return False
        try:
            parsed = read_tokens_file(self.path)
        except ValidationError as exc:
            if signature != self._signature:
                log.error("tokens file not reloaded, keeping %d tokens: %s", len(self), exc)
            self._signature = signature
            return False
        self._load(parsed, signature)
        log.info("tokens file %s reloaded: %d tokens", self.path, len(self))
        for listener in self._listeners:
            listener()
        return True

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call *listener* after every reload that replaced the tokens."""
        self._listeners.append(listener)

    async def watch(self) -> None:
        """Re-read the file whenever it changes, until cancelled.

        Without this, a change would only be noticed at the next call, and a
        revoked token's streams would run on until somebody called.
        """
        while True:
            await asyncio.sleep(self.recheck_s)
            try:
                self.reload()
            except Exception:  # a watcher that dies would silently stop revocation
                log.exception("checking the tokens file %s failed", self.path)

    def identity(self, token_digest: bytes) -> Identity | None:
        """The identity the current tokens give *token_digest*, or None if revoked."""
        found: Identity | None = None
        for stored, identity in self._known:
            if hmac.compare_digest(token_digest, stored) and found is None:
                found = identity
        return found

    def authenticate(self, token: str) -> Identity | None:
        if time.monotonic() - self._checked_at >= self.recheck_s:
            self.reload()
        # identity() compares with every entry: the time taken must not
        # depend on where (or whether) the digest matches.
        return self.identity(digest(token))


def _warn_if_writable_by_others(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning(
            "tokens file %s is writable by group or others (mode %o): anyone who can write "
            "it can grant themselves the admin role; chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise concurrent ``lethedb token`` commands on one tokens file."""
    make_private_dir(path.parent)
    with open(open_private(path.with_name(path.name + ".lock"), os.O_WRONLY), "wb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def _write_tokens_file(path: Path, parsed: TokensFile) -> None:
    """Replace the file atomically, mode 0600, durable before returning."""
    write_atomically(path, msgspec.json.format(msgspec.json.encode(parsed), indent=2) + b"\n")


def _existing(path: Path) -> TokensFile:
    return read_tokens_file(path) if path.exists() else TokensFile()


def create_token(path: Path, role: str, name: str | None = None) -> tuple[str, TokenEntry]:
    """Add a token with *role* to the tokens file; return the token (shown once) and entry."""
    if role not in ROLES:
        raise ValidationError(f"role is {role!r}; expected one of {', '.join(ROLES)}")
    name = name or f"{role}-{secrets.token_hex(3)}"
    if not _NAME.fullmatch(name):
        raise ValidationError(
            f"name {name[:40]!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    token = new_token()
    entry = TokenEntry(
        name=name,
        role=role,
        sha256=digest(token).hex(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    )
    with _locked(path):
        current = _existing(path)
        if any(e.name == name for e in current.tokens):
            raise ValidationError(f"tokens file {path} already has a token named {name!r}")
        _write_tokens_file(path, TokensFile(tokens=[*current.tokens, entry]))
    return token, entry


def revoke_token(path: Path, name: str) -> None:
    with _locked(path):
        current = read_tokens_file(path)
        kept = [e for e in current.tokens if e.name != name]
        if len(kept) == len(current.tokens):
            raise ValidationError(f"tokens file {path} has no token named {name!r}")
        _write_tokens_file(path, TokensFile(tokens=kept))


# --- the ``lethedb token`` command ---------------------------------------------------------

TOKENS_FILE_ENV: Final = "LETHEDB_TOKENS_FILE"


def add_token_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="create, list or revoke bearer tokens")
    actions = token.add_subparsers(dest="token_action", required=True)

    def tokens_file(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--tokens-file",
            type=Path,
            default=os.environ.get(TOKENS_FILE_ENV) or None,
            help=f"the server's tokens file (env {TOKENS_FILE_ENV})",
        )

    create = actions.add_parser("create", help="create a token; it is printed once")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", default=None, help="a name for logs and revocation")
    tokens_file(create)
    listing = actions.add_parser("list", help="list token names and roles")
    tokens_file(listing)
    revoke = actions.add_parser("revoke", help="remove a token by name")
    revoke.add_argument("name")
    tokens_file(revoke)


def run_token_command(args: argparse.Namespace, out: Any = None, err: Any = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    path: Path | None = args.tokens_file
    if path is None:
        raise ValidationError(f"give --tokens-file PATH (or set {TOKENS_FILE_ENV})")
    if args.token_action == "create":
        token, entry = create_token(path, args.role, args.name)
        print(token, file=out)
        print(
            f"created token {entry.name!r} with role {entry.role} in {path}; it is shown "
            "only this once (the file keeps its SHA-256 digest)",
            file=err,
        )
    elif args.token_action == "list":
        for entry in read_tokens_file(path).tokens:
            print(f"{entry.name}\t{entry.role}\t{entry.created_at}", file=out)
    else:
        revoke_token(path, args.name)
        print(f"revoked token {args.name!r}; a running server stops accepting it", file=err)
    return 0
