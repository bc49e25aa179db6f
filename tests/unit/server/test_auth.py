"""The role table, bearer-token parsing, the interceptor's decisions and the exposure rule."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest

from lethedb.v1 import admin_pb2, eventstore_pb2, replication_pb2
from lethedb_server.api import auth
from lethedb_server.api.tokens import ROLES, TokenStore, create_token
from lethedb_server.errors import ValidationError

PROTO_METHODS = [
    f"/{service.full_name}/{method.name}"
    for file in (eventstore_pb2.DESCRIPTOR, admin_pb2.DESCRIPTOR, replication_pb2.DESCRIPTOR)
    for service in file.services_by_name.values()
    for method in service.methods
]


def test_every_rpc_in_the_protos_has_a_role():
    """A new RPC must be given a role here before anybody can call it."""
    missing = [m for m in PROTO_METHODS if auth.required_role(m) is None]
    assert not missing, f"add these to auth.METHOD_ROLES: {missing}"


def test_the_role_table_names_only_real_rpcs():
    assert set(auth.METHOD_ROLES) <= set(PROTO_METHODS)


@pytest.mark.parametrize(
    ("method", "role"),
    [
        ("/lethedb.v1.EventStore/ReadAll", "reader"),
        ("/lethedb.v1.EventStore/Subscribe", "reader"),
        ("/lethedb.v1.EventStore/CommitCheckpoint", "consumer"),
        ("/lethedb.v1.EventStore/GetCheckpoint", "reader"),
        ("/lethedb.v1.EventStore/Append", "writer"),
        ("/lethedb.v1.EventStore/Commit", "writer"),
        ("/lethedb.v1.EventStore/ForgetSubject", "admin"),
        ("/lethedb.v1.EventStore/ExportSubject", "admin"),
        ("/lethedb.v1.Admin/Shred", "admin"),
        ("/lethedb.v1.Admin/SomethingAddedLater", "admin"),
        ("/lethedb.v1.Replication/Follow", "replica"),
        ("/lethedb.v1.Replication/ForwardCheckpoint", "replica"),
        ("/lethedb.v1.EventStore/SomethingAddedLater", None),
        ("/other.Service/Method", None),
    ],
)
def test_required_roles(method, role):
    assert auth.required_role(method) == role


def test_the_replica_role_stands_outside_the_ladder():
    """A follower's token replicates and does nothing else; no client role replicates."""
    assert auth.role_allows("replica", "replica")
    for role in ("reader", "consumer", "writer", "admin"):
        assert not auth.role_allows("replica", role)
        assert not auth.role_allows(role, "replica")


def test_roles_include_the_roles_below_them():
    assert auth.role_allows("admin", "reader")
    assert auth.role_allows("writer", "writer")
    assert not auth.role_allows("reader", "writer")
    assert auth.role_allows("consumer", "reader")
    assert not auth.role_allows("reader", "consumer")
    assert auth.role_allows("writer", "consumer")
    assert not auth.role_allows("consumer", "writer")
    assert not auth.role_allows("anonymous", "reader")


def test_health_and_reflection_are_open():
    assert auth.is_open("/grpc.health.v1.Health/Check")
    assert auth.is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not auth.is_open("/lethedb.v1.EventStore/ReadAll")


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer abc"),), "abc"),
        ((("user-agent", "x"), ("authorization", "Bearer  abc ")), "abc"),
        ((), "missing_token"),
        ((("authorization", "Basic abc"),), "malformed_token"),
        ((("authorization", "Bearer"),), "malformed_token"),
        ((("authorization", b"Bearer abc"),), "malformed_token"),
    ],
)
def test_bearer_token_parsing(metadata, expected):
    found = auth.bearer_token(metadata)
    assert (found.reason if isinstance(found, auth.Refusal) else found) == expected


@pytest.fixture
def interceptor(tmp_path: Path) -> tuple[auth.AccessInterceptor, dict[str, str]]:
    path = tmp_path / "tokens.json"
    tokens = {role: create_token(path, role, f"t-{role}")[0] for role in ROLES}
    return auth.AccessInterceptor(TokenStore.open(path)), tokens


