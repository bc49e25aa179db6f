"""Failover under faults, Jepsen-style: nothing acknowledged is lost, forked or duplicated.

A real etcd and three real nodes on loopback (``--sync-replicas 1``, a 2 s
lease), 8 writers appending through one SDK client that knows every node
(an idempotency key on every append, every acknowledgement recorded off the
wire with the node and term that gave it), and one subscriber over every
node. For at least 30 rounds the leader is SIGKILLed (and restarted),
SIGSTOPped past its lease, cut off from its followers (alone, or from etcd
too) through TCP proxies between the nodes, or etcd is restarted; every
third round forgets a data subject just before the fault
(tests/faults/nemesis.py). Then the writers stop and tests/faults/jepsen_checks.py
judges the history against each node's log, read live and then, the nodes
stopped, byte for byte from their files.

The schedule comes from a seed, printed at the start and in the report;
``LETHEDB_FAILOVER_SEED`` replays it and ``LETHEDB_FAILOVER_ROUNDS`` changes
the number of rounds. On failure the report names the round and the fault
each divergence followed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.etcdproc import etcd_binary
from tests.faults.failover_cluster import ClusterSettings, FailoverCluster
from tests.faults.history import History, Load
from tests.faults.jepsen_checks import (
    LogEntry,
    Verdict,
    check_acknowledged_present,
    check_acks_agree,
    check_forgets_on_logs,
    check_nothing_unattempted,
    check_stopped_nodes,
    check_subscriber,
    read_log,
    report,
)
from tests.faults.nemesis import Nemesis, RoundFailed, schedule, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROUNDS = int(os.environ.get("LETHEDB_FAILOVER_ROUNDS", "30"))
WRITERS = 8
DRAIN_TIMEOUT = 60.0


def _seed() -> int:
    given = os.environ.get("LETHEDB_FAILOVER_SEED")
    return int(given) if given else random.SystemRandom().randrange(2**32)


def test_acknowledged_writes_survive_failovers(tmp_path: Path) -> None:
    seed = _seed()
    print(f"failover run: seed {seed}, {ROUNDS} rounds")
    rng = random.Random(seed)
    history = History()
    with FailoverCluster(tmp_path, etcd_binary(), ClusterSettings()) as cluster:
        load = Load(
            cluster.target, cluster.tokens.admin, history, cluster.names, writers=WRITERS
        ).start()
        nemesis = Nemesis(cluster, load, rng)
        try:
            nemesis.run(schedule(rng, ROUNDS))
            load.stop_writers()
            nemesis.settle("the cluster settling after the last round")
        except RoundFailed as failure:
            load.close()
            pytest.fail(
                report(
                    seed,
                    nemesis.rounds,
                    Verdict(),
                    failure=str(failure),
                    cluster=cluster.describe() + _log_tails(cluster),
                    history=history,
                ),
                pytrace=False,
            )
        verdict = judge(cluster, load, history)
        description = cluster.describe()
        cluster.stop_all()
        check_stopped_nodes(history, _files(cluster), verdict)
        text = report(seed, nemesis.rounds, verdict, cluster=description, history=history)
        print(text)
        if not verdict.ok:
            pytest.fail(text, pytrace=False)
        assert len(nemesis.rounds) >= ROUNDS
        assert history.acks, "no write was acknowledged"


def judge(cluster: FailoverCluster, load: Load, history: History) -> Verdict:
    """Once the writers stopped and the cluster settled: the live checks, every node's log
    read whole (the subscriber drained to the head first)."""
    verdict = Verdict()
    if not _within(lambda: _same_heads(cluster), DRAIN_TIMEOUT):
        verdict.add("heads", f"the nodes stay at different heads: {_same_heads(cluster)[1]}")
    leader = _leader_name(cluster)
    logs: dict[str, list[LogEntry]] = {}
    unreadable_from: dict[str, int] = {}
    for node in cluster.nodes:
        logs[node.name], unreadable = read_log(node.address, cluster.metadata)
        if unreadable:
            log = logs[node.name]
            unreadable_from[node.name] = log[-1].position + 1 if log else 1
            verdict.add("unreadable", f"{node.name} stopped reading its log: {unreadable}")
    head = max((log[-1].position for log in logs.values() if log), default=0)
    if not _within(lambda: (load.subscriber.position >= head, ""), DRAIN_TIMEOUT):
        verdict.add("subscriber", f"stopped at {load.subscriber.position}, the head is {head}")
    load.close()
    check_acknowledged_present(history, logs, verdict, unreadable_from)
    check_nothing_unattempted(history, logs, verdict)
    check_acks_agree(history, verdict)
    # Against the leader's log, or a node's that reads whole when the leader's does not.
    whole = [name for name in (leader, *logs) if name not in unreadable_from]
    reference = whole[0] if whole else max(logs, key=lambda name: len(logs[name]))
    check_subscriber(
        load.subscriber.seen,
        logs[reference],
        load.subscriber.error,
        verdict,
        whole=reference not in unreadable_from,
    )
    check_forgets_on_logs(history, logs, verdict)
    return verdict


def _within(condition: Callable[[], tuple[bool, str]], timeout: float) -> bool:
    try:
        wait_for(condition, "", timeout)
    except RoundFailed:
        return False
    return True


def _files(cluster: FailoverCluster) -> dict[str, tuple[Path, Path]]:
    return {node.name: (node.data_dir, node.keyring) for node in cluster.nodes}


def _leader_name(cluster: FailoverCluster) -> str:
    leader = cluster.etcd_leader()
    assert leader is not None, "etcd holds no leader after the cluster settled"
    return leader.node_id


def _same_heads(cluster: FailoverCluster) -> tuple[bool, str]:
    positions = {
        name: status.position if status is not None else None
        for name, status in cluster.statuses().items()
    }
    return len(set(positions.values())) == 1 and None not in positions.values(), str(positions)


def _log_tails(cluster: FailoverCluster) -> str:
    return "".join(f"\n--- {n.name} log:\n{n.logs(2500)}" for n in cluster.nodes)
