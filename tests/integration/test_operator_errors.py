"""Errors a person can act on: the CLI and the SDK against real servers and real files.

Each failure ends in one line naming the cause (and the option to change),
never a traceback or gRPC's own text, and a refused start creates nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

import lethedb
from lethedb.v1 import admin_pb2, admin_pb2_grpc
from lethedb_server.api.tokens import create_token
from tests.integration.pki import CertificateAuthority
from tests.integration.serverproc import ServerProcess
from tests.ports import free_port

CLI = [sys.executable, "-m", "lethedb_server"]
#: The environment of a process started the way an operator starts one: no
#: gRPC debugging variables inherited from whoever runs the tests.
PLAIN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_VERB")}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, check=False,
        env=PLAIN_ENV if env is None else env,
    )  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line on stderr (no traceback, no gRPC log line), without its newline."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lethedb: "), result.stderr
    return lines[0]


# --- start-up: nothing is created when the server cannot start ---------------------------


def test_a_busy_port_is_one_line_exit_2_and_creates_nothing(server, tmp_path):
    data = tmp_path / "second"
    result = cli("serve", "--data", str(data), "--listen", server.address)
    assert result.returncode == 2, result.stderr
    assert one_error_line(result) == f"lethedb: address {server.address} is in use"
    assert not data.exists()


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--subject-id-pattern", "([a-z]", "subject_id_pattern"),
        ("--max-event-bytes", "0", "max_event_bytes"),
        ("--listen", "localhost", "listen"),
    ],
)
def test_a_bad_option_is_one_line_naming_it_and_creates_nothing(tmp_path, flag, value, named):
    data = tmp_path / "data"
    result = cli("serve", "--data", str(data), flag, value)
    assert result.returncode == 2, result.stderr
    assert named in one_error_line(result)
    assert not data.exists()


def test_print_config_shows_the_keyring_path_actually_used(tmp_path):
    result = cli("serve", "--data", str(tmp_path / "d"), "--print-config")
    assert result.returncode == 0, result.stderr
    assert f'keyring = "{tmp_path / "d" / "master.keyring"}"' in result.stdout.splitlines()


def test_a_unix_socket_is_served_and_its_path_is_the_ready_address(tmp_path):
    sock = tmp_path / "lethedb.sock"
    proc = ServerProcess(tmp_path / "data")
    try:
        # It waits for the address in the ready file and checks health on it.
        proc.start(listen=f"unix:{sock}")
        assert proc.address == f"unix:{sock}"
        with lethedb.Client(proc.address) as db:
            assert db.append("over-unix", lethedb.Event("E", b"x")).first_version == 0
        again = cli("serve", "--data", str(tmp_path / "other"), "--listen", f"unix:{sock}")
        assert again.returncode == 2
        assert "in use" in one_error_line(again)
        assert not (tmp_path / "other").exists()
        with lethedb.Client(proc.address) as db:  # the running server kept its socket
            assert [e.data for e in db.read_stream("over-unix")] == [b"x"]
    finally:
        proc.stop()  # also when start() failed, which leaves the process running


# --- output ---------------------------------------------------------------------------------


def test_a_closed_stdout_is_a_normal_end(server):
    """``lethedb stats | head -1``: the reader is gone before the command writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [*CLI, "stats", "--server", server.address],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, env=PLAIN_ENV,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 0