def test_the_interceptor_authenticates_then_authorises(interceptor):
    access, tokens = interceptor

    def check(method: str, token: str | None) -> auth.Identity | auth.Refusal:
        metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        return access.check(method, metadata)

    append = "/lethedb.v1.EventStore/Append"
    assert check(append, tokens["writer"]) == auth.Identity("t-writer", "writer")
    assert check(append, tokens["admin"]) == auth.Identity("t-admin", "admin")
    denied = check(append, tokens["reader"])
    assert isinstance(denied, auth.Refusal)
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    assert denied.token_name == "t-reader"
    assert tokens["reader"] not in denied.message
    for token in (None, "lethedb_unknown", tokens["writer"] + "x"):
        refused = check(append, token)
        assert isinstance(refused, auth.Refusal)
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED
    # Secure default: a method missing from the table is refused even to admin ...
    unlisted = check("/lethedb.v1.EventStore/NotInTheTable", tokens["admin"])
    assert isinstance(unlisted, auth.Refusal)
    assert unlisted.code == grpc.StatusCode.PERMISSION_DENIED
    # ... but authentication comes first.
    anonymous = check("/lethedb.v1.EventStore/NotInTheTable", None)
    assert isinstance(anonymous, auth.Refusal)
    assert anonymous.code == grpc.StatusCode.UNAUTHENTICATED


def test_without_authentication_callers_act_as_admin():
    assert auth.caller_role() == "admin"
    assert auth.caller_name() == ""


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.0.0.2:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/tmp/lethedb.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.0.0.5:50051", False),
        ("db.internal:50051", False),
    ],
)
def test_loopback_addresses(listen, loopback):
    assert auth.is_loopback_address(listen) is loopback


def test_exposure_rule(caplog):
    auth.check_exposure("127.0.0.1:1", tls=False, tokens=False, insecure=False)
    auth.check_exposure("0.0.0.0:1", tls=True, tokens=True, insecure=False)
    for tls, tokens in ((False, False), (True, False), (False, True)):
        with pytest.raises(ValidationError, match=r"refusing to listen on 0\.0\.0\.0:1 without"):
            auth.check_exposure("0.0.0.0:1", tls=tls, tokens=tokens, insecure=False)
    with caplog.at_level(logging.WARNING):
        auth.check_exposure("0.0.0.0:1", tls=True, tokens=False, insecure=True)
    assert "INSECURE: serving 0.0.0.0:1 without authentication tokens" in caplog.text


BAD_TOKEN = auth.Refusal(grpc.StatusCode.UNAUTHENTICATED, "invalid_token", "not valid")
LOW_ROLE = auth.Refusal(grpc.StatusCode.PERMISSION_DENIED, "role", "needs writer", "t-reader")


def summaries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "not logged" in r.getMessage()]


def test_refusals_beyond_the_burst_are_summarised_per_peer_host_and_reason(caplog):
    """An attack stays visible in the log although the log is not flooded."""
    limiter = auth._RateLimitedLog(burst=3, window_s=0.2)

    async def attack() -> None:
        for port in range(10):  # one host, many connections
            limiter("/lethedb.v1.EventStore/ReadAll", f"ipv4:10.0.0.1:{5000 + port}", BAD_TOKEN)
        for _ in range(5):
            limiter("/lethedb.v1.EventStore/Append", "ipv6:[::1]:6000", LOW_ROLE)
        await asyncio.sleep(0.5)  # the attack stops: the window's end still writes the summary

    with caplog.at_level(logging.WARNING, logger="lethedb_server.api.auth"):
        asyncio.run(attack())
    refused = [r for r in caplog.records if r.getMessage().startswith("refused /")]
    assert len(refused) == 3
    found = {(r.peer, r.reason, r.suppressed) for r in summaries(caplog)}  # type: ignore[attr-defined]
    assert found == {("ipv4:10.0.0.1", "invalid_token", 7), ("ipv6:[::1]", "role", 5)}
    assert "7 from ipv4:10.0.0.1 (invalid_token)" in summaries(caplog)[0].getMessage()


def test_the_summary_of_an_attack_from_many_hosts_stays_a_few_lines(caplog):
    now = [0.0]
    limiter = auth._RateLimitedLog(burst=2, window_s=10.0, max_summaries=5, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="lethedb_server.api.auth"):
        for host in range(500):
            limiter("/m", f"ipv4:10.1.{host // 256}.{host % 256}:1", BAD_TOKEN)
        now[0] = 10.0
        limiter("/m", "ipv4:10.9.9.9:1", BAD_TOKEN)  # the next window writes the last one's
    lines = summaries(caplog)
    assert len(lines) == 6
    assert sum(r.suppressed for r in lines) == 498  # type: ignore[attr-defined]
    assert "more from other peers or reasons" in lines[-1].getMessage()
