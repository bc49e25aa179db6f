"""The failover harness's own parts: the checks catch what they claim, the schedule
follows its seed, and a cut proxy partitions.

The failover test (test_failover_jepsen.py) passes only if its checks can
fail and replays only if its schedule follows its seed. These feed each check
the divergence it exists for (an acknowledged append missing, two events
acknowledged at one position, two leaders in one term, a subscriber gap, a
forgotten subject still readable), and send a TCP echo through a proxy that
is cut and healed.
"""

from __future__ import annotations

import random
import socket
import socketserver
import threading
import uuid
from collections.abc import Iterator

import pytest

from tests.faults.history import Ack, ForgetAck, History, Seen, event_id
from tests.faults.jepsen_checks import (
    LogEntry,
    Verdict,
    check_acknowledged_present,
    check_acks_agree,
    check_forgets_on_logs,
    check_nothing_unattempted,
    check_subscriber,
)
from tests.faults.nemesis import ACTIONS, schedule
from tests.faults.tcpproxy import ProxyLoop

# -- the checks ------------------------------------------------------------------------


def _history(*keys: tuple[str, int]) -> History:
    """A history that attempted each (key, number of events)."""
    history = History()
    for key, count in keys:
        history.attempted[key] = ("s", tuple(event_id(key, n) for n in range(count)))
    return history


def _ack(key: str, first: int, last: int, node: str = "a", term: int = 5) -> Ack:
    return Ack(key, first, last, False, node, term, 0.0)


def _log(history: History, *keys: str) -> list[LogEntry]:
    """The log holding *keys*' events in that order from position 1."""
    ids = [e for key in keys for e in history.attempted[key][1]]
    return [LogEntry(p, "s", e, "", False) for p, e in enumerate(ids, start=1)]


def _found(verdict: Verdict) -> set[str]:
    return {finding.check for finding in verdict.findings}


def test_a_consistent_history_has_no_findings() -> None:
    history = _history(("k1", 2), ("k2", 1))
    history.acks += [_ack("k1", 1, 2), _ack("k2", 3, 3)]
    log = _log(history, "k1", "k2")
    verdict = Verdict()
    check_acknowledged_present(history, {"n1": log, "n2": log}, verdict)
    check_nothing_unattempted(history, {"n1": log, "n2": log}, verdict)
    check_acks_agree(history, verdict)
    check_subscriber([Seen(e.position, e.event_id, False) for e in log], log, None, verdict)
    assert verdict.ok, verdict.findings


def test_an_acknowledged_append_missing_on_one_node_is_lost() -> None:
    history = _history(("k1", 1), ("k2", 1))
    history.acks += [_ack("k1", 1, 1), _ack("k2", 2, 2)]
    verdict = Verdict()
    check_acknowledged_present(
        history, {"n1": _log(history, "k1", "k2"), "n2": _log(history, "k1")}, verdict
    )
    assert _found(verdict) == {"lost"}
    assert "n2" in verdict.findings[0].what


def test_an_event_twice_in_a_log_is_a_duplicate() -> None:
    history = _history(("k1", 1))
    log = _log(history, "k1", "k1")
    verdict = Verdict()
    check_nothing_unattempted(history, {"n1": log}, verdict)
    assert _found(verdict) == {"duplicate"}


def test_an_event_nobody_appended_is_a_phantom() -> None:
    history = _history(("k1", 1))
    log = [*_log(history, "k1"), LogEntry(2, "s", uuid.uuid4(), "", False)]
    verdict = Verdict()
    check_nothing_unattempted(history, {"n1": log}, verdict)
    assert _found(verdict) == {"phantom"}


def test_two_keys_acknowledged_at_one_position_conflict() -> None:
    history = _history(("k1", 1), ("k2", 1))
    history.acks += [_ack("k1", 7, 7, node="a", term=5), _ack("k2", 7, 7, node="b", term=6)]
    verdict = Verdict()
    check_acks_agree(history, verdict)
    assert _found(verdict) == {"position"}


def test_two_nodes_acknowledging_in_one_term_is_two_leaders() -> None:
    history = _history(("k1", 1), ("k2", 1))
    history.acks += [_ack("k1", 1, 1, node="a"), _ack("k2", 2, 2, node="b")]
    verdict = Verdict()
    check_acks_agree(history, verdict)
    assert _found(verdict) == {"term"}


def test_an_acknowledgement_without_a_term_is_reported() -> None:
    history = _history(("k1", 1))
    history.acks.append(_ack("k1", 1, 1, term=0))
    verdict = Verdict()
    check_acks_agree(history, verdict)
    assert _found(verdict) == {"term"}


def test_a_subscriber_gap_is_reported() -> None:
    history = _history(("k1", 1), ("k2", 1), ("k3", 1))
    log = _log(history, "k1", "k2", "k3")
    seen = [Seen(e.position, e.event_id, False) for e in log if e.position != 2]
    verdict = Verdict()
    check_subscriber(seen, log, None, verdict)
    assert _found(verdict) == {"subscriber"}


def test_a_forgotten_subject_readable_on_a_node_is_reported() -> None:
    history = _history(("k1", 1))
    history.forgets.append(ForgetAck("p1", 9, "a", 5, 0.0))
    event = history.attempted["k1"][1][0]
    verdict = Verdict()
    check_forgets_on_logs(
        history,
        {"n1": [LogEntry(1, "s", event, "p1", True)], "n2": [LogEntry(1, "s", event, "p1", False)]},
        verdict,
    )
    assert _found(verdict) == {"forget"}
    assert "n2" in verdict.findings[0].what


# -- the schedule ---------------------------------------------------------------------


def test_the_schedule_is_replayed_from_its_seed() -> None:
    """The same seed gives the same faults in the same order, each about as often."""
    plan = schedule(random.Random(7), 30)
    assert plan == schedule(random.Random(7), 30)
    assert sorted(set(plan)) == sorted(ACTIONS)
    assert {plan.count(action) for action in ACTIONS} == {6}


# -- the proxy ---------------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    conn = socket.create_connection((host, int(port)), timeout=5)
    conn.settimeout(0.5)
    return conn


def test_a_cut_proxy_holds_bytes_until_healed(echo: str) -> None:
    loop = ProxyLoop()
    try:
        proxy = loop.proxy("echo", echo)
        with _connect(proxy.address) as conn:
            conn.sendall(b"before")
            assert conn.recv(100) == b"before"
            loop.cut(proxy)
            conn.sendall(b"during")
            with pytest.raises(TimeoutError):
                conn.recv(100)
            with _connect(proxy.address) as late:  # accepted, but nothing gets through
                late.sendall(b"late")
                with pytest.raises(TimeoutError):
                    late.recv(100)
                loop.heal(proxy)
                late.settimeout(5)
                assert late.recv(100) == b"late"
            conn.settimeout(5)
            assert conn.recv(100) == b"during"
    finally:
        loop.close()