def test_version():
    result = cli("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"lethedb \d+\.\d+\.\d+\S*\n", result.stdout)


def test_read_prints_iso_times_with_nanoseconds_as_an_extra_field(server, stream_id):
    with lethedb.Client(server.address) as db:
        db.append(stream_id, lethedb.Event("E", {"a": 1}))
    result = cli("read", stream_id, "--server", server.address)
    assert result.returncode == 0, result.stderr
    event = json.loads(result.stdout)
    recorded = datetime.fromisoformat(event["recorded_at"])
    assert recorded.tzinfo is not None
    assert abs(recorded.timestamp() - event["recorded_at_ns"] / 1e9) < 1e-5


# --- subjects and legal holds ---------------------------------------------------------------


def test_a_subject_without_events_is_unknown_and_forget_needs_force(server, stream_id):
    typo = f"usr-{stream_id}"
    shown = cli("subject", typo, "--server", server.address)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "unknown"

    refused = cli("forget", typo, "--server", server.address)
    assert refused.returncode == 2
    assert "--force" in one_error_line(refused)
    with lethedb.Client(server.address) as db:
        assert db.get_subject(typo).state is lethedb.SubjectState.ACTIVE  # nothing recorded

    forced = cli("forget", typo, "--force", "--server", server.address)
    assert forced.returncode == 0, forced.stderr
    receipt = json.loads(forced.stdout)
    assert receipt["state"] == "forgotten_pending_shred"
    assert receipt["event_count"] == 0


def test_legal_hold_until_must_be_an_iso_date_in_the_future(server, stream_id):
    subject = f"held-{stream_id}"
    words = cli("legal-hold", "set", subject, "--reason", "case", "--until", "tomorrow",
                "--server", server.address)  # fmt: skip
    assert words.returncode != 0
    assert "ISO 8601" in one_error_line(words)

    past = cli("legal-hold", "set", subject, "--reason", "case", "--until", "2001-01-01",
               "--server", server.address)  # fmt: skip
    assert past.returncode != 0
    assert "in the past" in one_error_line(past)
    with lethedb.Client(server.address) as db:
        assert db.get_subject(subject).legal_hold is None


def test_the_server_refuses_a_legal_hold_that_ended_already(server, stream_id):
    """Clients other than the CLI meet the same rule, as INVALID_ARGUMENT."""
    past = int((datetime.now(UTC) - timedelta(days=1)).timestamp() * 1e9)
    with grpc.insecure_channel(server.address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SetLegalHold(
                admin_pb2.SetLegalHoldRequest(subject_id=stream_id, reason="x", until=past),
                timeout=10,
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "in the past" in refused.value.details()


def test_the_legal_hold_error_prints_a_date(server, stream_id):
    subject = f"held-{stream_id}"
    with lethedb.Client(server.address) as db:
        db.append(stream_id, lethedb.Event("E", b"x", subject_id=subject))
    held = cli("legal-hold", "set", subject, "--reason", "case-42", "--until", "2099-01-01",
               "--server", server.address)  # fmt: skip
    assert held.returncode == 0, held.stderr
    assert json.loads(held.stdout)["legal_hold"]["until"] == "2099-01-01T00:00:00Z"
    forget = cli("forget", subject, "--server", server.address)
    assert forget.returncode == 1
    assert "until 2099-01-01T00:00:00Z" in one_error_line(forget)


# --- the SDK's errors -----------------------------------------------------------------------


def test_a_message_over_the_servers_limit_is_request_too_large(tmp_path):
    proc = ServerProcess(tmp_path / "data", "--max-message-bytes", "65536").start()
    try:
        with lethedb.Client(proc.address, max_retries=0) as db:
            with pytest.raises(lethedb.RequestTooLarge) as refused:
                db.append("big", lethedb.Event("E", b"x" * 100_000))
            assert not isinstance(refused.value, lethedb.StorageFull)
            assert refused.value.limit == 65536
            assert refused.value.size is not None
            assert refused.value.size > 100_000
            assert "65536" in str(refused.value)
            assert str(refused.value.size) in str(refused.value)
            assert list(db.read_all()) == []
    finally:
        proc.stop()


def test_a_stopped_server_is_named_with_a_hint(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    with (
        lethedb.Client(address, max_retries=0, timeout=5) as db,
        pytest.raises(lethedb.Unavailable) as refused,
    ):
        db.get_subject("anyone")
    assert str(refused.value).startswith(f"no LetheDB server at {address} (connection refused)")
    assert "lethedb serve" in str(refused.value)

    result = cli("stats", "--server", address, "--timeout", "5")
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.startswith(f"lethedb: no LetheDB server at {address} (connection refused)")
    assert "--server" in line


def start_tls_server(directory: Path) -> ServerProcess:
    """A TLS server logging JSON, started as an operator would (no GRPC_VERBOSITY)."""
    ca = CertificateAuthority()
    cert, key = ca.issue("lethedb-server", server=True).write(directory, "server")
    return ServerProcess(
        directory / "data", "--tls-cert", str(cert), "--tls-key", str(key),
        "--log-format", "json",
        env=PLAIN_ENV, credentials=grpc.ssl_channel_credentials(ca.pem),
    ).start()  # fmt: skip


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_tls_server(tmp_path_factory.mktemp("tls"))
    yield proc
    proc.stop()


def test_tls_mismatches_are_one_line_naming_the_cause(tls_server):
    proc = tls_server
    with (
        lethedb.Client(proc.address, max_retries=0, timeout=5) as plaintext,
        pytest.raises(lethedb.Unavailable) as refused,
    ):
        plaintext.get_subject("anyone")
    assert "TLS expected" in str(refused.value)
    with (
        lethedb.Client(proc.address, tls=True, max_retries=0, timeout=5) as without_ca,
        pytest.raises(lethedb.Unavailable) as refused,
    ):
        without_ca.get_subject("anyone")
    assert "certificate verify failed" in str(refused.value)

    plain = cli("stats", "--server", proc.address, "--timeout", "5")
    assert "TLS expected" in one_error_line(plain)
    port = proc.address.rsplit(":", 1)[1]
    no_ca = cli("stats", "--server", f"lethedb://127.0.0.1:{port}?tls=true", "--timeout", "5")
    assert "certificate verify failed" in one_error_line(no_ca)


def test_the_server_log_stays_well_formed_under_bad_handshakes(tmp_path):
    proc = start_tls_server(tmp_path)
    for _ in range(3):
        with (
            lethedb.Client(proc.address, max_retries=0, timeout=5) as plaintext,
            pytest.raises(lethedb.Unavailable),
        ):
            plaintext.get_subject("anyone")
    proc.stop()  # every line is written once the process has exited
    lines = proc.logs().splitlines()
    assert lines
    for line in lines:
        record = json.loads(line)  # a raw gRPC C-core line is not JSON
        assert "msg" in record or "message" in record, line


def test_cli_authentication_errors_point_to_cli_options(tmp_path):
    tokens = tmp_path / "tokens.json"
    create_token(tokens, "admin", "ops")
    proc = ServerProcess(tmp_path / "data", "--tokens-file", str(tokens)).start()
    try:
        env = {k: v for k, v in PLAIN_ENV.items() if k != "LETHEDB_TOKEN"}
        missing = cli("stats", "--server", proc.address, env=env)
        assert missing.returncode == 1
        line = one_error_line(missing)
        assert "LETHEDB_TOKEN" in line
        assert "--token" in line
        assert "metadata" not in line
        wrong = cli("stats", "--server", proc.address, env={**env, "LETHEDB_TOKEN": "lethedb_x"})
        line = one_error_line(wrong)
        assert "LETHEDB_TOKEN" in line
        assert "metadata" not in line
    finally:
        proc.stop()


# --- verify and Ctrl-C ----------------------------------------------------------------------


def test_ctrl_c_during_verify_ends_the_progress_line(tmp_path):
    """On a terminal the progress line is rewritten in place; Ctrl-C must still end it."""
    import pty

    from lethedb_server.engine.model import AppendCommand, ProposedEvent
    from lethedb_server.engine.store import Store, StoreOptions

    data, keyring = tmp_path / "data", tmp_path / "master.keyring"
    event = ProposedEvent(b"", "E", "", "", b"x" * 32, b"")
    with Store.open(data, StoreOptions(keyring_path=keyring)) as store:
        for chunk in range(4):  # within the writer's limit on events in flight
            futures = [
                store.writer.submit(AppendCommand(f"s{chunk}-{i}", (event,) * 500))
                for i in range(100)
            ]
            for future in futures:
                future.result()
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [*CLI, "verify", "--data", str(data), "--keyring", str(keyring)],
        stdin=terminal, stdout=subprocess.PIPE, stderr=terminal, env=PLAIN_ENV,
    )  # fmt: skip
    os.close(terminal)
    shown = b""
    try:
        while b"events/s" not in shown:
            shown += os.read(controller, 4096)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
    text = shown.decode()
    assert "Traceback" not in text
    progress, _, after = text.rpartition("(interrupted)")
    assert progress, text
    assert after.startswith("\r\n"), text  # the line ends where the work stopped
    assert after.strip() == "lethedb: interrupted"
