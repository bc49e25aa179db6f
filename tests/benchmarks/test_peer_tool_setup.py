"""The peer benchmark refuses to start without a peer's Python client, and says how to get it."""

from __future__ import annotations

import pytest

from benchmarks.peers import servers


def test_a_missing_peer_client_stops_the_run_before_any_work_naming_the_install(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setitem(servers.CLIENT_MODULES, "postgres", "no_such_client_module_0f1e")

    with pytest.raises(SystemExit) as exit_:
        servers.ensure_clients(["redis", "postgres"])

    message = str(exit_.value.code)
    assert "no_such_client_module_0f1e" in message
    assert "pip install -e '.[bench]'" in message


def test_lethedb_alone_needs_no_peer_client():
    servers.ensure_clients([])
