"""The faults of a failover run, round by round, from one seed.

Each round waits for the cluster to settle (one leader, every other node
following it, caught up), lets the load run a random while, sometimes forgets
a data subject, then does one thing to the leader etcd names:

* ``kill``: SIGKILL, and once another node leads, start it again;
* ``pause``: SIGSTOP for longer than the lease, then SIGCONT;
* ``isolate``: cut its replication links for longer than the lease, then heal;
* ``isolate-all``: the same with its etcd link cut too (a full partition);
* ``etcd-restart``: stop etcd, keep it down a while, start it again.

A round ends once the cluster has settled again and acknowledged a write
after the fault; a forget made before the fault must then hold on the leader.
Every choice (the action, the waits, the subject) comes from one
``random.Random(seed)``, and each round is logged as it starts, so a failed
run can be read and replayed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import lethedb
from tests.faults.failover_cluster import ClusterNode, FailoverCluster
from tests.faults.history import History, Load

ACTIONS = ("kill", "pause", "isolate", "isolate-all", "etcd-restart")
#: How long a round may wait for the cluster to settle or to acknowledge a write.
SETTLE_TIMEOUT = 45.0


class RoundFailed(AssertionError):
    """The cluster did not recover from a round's fault in time."""


@dataclass
class Round:
    number: int
    action: str
    target: str = ""
    term_before: int = 0
    term_after: int = 0
    leader_after: str = ""
    started: float = 0.0
    fault_at: float = 0.0
    ended: float = 0.0
    #: SIGKILL to the first write acknowledged by another node in a later term.
    failover_s: float | None = None
    forgot: str = ""
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        failover = f" failover {self.failover_s:.2f}s" if self.failover_s is not None else ""
        forgot = f" forgot {self.forgot}" if self.forgot else ""
        return (
            f"round {self.number:2d} {self.action:<12} {self.target:<3} term"
            f" {self.term_before}->{self.term_after} leader {self.leader_after}"
            f"{failover}{forgot}"
        )


def schedule(rng: random.Random, rounds: int, actions: Sequence[str] = ACTIONS) -> list[str]:
    """*rounds* actions, each of *actions* about equally often, in a seeded random order."""
    plan = [actions[i % len(actions)] for i in range(rounds)]
    rng.shuffle(plan)
    return plan


