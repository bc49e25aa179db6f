"""Connection strings and plain arguments, resolved the same way for both clients."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

import lethedb
from lethedb._connection import Connection, resolve

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
TOKEN = "lethedb_" + "t" * 43


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(PEM)
    return path


def test_a_plain_target_is_plaintext_without_credentials():
    connection = resolve("localhost:50051")
    assert connection == Connection("localhost:50051")
    assert connection.credentials() is None


def test_a_connection_string_with_tls_and_a_ca(ca: Path):
    connection = resolve(f"lethedb://db.example.com:6000?tls=true&ca={ca}")
    assert connection.target == "db.example.com:6000"
    assert connection.tls
    assert connection.ca == PEM
    assert isinstance(connection.credentials(), grpc.ChannelCredentials)


def test_the_default_port_and_ipv6_hosts():
    assert resolve("lethedb://db").target == "db:50051"
    assert resolve("lethedb://[::1]:7000").target == "[::1]:7000"
    assert resolve("lethedb://db/").target == "db:50051"


def test_keyword_arguments_give_the_same_settings(ca: Path):
    by_string = resolve(f"lethedb://db:1?ca={ca}&token={TOKEN}")
    by_arguments = resolve("db:1", ca=ca, token=TOKEN)
    assert by_string == by_arguments
    assert by_string.tls  # a CA implies TLS
    assert resolve("db:1", ca=PEM).ca == PEM  # PEM bytes work as well as a path


def test_mtls_needs_certificate_and_key_together(ca: Path):
    connection = resolve(f"lethedb://db:1?ca={ca}&cert={ca}&key={ca}")
    assert connection.client_cert == PEM
    assert connection.client_key == PEM
    with pytest.raises(lethedb.ValidationError, match="together"):
        resolve("db:1", client_cert=ca)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("lethedb://db:1?tls=maybe", "expected true or false"),
        ("lethedb://db:1?colour=blue", "'colour' is unknown"),
        ("lethedb://db:1?tls=true&tls=false", "given twice"),
        ("lethedb://db:1/path", "no path"),
        ("lethedb://user:pw@db:1", "no path, user"),
        ("lethedb://db:99999", "port"),
        ("lethedb://:1", "no host"),
        ("", "target"),
    ],
)
def test_malformed_connection_strings_are_refused(target: str, message: str):
    with pytest.raises(lethedb.ValidationError, match=message):
        resolve(target)


def test_conflicting_settings_are_refused_not_silently_chosen(ca: Path):
    with pytest.raises(lethedb.ValidationError, match="tls is given both"):
        resolve("lethedb://db:1?tls=false", tls=True)
    with pytest.raises(lethedb.ValidationError, match="token is given both"):
        resolve(f"lethedb://db:1?tls=true&token={TOKEN}", token=TOKEN + "x")
    with pytest.raises(lethedb.ValidationError, match="tls is false"):
        resolve("db:1", tls=False, ca=ca)
    with pytest.raises(lethedb.ValidationError, match="either channel_credentials"):
        resolve("db:1", tls=True, channel_credentials=grpc.ssl_channel_credentials())


def test_a_token_is_never_sent_in_clear_across_a_network():
    with pytest.raises(lethedb.ValidationError, match=r"in clear to db\.example\.com:1") as refused:
        resolve("db.example.com:1", token=TOKEN)
    assert TOKEN not in str(refused.value)
    for local in ("127.0.0.1:1", "localhost:1", "[::1]:1", "unix:///tmp/s"):
        assert resolve(local, token=TOKEN).credentials() is not None  # local credentials
    assert resolve("db.example.com:1", tls=True, token=TOKEN).credentials() is not None


def test_bad_files_and_tokens_are_reported_without_their_content(tmp_path: Path):
    with pytest.raises(lethedb.ValidationError, match="cannot read"):
        resolve("db:1", ca=tmp_path / "absent.pem")
    (tmp_path / "junk").write_bytes(b"not pem")
    with pytest.raises(lethedb.ValidationError, match="PEM"):
        resolve("db:1", ca=tmp_path / "junk")
    with pytest.raises(lethedb.ValidationError, match="white space") as bad:
        resolve("localhost:1", token="secret value")
    assert "secret value" not in str(bad.value)


def test_clients_accept_connection_strings_and_never_show_the_token(ca: Path):
    with lethedb.Client(f"lethedb://127.0.0.1:1?token={TOKEN}") as db:
        assert repr(db) == "Client('127.0.0.1:1')"
    assert TOKEN not in repr(resolve("127.0.0.1:1", token=TOKEN))
    with lethedb.Client("db:1", ca=ca, token=TOKEN) as db:
        assert TOKEN not in repr(db)


def test_the_async_client_resolves_the_same_way(ca: Path):
    async def main() -> None:
        async with lethedb.AsyncClient(f"lethedb://db:1?ca={ca}", token=TOKEN) as db:
            assert repr(db) == "AsyncClient('db:1')"

    asyncio.run(main())


def test_several_hosts_are_the_nodes_of_one_cluster(ca: Path):
    connection = resolve(f"lethedb://db1:7000,db2,[::1]:7002?tls=true&ca={ca}&prefer=follower")
    assert connection.hosts == ("db1:7000", "db2:50051", "[::1]:7002")
    assert connection.target == "db1:7000"
    assert connection.prefer == "follower"
    assert connection.tls


def test_a_cluster_connection_string_is_checked_host_by_host():
    with pytest.raises(lethedb.ValidationError, match="twice"):
        resolve("lethedb://db1:7000,db1:7000")
    with pytest.raises(lethedb.ValidationError, match="no host"):
        resolve("lethedb://db1:7000,,db2:7000")
    with pytest.raises(lethedb.ValidationError, match="port"):
        resolve("lethedb://db1:7000,db2:http")


def test_a_token_is_refused_in_clear_if_any_host_is_off_loopback():
    assert resolve(f"lethedb://127.0.0.1:1,localhost:2?token={TOKEN}").hosts == (
        "127.0.0.1:1",
        "localhost:2",
    )
    with pytest.raises(lethedb.ValidationError, match=r"in clear to db2:2"):
        resolve(f"lethedb://127.0.0.1:1,db2:2?token={TOKEN}")


def test_a_leader_a_server_names_gets_the_same_settings_but_never_a_token_in_clear():
    settings_of = lethedb.Client("lethedb://127.0.0.1:1", token=TOKEN)
    try:
        settings = settings_of._transport.settings
        assert isinstance(settings.credentials_for("127.0.0.2:1"), grpc.ChannelCredentials)
        with pytest.raises(lethedb.ValidationError, match=r"in clear to db9:1"):
            settings.credentials_for("db9:1")
    finally:
        settings_of.close()
