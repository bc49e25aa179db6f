"""The Prometheus endpoint after a known workload: every counter matches the work done."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import lethedb
from lethedb_server.api.tokens import create_token
from tests.integration.serverproc import ServerProcess
from tests.ports import free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):  # raises if the format is broken
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def metrics_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, int, str]]:
    tokens = tmp_path / "tokens.json"
    admin, _ = create_token(tokens, "admin", "metrics-test")
    port = free_port()
    proc = ServerProcess(
        tmp_path / "data", "--metrics-port", str(port), "--tokens-file", str(tokens)
    ).start()
    yield proc, port, admin
    proc.stop()


def test_metrics_count_the_work_done_and_parse(metrics_server):
    server, port, admin = metrics_server
    appended_bytes = 0
    with lethedb.Client(server.address, token=admin) as db:
        for i in range(5):
            events = [
                lethedb.Event("Measured", b"d" * (10 * i + 1), metadata=b"mmm", subject_id="s-1"),
                lethedb.Event("Measured", b"e" * 7),
            ]
            db.append(f"metrics-{i}", events)
            appended_bytes += (10 * i + 1) + 3 + 7
        keyed = [lethedb.Event("Keyed", b"k" * 100)]
        first = db.append("metrics-keyed", keyed, idempotency_key="metrics-key")
        retry = db.append("metrics-keyed", keyed, idempotency_key="metrics-key")
        assert retry.deduplicated
        assert retry.first_position == first.first_position
        appended_bytes += 100
        with pytest.raises(lethedb.WrongExpectedVersion):
            db.append("metrics-0", [lethedb.Event("Late", b"x")], expected_version=0)
        db.forget_subject("s-1", reason="test")
        db.admin.shred()
    with (
        lethedb.Client(server.address, max_retries=0) as anonymous,
        pytest.raises(lethedb.Unauthenticated),  # refused: no token
    ):
        anonymous.get_subject("s-1")

    text, samples = scrape(port)
    assert value(samples, "lethedb_appends_total") == 6
    assert value(samples, "lethedb_appends_deduplicated_total") == 1
    assert value(samples, "lethedb_events_appended_total") == 11
    assert value(samples, "lethedb_appended_bytes_total") == appended_bytes
    assert value(samples, "lethedb_append_errors_total", error="WrongExpectedVersion") == 1
    assert value(samples, "lethedb_append_latency_seconds_count") == 7  # 6 written + 1 retry
    assert value(samples, "lethedb_append_latency_seconds_bucket", le="+Inf") == 7
    # 6 appends, the retry, the refused append and the forget went through the writer.
    assert value(samples, "lethedb_batch_commands_sum") == 9
    batches = value(samples, "lethedb_batch_commands_count")
    assert 1 <= batches <= 9
    assert value(samples, "lethedb_commit_seconds_count") == batches
    assert value(samples, "lethedb_commit_seconds_sum") > 0
    assert value(samples, "lethedb_forgets_total") == 1
    assert value(samples, "lethedb_shred_epochs_total") == 1
    assert value(samples, "lethedb_head_position") == 11 + 1  # and the erasure event
    assert value(samples, "lethedb_writer_queue_depth") == 0
    assert value(samples, "lethedb_refused_calls_total", reason="missing_token") == 1
    assert (
        value(samples, "lethedb_dek_cache_hits_total")
        + value(samples, "lethedb_dek_cache_misses_total")
        >= 0
    )
    assert value(samples, "lethedb_subscribers") == 0
    assert value(samples, "lethedb_subscriber_lag_max_events") == 0
    for env in ("log", "keys"):
        assert value(samples, "lethedb_lmdb_map_size_bytes", env=env) > 0
        assert (
            0
            < value(samples, "lethedb_lmdb_used_bytes", env=env)
            <= value(samples, "lethedb_lmdb_map_size_bytes", env=env)
        )
        assert value(samples, "lethedb_file_size_bytes", file=f"{env}/data.mdb") > 0
    assert value(samples, "process_resident_memory_bytes") > 0
    # No client-chosen text reaches a label or a value.
    for private in ("metrics-0", "s-1", "Measured", "metrics-key", "metrics-test", admin):
        assert private not in text


def test_the_metrics_endpoint_is_off_by_default(tmp_path):
    port = free_port()
    server = ServerProcess(tmp_path / "data").start()
    try:
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    finally:
        server.stop()
    assert "Prometheus metrics on" not in server.logs()