def wait_for(condition: Callable[[], tuple[bool, str]], what: str, timeout: float) -> str:
    """Wait until *condition()* holds; RoundFailed with its last explanation otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        done, why = condition()
        if done:
            return why
        if time.monotonic() > deadline:
            raise RoundFailed(f"{what} not within {timeout:g}s: {why}")
        time.sleep(0.05)


class Nemesis:
    """Runs the rounds against *cluster* while *load* runs; keeps what each round did."""

    def __init__(
        self,
        cluster: FailoverCluster,
        load: Load,
        rng: random.Random,
        *,
        log: Callable[[str], None] = print,
        forget_every: int = 3,
    ) -> None:
        self.cluster = cluster
        self.load = load
        self.history: History = load.history
        self.rng = rng
        self.log = log
        self.forget_every = forget_every
        self.rounds: list[Round] = []
        self.forgotten: set[str] = set()
        self._handlers: dict[str, Callable[[Round, ClusterNode], None]] = {
            "kill": self._kill,
            "pause": self._pause,
            "isolate": self._isolate,
            "isolate-all": self._isolate_all,
            "etcd-restart": self._restart_etcd,
        }

    @property
    def ttl(self) -> float:
        return float(self.cluster.settings.lease_ttl_s)

    def run(self, plan: Sequence[str]) -> list[Round]:
        for number, action in enumerate(plan, start=1):
            self.one(Round(number, action))
        return self.rounds

    def one(self, round_: Round) -> Round:
        self.rounds.append(round_)
        round_.started = time.monotonic()
        self.settle(f"round {round_.number}: the cluster settling before {round_.action}")
        time.sleep(self.rng.uniform(0.3, 1.2))
        if round_.number % self.forget_every == 0:
            round_.forgot = self._forget()
        leader = self.cluster.etcd_leader()
        if leader is None:
            raise RoundFailed(f"round {round_.number}: etcd lost its leader before the fault")
        target = self.cluster.node(leader.node_id)
        round_.target, round_.term_before = target.name, leader.term
        self.log(f"round {round_.number}: {round_.action} {target.name} (term {leader.term})")
        round_.fault_at = time.monotonic()
        self._handlers[round_.action](round_, target)
        self.settle(f"round {round_.number}: the cluster settling after {round_.action}")
        self._wait_acknowledged_after(round_)
        after = self.cluster.etcd_leader()
        if after is not None:
            round_.leader_after, round_.term_after = after.node_id, after.term
        if round_.forgot:
            self._check_forget_on_leader(round_)
        round_.ended = time.monotonic()
        self.log(round_.line())
        return round_

    def settle(self, what: str) -> None:
        wait_for(self.cluster.settled, what, SETTLE_TIMEOUT)

    # -- the faults -------------------------------------------------------------------

    def _kill(self, round_: Round, target: ClusterNode) -> None:
        self.cluster.kill(target)
        self._wait_new_leader(round_)
        self.cluster.restart(target)

    def _pause(self, round_: Round, target: ClusterNode) -> None:
        self.cluster.pause(target)
        time.sleep(self.ttl + self.rng.uniform(0.5, 1.5))
        self.cluster.resume(target)

    def _isolate(self, round_: Round, target: ClusterNode) -> None:
        self.cluster.isolate(target, from_etcd=False)
        time.sleep(self.ttl + self.rng.uniform(0.5, 1.5))
        self.cluster.heal()

    def _isolate_all(self, round_: Round, target: ClusterNode) -> None:
        self.cluster.isolate(target, from_etcd=True)
        time.sleep(self.ttl + self.rng.uniform(0.5, 1.5))
        self.cluster.heal()

    def _restart_etcd(self, round_: Round, target: ClusterNode) -> None:
        self.cluster.restart_etcd(down_s=self.rng.uniform(0.2, 1.5))

    def _wait_new_leader(self, round_: Round) -> None:
        def elected() -> tuple[bool, str]:
            leader = self.cluster.etcd_leader()
            if leader is None:
                return False, "etcd holds no leader"
            return leader.term > round_.term_before, f"{leader.node_id} leads term {leader.term}"

        wait_for(
            elected, f"round {round_.number}: a new leader after {round_.action}", SETTLE_TIMEOUT
        )

    def _wait_acknowledged_after(self, round_: Round) -> None:
        """A write acknowledged after the fault; after a kill, by a later term's leader."""
        killed = round_.target

        def acknowledged() -> tuple[bool, str]:
            acks = self.history.acks_after(round_.fault_at)
            if round_.action == "kill":
                acks = [a for a in acks if a.node != killed and a.term > round_.term_before]
            if not acks:
                return False, "no write acknowledged since the fault"
            first = min(acks, key=lambda a: a.at)
            if round_.action == "kill":
                round_.failover_s = first.at - round_.fault_at
            return True, ""

        wait_for(
            acknowledged, f"round {round_.number}: a write after {round_.action}", SETTLE_TIMEOUT
        )

    # -- forgets ----------------------------------------------------------------------

    def _forget(self) -> str:
        """Forget a subject whose appends are all acknowledged; its forget is acknowledged too."""
        candidates = [
            subject
            for writer in self.load.writers
            if (subject := writer.finished_subject()) is not None and subject not in self.forgotten
        ]
        if not candidates:
            return ""
        subject = self.rng.choice(sorted(candidates))
        self.load.client.forget_subject(subject, reason="failover-test", timeout=SETTLE_TIMEOUT)
        self.forgotten.add(subject)
        return subject

    def _check_forget_on_leader(self, round_: Round) -> None:
        """The forget made before the fault holds on the leader after it."""
        leader = self.cluster.etcd_leader()
        assert leader is not None
        with lethedb.Client(leader.advertise, token=self.cluster.tokens.admin, timeout=10) as db:
            receipt = db.get_subject(round_.forgot)
        if receipt.state is lethedb.SubjectState.ACTIVE:
            raise RoundFailed(
                f"round {round_.number}: {round_.forgot} was forgotten before {round_.action};"
                f" the leader after it ({leader.node_id}, term {leader.term}) says it is active"
            )
