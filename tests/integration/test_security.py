"""Security against real servers: tokens and roles, TLS and mTLS, exposure, logs.

The auth matrix runs every RPC of ``lethedb.v1.EventStore`` and
``lethedb.v1.Admin`` (unary and streaming) with no token, a bad token and a
token of each role on one server, and checks the status. For calls the role
allows, any status but UNAUTHENTICATED and PERMISSION_DENIED counts as
"allowed through": the matrix sends default (mostly invalid) requests, so the
handler's own answer does not matter, only that the call reached it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import lethedb
from lethedb.v1 import admin_pb2, eventstore_pb2
from lethedb_server.api.tokens import create_token
from tests.integration.pki import CertificateAuthority
from tests.integration.serverproc import ServerProcess

EVENTSTORE = eventstore_pb2.DESCRIPTOR.services_by_name["EventStore"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"]

#: The role table of the specification (DESIGN.md, "Security and operations").
READER_METHODS = {"ReadStream", "ReadAll", "Subscribe", "GetSubject", "GetCheckpoint"}
CONSUMER_METHODS = {"CommitCheckpoint"}
WRITER_METHODS = {"Append", "AppendStream", "AppendBatch", "Commit"}
ADMIN_EVENTSTORE_METHODS = {"ForgetSubject", "ExportSubject"}
RANK = {"reader": 0, "consumer": 1, "writer": 2, "admin": 3}

#: A call the role allows but that runs on (a live subscription) is cut by this deadline.
ALLOWED_DEADLINE_S = 0.5
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def needed_role(service: ServiceDescriptor, method: MethodDescriptor) -> str:
    if service is ADMIN or method.name in ADMIN_EVENTSTORE_METHODS:
        return "admin"
    if method.name in WRITER_METHODS:
        return "writer"
    if method.name in CONSUMER_METHODS:
        return "consumer"
    assert method.name in READER_METHODS, f"{method.full_name}: which role may call it?"
    return "reader"


def all_methods() -> list[tuple[ServiceDescriptor, MethodDescriptor]]:
    return [(s, m) for s in (EVENTSTORE, ADMIN) for m in s.methods]


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


def call_method(
    channel: grpc.Channel,
    service: ServiceDescriptor,
    method: MethodDescriptor,
    metadata: tuple[tuple[str, str], ...],
) -> grpc.StatusCode:
    """Call *method* with a default request; the final status (OK for success)."""
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    path = f"/{service.full_name}/{method.name}"
    codec = {
        "request_serializer": request_type.SerializeToString,
        "response_deserializer": response_type.FromString,
    }
    options = {"metadata": metadata, "timeout": ALLOWED_DEADLINE_S}
    try:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path, **codec)(iter([request_type()]), **options))
        elif method.client_streaming:
            channel.stream_unary(path, **codec)(iter([request_type()]), **options)
        elif method.server_streaming:
            list(channel.unary_stream(path, **codec)(request_type(), **options))
        else:
            channel.unary_unary(path, **codec)(request_type(), **options)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority()
    server_cert, server_key = ca.issue("lethedb-server", server=True).write(directory, "server")
    client_cert, client_key = ca.issue("lethedb-client", server=False).write(directory, "client")
    return {
        "ca": ca.write(directory / "ca.pem"),
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
    }


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | Path]:
    path = tmp_path_factory.mktemp("auth") / "tokens.json"
    made: dict[str, str | Path] = {"path": path}
    for role in ("reader", "consumer", "writer", "admin"):
        made[role], _ = create_token(path, role, f"test-{role}")
    return made


@pytest.fixture(scope="module")
def auth_server(
    tmp_path_factory: pytest.TempPathFactory, tokens: dict[str, str | Path]
) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("auth-server") / "data"
    proc = ServerProcess(data, "--tokens-file", str(tokens["path"])).start()
    yield proc
    proc.stop()


# --- authentication and roles ----------------------------------------------------------------


@pytest.mark.parametrize(
    "identity", ["no token", "bad token", "reader", "consumer", "writer", "admin"]
)
def test_every_rpc_answers_each_identity_with_the_code_its_role_calls_for(
    auth_server, tokens, identity
):
    token = {
        "no token": None,
        "bad token": "lethedb_" + "A" * 43,
    }.get(identity, tokens.get(identity))
    assert token is None or isinstance(token, str)
    wrong: list[str] = []
    with grpc.insecure_channel(auth_server.address) as channel:
        for service, method in all_methods():
            code = call_method(channel, service, method, bearer(token))
            if identity in ("no token", "bad token"):
                ok = code == grpc.StatusCode.UNAUTHENTICATED
            elif RANK[identity] >= RANK[needed_role(service, method)]:
                ok = code not in DENIED
            else:
                ok = code == grpc.StatusCode.PERMISSION_DENIED
            if not ok:
                wrong.append(f"{service.name}.{method.name}: {code.name}")
    assert not wrong, f"{identity}: {wrong}"


def test_the_matrix_covers_unary_and_streaming_calls_of_both_services():
    kinds = {(m.client_streaming, m.server_streaming) for _, m in all_methods()}
    assert {(False, False), (False, True), (True, True)} <= kinds
    assert {s.name for s, _ in all_methods()} == {"EventStore", "Admin"}


def test_a_malformed_authorization_header_is_unauthenticated(auth_server):
    with grpc.insecure_channel(auth_server.address) as channel:
        for value in ("Basic dXNlcjpwYXNz", "Bearer", "bearer  "):
            code = call_method(
                channel,
                EVENTSTORE,
                EVENTSTORE.methods_by_name["ReadAll"],
                (("authorization", value),),
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED, value


def test_health_and_reflection_are_open_without_a_token(auth_server):
    with grpc.insecure_channel(auth_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"lethedb.v1.EventStore", "lethedb.v1.Admin"} <= names


def test_refusals_name_the_role_but_never_echo_the_token(auth_server, tokens):
    reader = tokens["reader"]
    assert isinstance(reader, str)
    with lethedb.Client(auth_server.address, token=reader) as db:
        with pytest.raises(lethedb.PermissionDenied) as denied:
            db.append("never", [lethedb.Event("E", b"x")])
        assert "writer role" in str(denied.value)
        assert "test-reader" in str(denied.value)
        assert reader not in str(denied.value)
    with lethedb.Client(auth_server.address, token="lethedb_" + "B" * 43) as db:
        with pytest.raises(lethedb.Unauthenticated) as unknown:
            db.get_subject("someone")
        assert "B" * 43 not in str(unknown.value)


def test_append_batch_needs_the_writer_role_and_a_reader_token_writes_nothing(auth_server, tokens):
    reader = tokens["reader"]
    assert isinstance(reader, str)
    batch = eventstore_pb2.AppendBatchRequest(
        appends=[
            eventstore_pb2.AppendRequest(
                stream_id="batch-denied", events=[eventstore_pb2.ProposedEvent(event_type="E")]
            )
        ]
        * 2
    )
    with grpc.insecure_channel(auth_server.address) as channel:
        call = channel.unary_unary(
            "/lethedb.v1.EventStore/AppendBatch",
            request_serializer=eventstore_pb2.AppendBatchRequest.SerializeToString,
            response_deserializer=eventstore_pb2.AppendBatchResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as denied:
            call(batch, metadata=bearer(reader), timeout=5)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "writer role" in denied.value.details()

    async def coalesced_appends() -> list[BaseException | lethedb.AppendResult]:
        async with lethedb.AsyncClient(auth_server.address, token=reader) as db:
            return await asyncio.gather(
                *(db.append("batch-denied", lethedb.Event("E", b"x")) for _ in range(8)),
                return_exceptions=True,
            )

    outcomes = asyncio.run(coalesced_appends())
    assert all(isinstance(o, lethedb.PermissionDenied) for o in outcomes), outcomes
    admin = tokens["admin"]
    assert isinstance(admin, str)
    with (
        lethedb.Client(auth_server.address, token=admin) as db,
        pytest.raises(lethedb.StreamNotFound),
    ):
        list(db.read_stream("batch-denied"))


def test_forget_records_the_role_of_the_caller(auth_server, tokens):
    admin = tokens["admin"]
    assert isinstance(admin, str)
    with lethedb.Client(auth_server.address, token=admin) as db:
        receipt = db.forget_subject("subject-forgotten-by-role", reason="test")
        erasure = next(
            e for e in db.read_all(from_position=receipt.tombstone_position, max_count=1)
        )
    assert json.loads(erasure.data)["forgotten_by"] == "admin"


def test_sdk_clients_send_tokens_from_arguments_and_connection_strings(auth_server, tokens):
    writer = tokens["writer"]
    assert isinstance(writer, str)
    with lethedb.Client(auth_server.address, token=writer) as db:
        assert db.append("sdk-token-arg", [lethedb.Event("E", b"1")]).first_version == 0
    with lethedb.Client(f"lethedb://{auth_server.address}?token={writer}") as db:
        assert db.append("sdk-token-arg", [lethedb.Event("E", b"2")]).first_version == 1
        assert "token" not in repr(db)
        assert writer not in repr(db)

    async def main() -> None:
        async with lethedb.AsyncClient(auth_server.address, token=writer) as db:
            result = await db.append("sdk-token-arg", [lethedb.Event("E", b"3")])
            assert result.first_version == 2
        async with lethedb.AsyncClient(auth_server.address) as anonymous:
            with pytest.raises(lethedb.Unauthenticated):
                await anonymous.append("sdk-token-arg", [lethedb.Event("E", b"4")])

    import asyncio

    asyncio.run(main())


def test_token_cli_creates_lists_and_revokes_and_the_server_follows(tmp_path):
    path = tmp_path / "tokens.json"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lethedb_server", "token", *args,
             "--tokens-file", str(path)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip

    created = cli("create", "--role", "writer", "--name", "ingest")
    token = created.stdout.strip()
    assert token.startswith("lethedb_")
    assert len(token) > 40
    assert "shown only this once" in created.stderr
    assert token not in created.stderr
    stored = path.read_text()
    assert token not in stored
    assert '"role": "writer"' in stored
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert cli("list").stdout.split() == [
        "ingest",
        "writer",
        json.loads(stored)["tokens"][0]["created_at"],
    ]

    server = ServerProcess(tmp_path / "data", "--tokens-file", str(path)).start()
    try:
        with lethedb.Client(server.address, token=token, max_retries=0) as db:
            db.append("cli-token", [lethedb.Event("E", b"x")])
            cli("revoke", "ingest")
            deadline = time.monotonic() + 10
            while True:  # the server re-reads a changed tokens file within about a second
                try:
                    db.append("cli-token", [lethedb.Event("E", b"y")])
                except lethedb.Unauthenticated:
                    break
                assert time.monotonic() < deadline, "a revoked token was still accepted"
                time.sleep(0.2)
    finally:
        server.stop()


# --- TLS -----------------------------------------------------------------------------


def tls_args(pki: dict[str, Path], *, mtls: bool = False) -> list[str]:
    args = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"])]
    return args + (["--tls-client-ca", str(pki["ca"])] if mtls else [])


def health_code(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_a_tls_server_serves_tls_clients_and_refuses_plaintext(tmp_path, pki):
    credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
    server = ServerProcess(tmp_path / "data", *tls_args(pki), credentials=credentials).start()
    try:
        with grpc.insecure_channel(server.address) as plaintext:
            assert health_code(plaintext) == grpc.StatusCode.UNAVAILABLE
        port = server.address.rsplit(":", 1)[1]
        with lethedb.Client(f"lethedb://127.0.0.1:{port}?tls=true&ca={pki['ca']}") as db:
            db.append("tls-stream", [lethedb.Event("E", b"over tls")])
        with lethedb.Client(f"localhost:{port}", ca=pki["ca"], max_retries=0) as db:
            assert [e.data for e in db.read_stream("tls-stream")] == [b"over tls"]
        # Trusting another CA, the client refuses the server.
        with (
            lethedb.Client(
                server.address, ca=CertificateAuthority("other").pem, max_retries=0, timeout=5
            ) as db,
            pytest.raises(lethedb.Unavailable),
        ):
            db.get_subject("anyone")
    finally:
        server.stop()


def test_an_mtls_server_refuses_a_client_without_a_certificate(tmp_path, pki):
    with_cert = grpc.ssl_channel_credentials(
        pki["ca"].read_bytes(), pki["client_key"].read_bytes(), pki["client_cert"].read_bytes()
    )
    server = ServerProcess(
        tmp_path / "data", *tls_args(pki, mtls=True), credentials=with_cert
    ).start()
    try:
        without = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
        with grpc.secure_channel(server.address, without) as channel:
            assert health_code(channel) == grpc.StatusCode.UNAVAILABLE
        with grpc.secure_channel(server.address, with_cert) as channel:
            assert health_code(channel) == grpc.StatusCode.OK
        with lethedb.Client(
            server.address,
            ca=pki["ca"],
            client_cert=pki["client_cert"],
            client_key=pki["client_key"],
        ) as db:
            db.append("mtls-stream", [lethedb.Event("E", b"x")])
    finally:
        server.stop()


def test_replaced_certificate_files_are_used_for_new_connections(tmp_path, pki):
    directory = tmp_path / "live"
    # Each certificate comes from its own CA, so a client sees which one it got
    # by which CA it must trust.
    first = CertificateAuthority("first CA")
    second = CertificateAuthority("second CA")
    cert, key = first.issue("one", server=True).write(directory, "server")

    def trusts(ca_pem: bytes) -> grpc.StatusCode:
        # A channel of its own (own subchannel pool): a new connection, a new handshake.
        options = [("grpc.use_local_subchannel_pool", 1)]
        credentials = grpc.ssl_channel_credentials(ca_pem)
        with grpc.secure_channel(server.address, credentials, options=options) as channel:
            return health_code(channel)

    server = ServerProcess(
        tmp_path / "data",
        "--tls-cert", str(cert), "--tls-key", str(key),
        credentials=grpc.ssl_channel_credentials(first.pem),
    ).start()  # fmt: skip
    try:
        assert trusts(first.pem) == grpc.StatusCode.OK
        assert trusts(second.pem) == grpc.StatusCode.UNAVAILABLE
        second.issue("two", server=True).write(directory, "server")
        assert trusts(second.pem) == grpc.StatusCode.OK
        assert trusts(first.pem) == grpc.StatusCode.UNAVAILABLE
        # A half-written renewal (a key that does not match) keeps the last good pair.
        (directory / "server.key").write_bytes(first.issue("mismatch", server=True).key)
        assert trusts(second.pem) == grpc.StatusCode.OK
        # SIGHUP forces a re-read too.
        second.issue("three", server=True).write(directory, "server")
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGHUP)
        assert trusts(second.pem) == grpc.StatusCode.OK
    finally:
        server.stop()
    logs = server.logs()
    assert "TLS certificate reloaded" in logs
    assert "not usable; keeping the old ones" in logs
    assert "PRIVATE KEY" not in logs


# --- exposure --------------------------------------------------------------------------


def test_a_non_loopback_address_without_tls_and_tokens_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lethedb_server", "serve",
         "--data", str(tmp_path / "data"), "--listen", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0:0 without TLS and authentication tokens" in result.stderr
    assert not (tmp_path / "data").exists(), "nothing may be created before the check"


def test_insecure_serves_a_non_loopback_address_with_a_loud_warning(tmp_path):
    server = ServerProcess(tmp_path / "data", "--insecure").start(listen="0.0.0.0:0")
    try:
        with lethedb.Client(server.address.replace("0.0.0.0", "127.0.0.1")) as db:
            db.append("insecure", [lethedb.Event("E", b"x")])
    finally:
        server.stop()
    assert "INSECURE: serving 0.0.0.0:0 without TLS and authentication tokens" in server.logs()


def test_print_config_shows_paths_never_secrets(tmp_path, tokens):
    result = subprocess.run(
        [sys.executable, "-m", "lethedb_server", "serve", "--print-config",
         "--tokens-file", str(tokens["path"]), "--tls-key", "/etc/lethedb/server.key",
         "--insecure"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert f'tokens_file = "{tokens["path"]}"' in result.stdout
    assert 'tls_key = "/etc/lethedb/server.key"' in result.stdout
    assert "insecure = true" in result.stdout
    for role in ("reader", "writer", "admin"):
        assert str(tokens[role]) not in result.stdout
    assert "sha256" not in result.stdout


# --- logs --------------------------------------------------------------------------------


CANARY = "CANARY-5f1e-do-not-log"


def test_logs_of_a_full_workload_hold_no_payload_no_token_and_no_key(tmp_path, pki):
    """Append, read, stream, export, forget, shred, refusals, reload: grep the server log."""
    path = tmp_path / "tokens.json"
    admin, _ = create_token(path, "admin", "ops")
    reader, _ = create_token(path, "reader", "dashboard")
    bad = "lethedb_" + "Z" * 43
    credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
    server = ServerProcess(
        tmp_path / "data", *tls_args(pki), "--tokens-file", str(path),
        "--log-level", "debug", "--log-format", "json",
        credentials=credentials,
    ).start()  # fmt: skip
    subject = "subject-canary"
    try:
        with lethedb.Client(server.address, ca=pki["ca"], token=admin) as db:
            for i in range(5):
                db.append(
                    f"canary-{i}",
                    [lethedb.Event("Noted", {"text": f"{CANARY}-{i}"}, subject_id=subject,
                                   metadata={"note": CANARY})],
                )  # fmt: skip
            db.append_many(
                [lethedb.Append("canary-many", [lethedb.Event("Noted", CANARY.encode())])] * 3
            )
            assert any(CANARY in e.data.decode() for e in db.read_all())
            assert list(db.export_subject(subject))
            with pytest.raises(lethedb.WrongExpectedVersion):
                db.append("canary-0", [lethedb.Event("Noted", CANARY.encode())], expected_version=7)
            db.forget_subject(subject, reason="test")
            db.admin.shred()
        with (
            lethedb.Client(server.address, ca=pki["ca"], token=reader) as db,
            pytest.raises(lethedb.PermissionDenied),
        ):
            db.append("canary-x", [lethedb.Event("Noted", CANARY.encode())])
        with (
            lethedb.Client(server.address, ca=pki["ca"], token=bad, max_retries=0) as db,
            pytest.raises(lethedb.Unauthenticated),
        ):
            list(db.read_all())
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGHUP)
        time.sleep(0.2)
    finally:
        server.stop()
    logs = server.logs()
    assert "refused /lethedb.v1.EventStore/Append" in logs  # refusals are logged ...
    assert '"token_name": "dashboard"' in logs  # ... by token name
    forbidden = [CANARY, admin, reader, bad, "Bearer", "PRIVATE KEY"]
    forbidden += [json.loads(path.read_text())["tokens"][0]["sha256"]]
    found = [text for text in forbidden if text in logs]
    assert not found, f"the server log contains {found}"


def test_the_cli_sends_the_token_from_the_environment(auth_server, tokens):
    def cli(*args: str, token: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "LETHEDB_TOKEN"}
        if token is not None:
            env["LETHEDB_TOKEN"] = token
        return subprocess.run(
            [sys.executable, "-m", "lethedb_server", *args, "--server", auth_server.address],
            capture_output=True, text=True, timeout=60, check=False, env=env,
        )  # fmt: skip

    writer = tokens["writer"]
    assert isinstance(writer, str)
    ok = cli("append", "cli-with-token", "Noted", '{"n": 1}', token=writer)
    assert ok.returncode == 0, ok.stderr
    refused = cli("append", "cli-with-token", "Noted", '{"n": 2}', token=None)
    assert refused.returncode == 1
    assert "bearer token" in refused.stderr
