"""The tokens file: only digests stored, atomic updates, reload, revocation."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import time
from pathlib import Path

import pytest

from lethedb_server.api import tokens
from lethedb_server.errors import ValidationError


def test_a_created_token_is_returned_once_and_only_its_digest_is_stored(tmp_path: Path):
    path = tmp_path / "tokens.json"
    token, entry = tokens.create_token(path, "writer", "ingest")
    assert token.startswith(tokens.TOKEN_PREFIX)
    assert len(token) == len(tokens.TOKEN_PREFIX) + 43  # 32 bytes, base64url
    text = path.read_text()
    assert token not in text
    assert token[len(tokens.TOKEN_PREFIX) :] not in text
    stored = json.loads(text)
    assert stored["format"] == tokens.TOKENS_FORMAT
    assert stored["tokens"] == [
        {
            "name": "ingest",
            "role": "writer",
            "sha256": hashlib.sha256(token.encode()).hexdigest(),
            "created_at": entry.created_at,
        }
    ]
    assert path.stat().st_mode & 0o777 == 0o600


def test_tokens_are_random_and_names_unique(tmp_path: Path):
    path = tmp_path / "tokens.json"
    a, entry_a = tokens.create_token(path, "reader")
    b, entry_b = tokens.create_token(path, "reader")
    assert a != b
    assert entry_a.name != entry_b.name
    with pytest.raises(ValidationError, match="already has a token named"):
        tokens.create_token(path, "admin", entry_a.name)
    with pytest.raises(ValidationError, match="role is 'root'"):
        tokens.create_token(path, "root")
    with pytest.raises(ValidationError, match="name"):
        tokens.create_token(path, "reader", "has space")


def test_authenticate_finds_the_identity_and_nothing_else(tmp_path: Path):
    path = tmp_path / "tokens.json"
    writer, _ = tokens.create_token(path, "writer", "w")
    admin, _ = tokens.create_token(path, "admin", "a")
    store = tokens.TokenStore.open(path)
    assert store.authenticate(writer) == tokens.Identity("w", "writer")
    assert store.authenticate(admin) == tokens.Identity("a", "admin")
    assert store.authenticate(writer[:-1]) is None
    assert store.authenticate("") is None
    assert store.authenticate(hashlib.sha256(writer.encode()).hexdigest()) is None


def test_a_changed_file_is_reloaded_and_a_broken_one_ignored(tmp_path: Path):
    path = tmp_path / "tokens.json"
    first, _ = tokens.create_token(path, "reader", "first")
    store = tokens.TokenStore.open(path)
    store.recheck_s = 0.0
    second, _ = tokens.create_token(path, "reader", "second")
    assert store.authenticate(second) == tokens.Identity("second", "reader")
    tokens.revoke_token(path, "first")
    assert store.authenticate(first) is None
    path.write_text("{not json")
    assert store.authenticate(second) == tokens.Identity("second", "reader")  # kept


def test_the_file_is_only_rechecked_after_the_interval(tmp_path: Path):
    path = tmp_path / "tokens.json"
    tokens.create_token(path, "reader", "first")
    store = tokens.TokenStore.open(path)
    later, _ = tokens.create_token(path, "reader", "later")
    assert store.authenticate(later) is None  # within recheck_s of the load
    store._checked_at = time.monotonic() - store.recheck_s
    assert store.authenticate(later) is not None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ('{"format": "other", "tokens": []}', "has format 'other'"),
        ('{"tokens": [{"name": "a", "role": "root", "sha256": "' + "0" * 64 + '"}]}', "role"),
        ('{"tokens": [{"name": "a", "role": "admin", "sha256": "xyz"}]}', "64 lower-case hex"),
        (
            '{"tokens": [{"name": "a", "role": "admin", "sha256": "' + "0" * 64 + '"},'
            '{"name": "a", "role": "reader", "sha256": "' + "1" * 64 + '"}]}',
            "appears twice",
        ),
    ],
)
def test_a_bad_tokens_file_is_refused_at_start(tmp_path: Path, content: str, message: str):
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(ValidationError, match=message):
        tokens.TokenStore.open(path)


def test_a_missing_tokens_file_says_how_to_make_one(tmp_path: Path):
    with pytest.raises(ValidationError, match="lethedb token create"):
        tokens.TokenStore.open(tmp_path / "absent.json")


def test_a_tokens_file_writable_by_others_is_warned_about(tmp_path: Path, caplog):
    path = tmp_path / "tokens.json"
    tokens.create_token(path, "admin")
    os.chmod(path, 0o666)
    tokens.TokenStore.open(path)
    assert "writable by group or others" in caplog.text


def test_revoking_an_unknown_name_is_an_error(tmp_path: Path):
    path = tmp_path / "tokens.json"
    tokens.create_token(path, "admin", "a")
    with pytest.raises(ValidationError, match="no token named 'b'"):
        tokens.revoke_token(path, "b")


def test_the_consumer_role_is_accepted_by_the_file_and_the_command(tmp_path: Path):
    path = tmp_path / "tokens.json"
    parser = argparse.ArgumentParser()
    tokens.add_token_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["token", "create", "--role", "consumer", "--name", "proj", "--tokens-file", str(path)]
    )
    out, err = io.StringIO(), io.StringIO()
    assert tokens.run_token_command(args, out, err) == 0
    store = tokens.TokenStore.open(path)
    assert store.authenticate(out.getvalue().strip()) == tokens.Identity("proj", "consumer")
    assert tokens.LADDER == ("reader", "consumer", "writer", "admin")


def test_the_replica_role_is_accepted_by_the_command(tmp_path: Path):
    """A follower node's token: `lethedb token create --role replica`."""
    path = tmp_path / "tokens.json"
    parser = argparse.ArgumentParser()
    tokens.add_token_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["token", "create", "--role", "replica", "--name", "node-b", "--tokens-file", str(path)]
    )
    out, err = io.StringIO(), io.StringIO()
    assert tokens.run_token_command(args, out, err) == 0
    store = tokens.TokenStore.open(path)
    assert store.authenticate(out.getvalue().strip()) == tokens.Identity("node-b", "replica")


def test_the_watcher_reloads_a_changed_file_by_itself_and_tells_the_listeners(tmp_path: Path):
    """Revocation must not wait for the next call to look at the file."""
    path = tmp_path / "tokens.json"
    revoked, _ = tokens.create_token(path, "reader", "soon-revoked")
    tokens.create_token(path, "reader", "kept")
    store = tokens.TokenStore.open(path)
    store.recheck_s = 0.01
    heard: list[int] = []
    store.add_listener(lambda: heard.append(len(store)))

    async def main() -> None:
        watcher = asyncio.create_task(store.watch())
        tokens.revoke_token(path, "soon-revoked")
        while not heard:
            await asyncio.sleep(0.01)
        watcher.cancel()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert heard == [1]
    assert store.identity(tokens.digest(revoked)) is None
