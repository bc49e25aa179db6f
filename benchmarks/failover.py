"""Failover benchmark: how long the cluster cannot acknowledge a write when its leader dies.

Run ``python -m benchmarks.failover`` (``make bench-failover``), or
``--quick`` for a run of about a minute. A real etcd and three ``lethedb
serve --cluster`` nodes on loopback (``--sync-replicas 1``), 8 writers
appending through the SDK with an idempotency key on every append, the
machinery of the failover fault test (tests/faults/: the cluster, the
acknowledgements recorded off the wire, the checks). Then, ``--rounds``
times: wait until one leader leads with both followers caught up, let the
writers run a random while, SIGKILL the leader, and once another node leads,
restart the killed one.

* **Failover time** of a round: from the SIGKILL to the first append
  acknowledged by another node in a later term (as its ``lethedb-term``
  trailer says), p50/p99/max over the rounds. Target: p99 under twice the
  lease TTL. It includes everything a client sees: the lease running out in
  etcd, the election, the new leader's promotion, its followers reconnecting
  (an append needs one follower with ``--sync-replicas 1``), and the SDK
  finding the new leader.
* **Append rate** during the rounds (faults included), against the rate of
  the same writers on the same cluster before the first fault, as a ratio.
* **Acknowledged writes lost**: after the rounds every acknowledged append
  must be on every node at the position it was acknowledged with, once, and
  the stopped nodes' logs must be identical byte for byte and pass the
  offline verify (tests/faults/jepsen_checks.py). Target: zero, in every round.

It prints a Markdown report and writes it to ``benchmarks/results/failover-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import shutil
import sys
import time
from collections import Counter

from benchmarks.harness import temp_root
from benchmarks.report import (
    add_output_args,
    command_line,
    environment,
    environment_section,
    percentile_ms,
    publish,
)
from tests.faults.failover_cluster import ClusterSettings, FailoverCluster
from tests.faults.history import History, Load
from tests.faults.jepsen_checks import (
    Verdict,
    check_acknowledged_present,
    check_acks_agree,
    check_nothing_unattempted,
    check_stopped_nodes,
    read_log,
    round_of,
)
from tests.faults.nemesis import Nemesis, Round, schedule, wait_for

DRAIN_TIMEOUT = 60.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 rounds, a short baseline")
    p.add_argument("--rounds", type=int, default=20, help="leader SIGKILLs (default 20)")
    p.add_argument("--lease-ttl", type=int, default=2, help="lease TTL, whole seconds")
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--baseline", type=float, default=10.0, help="seconds before the first fault")
    p.add_argument("--seed", type=int, default=None, help="the schedule's seed (default: random)")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.baseline = min(args.rounds, 5), min(args.baseline, 4.0)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    etcd = shutil.which("etcd")
    if etcd is None:
        print("etcd is not installed: apt-get install etcd-server", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    rng = random.Random(args.seed)
    history = History()
    settings = ClusterSettings(lease_ttl_s=args.lease_ttl)
    print(f"failover benchmark: seed {args.seed}, {args.rounds} rounds", flush=True)
    with temp_root(args.tmp_dir, prefix="lethedb-failover-") as root:
        env = environment(root)
        with FailoverCluster(root, etcd, settings) as cluster:
            load = Load(
                cluster.target, cluster.tokens.admin, history, cluster.names, writers=args.writers
            )
            nemesis = Nemesis(cluster, load.start(), rng, forget_every=10**9)
            nemesis.settle("the cluster settling before the baseline")
            base_from = time.monotonic()
            time.sleep(args.baseline)
            base = (base_from, time.monotonic())
            rounds = nemesis.run(schedule(rng, args.rounds, ("kill",)))
            during = (rounds[0].fault_at, rounds[-1].ended)
            load.stop_writers()
            nemesis.settle("the cluster settling after the last round")
            verdict = final_checks(cluster, history)
            load.close()
            cluster.stop_all()
            files = {node.name: (node.data_dir, node.keyring) for node in cluster.nodes}
            check_stopped_nodes(history, files, verdict)
    text = report(args, settings, env, history, rounds, base, during, verdict, started)
    publish(text, "failover", started, args)
    return 0 if verdict.ok else 1


def final_checks(cluster: FailoverCluster, history: History) -> Verdict:
    """Every acknowledged append on every node, once, where it was acknowledged."""

    def same_heads() -> tuple[bool, str]:
        positions = {n: s.position if s else None for n, s in cluster.statuses().items()}
        return len(set(positions.values())) == 1, str(positions)

    wait_for(same_heads, "every node at the same head", DRAIN_TIMEOUT)
    verdict = Verdict()
    logs = {}
    unreadable_from: dict[str, int] = {}
    for node in cluster.nodes:
        logs[node.name], unreadable = read_log(node.address, cluster.metadata)
        if unreadable:
            log = logs[node.name]
            unreadable_from[node.name] = log[-1].position + 1 if log else 1
            verdict.add("unreadable", f"{node.name} stopped reading its log: {unreadable}")
    check_acknowledged_present(history, logs, verdict, unreadable_from)
    check_nothing_unattempted(history, logs, verdict)
    check_acks_agree(history, verdict)
    return verdict


def rate(history: History, window: tuple[float, float]) -> float:
    """Appends first acknowledged in *window*, per second (a deduplicated retry counts once)."""
    first: dict[str, float] = {}
    for ack in history.acks:
        first.setdefault(ack.key, ack.at)
    count = sum(1 for at in first.values() if window[0] <= at < window[1])
    return count / max(1e-9, window[1] - window[0])


def report(
    args: argparse.Namespace,
    settings: ClusterSettings,
    env: dict[str, str],
    history: History,
    rounds: list[Round],
    base: tuple[float, float],
    during: tuple[float, float],
    verdict: Verdict,
    started: dt.datetime,
) -> str:
    times = [r.failover_s for r in rounds if r.failover_s is not None]
    target = 2 * settings.lease_ttl_s
    ns = [round(t * 1e9) for t in times]
    p50, p99 = percentile_ms(ns, 0.5) / 1000, percentile_ms(ns, 0.99) / 1000
    base_rate, during_rate = rate(history, base), rate(history, during)
    lost_at = {f.key: f.at for f in verdict.findings if f.check == "lost"}
    lost = list(lost_at)
    lost_rounds = Counter(round_of(at, rounds) for at in lost_at.values())
    others = [f for f in verdict.findings if f.check != "lost"]
    lines = [
        f"# Failover benchmark ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"{len(rounds)} rounds of leader SIGKILL on a 3-node cluster (etcd on loopback,"
        f" lease TTL {settings.lease_ttl_s} s, `--sync-replicas {settings.sync_replicas}`),"
        f" {args.writers} SDK writers appending throughout; seed {args.seed}.",
        "",
        "| | measured | target | |",
        "|---|---|---|---|",
        f"| failover p50 | {p50:.2f} s | | |",
        f"| failover p99 | {p99:.2f} s | < {target} s (2x TTL) | {_ok(p99 < target)} |",
        f"| failover max | {max(times):.2f} s | | |",
        f"| appends/s before the faults | {base_rate:.0f} | | |",
        f"| appends/s during the rounds | {during_rate:.0f}"
        f" ({during_rate / max(base_rate, 1e-9):.2f}x) | | |",
        f"| acknowledged appends | {len({a.key for a in history.acks})} | | |",
        f"| acknowledged appends lost | {len(lost)} | 0 | {_ok(not lost)} |",
        f"| other divergences | {len(others)} | 0 | {_ok(not others)} |",
        "",
        "Failover time: SIGKILL of the leader to the first append acknowledged by another"
        " node in a later term. The append rate counts each append once, when first"
        " acknowledged; the rate during the rounds includes the failovers.",
        "",
        "| round | killed | term before | new leader | term after | failover |",
        "|---|---|---|---|---|---|",
    ]
    for r in rounds:
        failover = f"{r.failover_s:.2f} s" if r.failover_s is not None else "-"
        lines.append(
            f"| {r.number} | {r.target} | {r.term_before} | {r.leader_after} |"
            f" {r.term_after} | {failover} |"
        )
    if lost or others:
        lines += ["", "## Divergences", ""]
        lines += [f"* {where}: {n} acknowledged append(s) lost" for where, n in lost_rounds.items()]
        lines += [f"* [{round_of(f.at, rounds)}] {f.check}: {f.what}" for f in others[:20]]
    lines += [
        "",
        f"Writers' errors (retried with the same key): {dict(history.errors) or 'none'}.",
        *environment_section(env),
        "",
        command_line("benchmarks.failover"),
    ]
    return "\n".join(lines) + "\n"


def _ok(passed: bool) -> str:
    return "met" if passed else "**missed**"


if __name__ == "__main__":
    raise SystemExit(main())
