"""A leader and its followers on loopback, as real processes: what replication promises.

* Followers hold the leader's log byte for byte (records, chain head, stream
  versions, the replicated side tables: idempotency entries, checkpoints,
  legal holds, tombstones, the journal), also when one of them is SIGKILLed
  and restarted while 8 writers append and another client commits, moves
  checkpoints, holds and forgets subjects.
* A follower started empty against a large log catches up, then follows live,
  and its subscribers see the leader's sequence.
* With ``--sync-replicas 1`` every acknowledged append survives the leader's
  SIGKILL on a follower.
* A forget reaches every follower within one round (redacted reads, keys
  gone), each node shreds on its own and passes ``lethedb audit-erasure``, and
  a follower that was down during the forget applies it before it serves a
  read.
* A follower refuses a commit whose chain does not link to its log (fed by a
  fake leader that speaks the Replication protocol) and keeps nothing of it.
* Writes sent to a follower through the SDK land on the leader exactly once;
  a retry with a key the leader already holds is deduplicated.

The harness is tests/integration/cluster.py.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

import lethedb
from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import replication_pb2 as rpb
from lethedb.v1 import replication_pb2_grpc
from lethedb_server.engine.model import AppendCommand, ProposedEvent
from lethedb_server.engine.store import Store, StoreOptions
from lethedb_server.storage import codec
from tests.integration.cluster import (
    Cluster,
    Node,
    assert_same_log,
    event_positions,
    log_summary,
    subject_key_entries,
)
from tests.ports import free_port

WAIT = 30.0


def until(
    condition: Callable[[], object], what: str, timeout: float = WAIT, every: float = 0.05
) -> None:
    """Wait for *condition()* to be true, or fail naming *what*."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(every)


def no_retry_client(cluster: Cluster, node: Node) -> lethedb.Client:
    """A client that reports a failure at once instead of retrying through it."""
    return cluster.client(node, retry=lethedb.RetryPolicy(max_retries=0), timeout=5.0)


# -- byte-identical logs through follower crashes -----------------------------------------

WRITERS = 8
EVENTS = 20_000
EVENTS_PER_APPEND = 5
#: Rounds of commits, checkpoints, legal holds and forgets beside the appends.
SIDE_ROUNDS = 20


@pytest.mark.slow
def test_followers_hold_the_leaders_log_byte_for_byte_while_one_is_killed_twice(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path) as cluster:
        victim = cluster.followers[0]
        acked = [0] * WRITERS
        errors: list[BaseException] = []

        def writer(index: int) -> None:
            rng = random.Random(index)
            try:
                with cluster.client(cluster.leader) as db:
                    for n in range(EVENTS // WRITERS // EVENTS_PER_APPEND):
                        stream = f"load-w{index}-s{n % 7}"
                        events = [
                            lethedb.Event(
                                "Loaded",
                                rng.randbytes(64),
                                subject_id=f"user-{rng.randrange(50)}",
                            )
                            for _ in range(EVENTS_PER_APPEND)
                        ]
                        db.append(stream, events)
                        acked[index] += EVENTS_PER_APPEND
            except BaseException as error:  # reported below
                errors.append(error)

        def side_traffic() -> None:
            """The other state that answers clients: commits, checkpoints, holds, forgets."""
            try:
                with cluster.client(cluster.leader) as db:
                    for n in range(SIDE_ROUNDS):
                        subject = f"side-subject-{n}"
                        done = db.commit(
                            [
                                lethedb.Append(f"side-a{n % 3}", lethedb.Event("A", {"n": n})),
                                lethedb.Append(
                                    f"side-b{n % 3}",
                                    lethedb.Event("B", {"n": n}, subject_id=subject),
                                ),
                            ]
                        )
                        db.set_checkpoint(f"group-{n % 3}", done.results[-1].last_position)
                        db.admin.set_legal_hold(subject, "audit")
                        if n % 2:
                            db.admin.release_legal_hold(subject)
                            db.forget_subject(subject, reason="gdpr-art17")
                        time.sleep(0.05)
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
        threads.append(threading.Thread(target=side_traffic))
        for thread in threads:
            thread.start()
        for fraction in (0.25, 0.6):
            until(lambda f=fraction: sum(acked) >= f * EVENTS or errors, "writers progress", 120)
            cluster.kill(victim)
            time.sleep(0.2)
            cluster.launch(victim)
        for thread in threads:
            thread.join(180)
        assert not errors, f"a writer failed: {errors[0]!r}"
        assert sum(acked) == EVENTS

        head = cluster.wait_caught_up()
        cluster.stop_all()

    # Two events per commit, and one $subject.forgotten event per forget.
    assert head == EVENTS + 2 * SIDE_ROUNDS + SIDE_ROUNDS // 2
    leader = assert_same_log(cluster.leader.data_dir, cluster.followers[0].data_dir)
    assert_same_log(cluster.leader.data_dir, cluster.followers[1].data_dir)
    assert leader.last_position == head
    assert sum(v + 1 for v in leader.streams.values()) == head


# -- an empty follower against a large log --------------------------------------------------

SEEDED = 200_000
SEED_PER_COMMAND = 500
LIVE_APPENDS = 200


def seed_log(data_dir: Path, keyring: Path, events: int) -> None:
    """Write *events* events into a fresh data directory in process (fast: no gRPC)."""
    rng = random.Random(7)
    subjects = [f"seeded-{i}" for i in range(100)]
    with Store.open(data_dir, StoreOptions(keyring_path=keyring)) as store:
        pending: list[futures.Future[Any]] = []
        for n in range(events // SEED_PER_COMMAND):
            batch = tuple(
                ProposedEvent(
                    b"",
                    "Seeded",
                    rng.choice(subjects),
                    "application/octet-stream",
                    rng.randbytes(48),
                    b"",
                )
                for _ in range(SEED_PER_COMMAND)
            )
            pending.append(store.writer.submit(AppendCommand(f"seeded-{n % 64}", batch)))
            if len(pending) >= 32:
                pending.pop(0).result(60)
        for future in pending:
            future.result(60)


@dataclass
class Subscriber:
    """Collects (position, event id) from a subscription until it reaches *until*."""

    cluster: Cluster
    node: Node
    until: int = 0
    seen: list[tuple[int, bytes]] = field(default_factory=list)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> Subscriber:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            with self.cluster.client(self.node, timeout=60.0) as db:
                subscription = db.subscribe(from_start=True)
                try:
                    for item in subscription:
                        if isinstance(item, lethedb.RecordedEvent):
                            self.seen.append((item.position, item.event_id.bytes))
                            if self.until and item.position >= self.until:
                                return
                finally:
                    subscription.close()
        except BaseException as error:
            self.error = error

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert self.error is None, f"subscriber on {self.node.name} failed: {self.error!r}"
        assert not self.thread.is_alive(), (
            f"subscriber on {self.node.name} stopped at "
            f"{self.seen[-1][0] if self.seen else 0}, waiting for {self.until}"
        )


@pytest.mark.slow
def test_an_empty_follower_catches_up_with_a_large_log_then_follows_live(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, followers_count=0)
    seed_log(cluster.leader.data_dir, cluster.leader.keyring, SEEDED)
    with cluster:
        follower = cluster.add_follower("follower1")
        assert cluster.wait_caught_up(timeout=150) == SEEDED

        final = SEEDED + LIVE_APPENDS
        on_leader = Subscriber(cluster, cluster.leader, final).start()
        on_follower = Subscriber(cluster, follower, final).start()
        with cluster.client(cluster.leader) as db:
            for n in range(LIVE_APPENDS):
                db.append(f"live-{n % 5}", lethedb.Event("Live", {"n": n}, subject_id="live"))
        on_leader.join(120)
        on_follower.join(120)

    assert [p for p, _ in on_follower.seen] == list(range(1, final + 1))
    assert on_follower.seen == on_leader.seen


# -- synchronous replication --------------------------------------------------------------


@pytest.mark.slow
def test_with_sync_replicas_one_every_acknowledged_append_survives_the_leaders_death(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, sync_replicas=1) as cluster:
        cluster.wait_connected()
        acknowledged: dict[bytes, int] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def writer(index: int) -> None:
            with no_retry_client(cluster, cluster.leader) as db:
                while not stop.is_set():
                    event_id = uuid.uuid4()
                    try:
                        result = db.append(
                            f"sync-{index}", lethedb.Event("Paid", b"x", event_id=event_id)
                        )
                    except lethedb.LetheError:
                        return
                    with lock:
                        acknowledged[event_id.bytes] = result.first_position

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
        for thread in threads:
            thread.start()
        until(lambda: len(acknowledged) >= 1500, "a burst of acknowledged appends", 60)
        cluster.kill(cluster.leader)
        stop.set()
        for thread in threads:
            thread.join(30)
        with lock:
            acked = dict(acknowledged)

        # Their files: a follower of a dead leader serves only what that leader last
        # said was visible (it may not have heard of the last acks); promoted, all of it.
        held: dict[bytes, int] = {}
        for follower in cluster.followers:
            cluster.stop(follower)
            for event_id, position in event_positions(follower.data_dir).items():
                held.setdefault(event_id, position)

    missing = {uuid.UUID(bytes=k): p for k, p in acked.items() if held.get(k) != p}
    assert not missing, (
        f"{len(missing)} of {len(acked)} acknowledged appends are on no follower "
        f"at their position, e.g. {next(iter(missing.items()))}"
    )


# -- erasure on every node ---------------------------------------------------------------


def read_stream_on(
    cluster: Cluster, node: Node, stream: str, min_position: int = 0
) -> list[pb.RecordedEvent]:
    """A stream's events as *node* serves them (waiting for *min_position* there)."""
    with cluster.stubs(node) as (events, _):
        request = pb.ReadStreamRequest(stream_id=stream, min_position=min_position)
        return [
            e
            for response in events.ReadStream(request, metadata=cluster.metadata, timeout=WAIT)
            for e in response.events
        ]


def audit(node: Node, canary: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lethedb_server", "audit-erasure",
         "--data", str(node.data_dir), "--keyring", str(node.keyring), "--canary", canary],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def append_personal_data(cluster: Cluster, subject: str, stream: str, canary: str) -> None:
    with cluster.client(cluster.leader) as db:
        for n in range(3):
            db.append(
                stream, lethedb.Event("Profile", {"text": canary, "n": n}, subject_id=subject)
            )
        db.append(stream + "-other", lethedb.Event("Profile", {"text": "kept"}, subject_id="other"))


@pytest.mark.slow
def test_a_forget_reaches_every_follower_and_every_node_passes_the_erasure_audit(
    tmp_path: Path,
) -> None:
    subject, stream, canary = "subject-forget-1", "profile-forget-1", "canary-4f1e9c"
    with Cluster(tmp_path) as cluster:
        append_personal_data(cluster, subject, stream, canary)
        cluster.wait_caught_up()
        for follower in cluster.followers:
            assert all(not e.redacted for e in read_stream_on(cluster, follower, stream))
            assert subject_key_entries(follower.data_dir, subject) > 0

        with cluster.client(cluster.leader) as db:
            receipt = db.forget_subject(subject, reason="gdpr-art17")
        tombstone = receipt.tombstone_position
        assert tombstone > 0

        for follower in cluster.followers:
            events = read_stream_on(cluster, follower, stream, min_position=tombstone)
            assert len(events) == 3
            assert all(e.redacted and not e.data for e in events), follower.name
            until(
                lambda f=follower: subject_key_entries(f.data_dir, subject) == 0,
                f"{follower.name}'s key store to drop the subject's keys",
                timeout=5.0,
            )
            other = read_stream_on(cluster, follower, stream + "-other")
            assert [e.redacted for e in other] == [False]

        for node in cluster.nodes:
            with cluster.client(node) as db:
                db.admin.shred()
        cluster.stop_all()

    for node in cluster.nodes:
        result = audit(node, canary)
        assert result.returncode == 0, f"{node.name}:\n{result.stdout}{result.stderr}"
        assert f"subject {subject}" in result.stdout


def test_get_subject_on_the_leader_reports_the_erasure_on_each_node(tmp_path: Path) -> None:
    subject, stream = "subject-nodes-1", "profile-nodes-1"
    with Cluster(tmp_path) as cluster:
        append_personal_data(cluster, subject, stream, "x")
        with cluster.client(cluster.leader) as db:
            db.forget_subject(subject, reason="gdpr-art17")
        cluster.wait_caught_up()
        for node in cluster.nodes:
            with cluster.client(node) as db:
                db.admin.shred()

        def states() -> dict[str, int]:
            with cluster.stubs(cluster.leader) as (events, _):
                receipt = events.GetSubject(
                    pb.GetSubjectRequest(subject_id=subject),
                    metadata=cluster.metadata,
                    timeout=WAIT,
                )
            return {n.node_id: n.state for n in receipt.nodes}

        until(
            lambda: states() == {n.name: pb.SUBJECT_SHREDDED for n in cluster.nodes},
            "every node reported SHREDDED to the leader",
            timeout=10.0,
        )
        assert next(iter(states())) == "leader"


@pytest.mark.slow
def test_a_follower_down_during_a_forget_applies_it_before_it_serves_a_read(
    tmp_path: Path,
) -> None:
    subject, stream = "subject-late-1", "profile-late-1"
    with Cluster(tmp_path) as cluster:
        append_personal_data(cluster, subject, stream, "late")
        late = cluster.followers[1]
        cluster.wait_caught_up([late])
        cluster.kill(late)
        with cluster.client(cluster.leader) as db:
            # Commits before the forget: while the returning follower copies them it
            # still holds the subject's keys, and must not serve a read meanwhile.
            for n in range(40):
                db.append("before-forget", [lethedb.Event("Earlier", {"n": n})] * 500)
            db.forget_subject(subject, reason="gdpr-art17")

        answers: list[bool] = []  # one per read served: was every event redacted?
        failures: list[grpc.RpcError] = []  # reads refused otherwise than UNAVAILABLE
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                try:
                    events = read_stream_on(cluster, late, stream)
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        failures.append(error)
                    time.sleep(0.01)
                    continue
                answers.append(bool(events) and all(e.redacted for e in events))

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        cluster.launch(late)
        until(lambda: len(answers) >= 5, f"{late.name} to serve reads again")
        stop.set()
        thread.join(WAIT)
        assert not failures, failures[0]
        assert all(answers), f"{late.name} served the forgotten subject's data: {answers}"
        until(
            lambda: subject_key_entries(late.data_dir, subject) == 0,
            f"{late.name}'s key store to drop the subject's keys",
            timeout=5.0,
        )


# -- a follower refuses a commit whose chain does not link -------------------------------


class FakeLeader(replication_pb2_grpc.ReplicationServicer):
    """Speaks the leader's side of Follow: a welcome, the given commits, then heartbeats."""

    def __init__(self, welcome: rpb.LeaderWelcome, commits: list[rpb.ReplicatedCommit]) -> None:
        self.welcome = welcome
        self.commits = commits
        self.hellos: list[rpb.FollowerHello] = []
        self.acks: list[rpb.FollowerAck] = []
        self.done = threading.Event()

    def Follow(  # noqa: N802 (the gRPC method's name)
        self, request_iterator: Iterator[rpb.FollowRequest], context: grpc.ServicerContext
    ) -> Iterator[rpb.FollowResponse]:
        first = next(request_iterator)
        self.hellos.append(first.hello)
        threading.Thread(target=self._read_acks, args=(request_iterator,), daemon=True).start()
        yield rpb.FollowResponse(welcome=self.welcome)
        for commit in self.commits:
            yield rpb.FollowResponse(commit=commit)
        last = self.commits[-1]
        while not self.done.wait(0.5) and context.is_active():
            yield rpb.FollowResponse(
                heartbeat=rpb.LeaderHeartbeat(
                    term=last.term,
                    commit=last.commit,
                    position=last.last_position,
                    sent_at=time.time_ns(),
                )
            )

    def _read_acks(self, requests: Iterator[rpb.FollowRequest]) -> None:
        try:
            for request in requests:
                if request.HasField("ack"):
                    self.acks.append(request.ack)
        except grpc.RpcError:
            pass


def take_commits(
    cluster: Cluster, count: int
) -> tuple[rpb.LeaderWelcome, list[rpb.ReplicatedCommit]]:
    """Follow the real leader as an empty follower would, and keep its first *count* commits."""
    hello = rpb.FollowRequest(hello=rpb.FollowerHello(node_id="probe", advertise="127.0.0.1:1"))
    done = threading.Event()

    def requests() -> Iterator[rpb.FollowRequest]:
        yield hello
        done.wait(WAIT)

    commits: list[rpb.ReplicatedCommit] = []
    welcome: rpb.LeaderWelcome | None = None
    with grpc.insecure_channel(cluster.leader.address) as channel:
        call = replication_pb2_grpc.ReplicationStub(channel).Follow(
            requests(),
            metadata=(("authorization", f"Bearer {cluster.tokens.replica}"),),
            timeout=WAIT,
        )
        for response in call:
            if response.HasField("welcome"):
                welcome = response.welcome
            elif response.HasField("commit"):
                commits.append(response.commit)
                if len(commits) == count:
                    break
        done.set()
        call.cancel()
    assert welcome is not None
    return welcome, commits


def rechained(commit: rpb.ReplicatedCommit, previous: bytes) -> rpb.ReplicatedCommit:
    """*commit* with its records chained after *previous* instead of the leader's chain:
    each record's hash is right for its body, but the first does not link to the log."""
    records = []
    for record in commit.records:
        body, _ = codec.split_record(record)
        previous = codec.chain_hash(previous, body)
        records.append(bytes(body) + previous)
    forged = rpb.ReplicatedCommit()
    forged.CopyFrom(commit)
    del forged.records[:]
    forged.records.extend(records)
    return forged


def test_a_follower_refuses_a_commit_whose_chain_does_not_link_and_keeps_nothing_of_it(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path / "source", followers_count=0) as source:
        with source.client(source.leader) as db:
            db.append("linked", [lethedb.Event("A", {"n": n}, subject_id="s1") for n in range(3)])
            db.append("unlinked", [lethedb.Event("B", {"n": n}, subject_id="s2") for n in range(3)])
        welcome, (good, bad) = take_commits(source, 2)
    assert (good.first_position, good.last_position, bad.first_position) == (1, 3, 4)
    forged = rechained(bad, previous=bytes(32))
    assert forged.records != bad.records

    fake = FakeLeader(welcome, [good, forged])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    replication_pb2_grpc.add_ReplicationServicer_to_server(fake, server)
    fake_address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(fake_address)
    server.start()
    cluster = Cluster(tmp_path / "cluster", followers_count=0)
    try:
        follower = cluster.add_follower("follower1", follow=fake_address)
        until(lambda: any(a.commit >= 1 for a in fake.acks), "the follower acks the good commit")
        until(
            lambda: any(
                "ReplicationRefused" in line and "position 4" in line
                for line in follower.logs().splitlines()
            ),
            "the follower logs that it refused the commit at position 4",
        )
        assert all(a.commit <= 1 and a.position <= 3 for a in fake.acks), fake.acks
        cluster.stop(follower)
    finally:
        fake.done.set()
        server.stop(0)
        cluster.__exit__(None, None, None)

    held = log_summary(follower.data_dir)
    assert (held.last_position, held.journal_head) == (3, 1)
    assert held.streams == {b"linked": 2}
    assert held.store_id == welcome.store_id


# -- writes sent to a follower ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster"), followers_count=1) as cluster:
        yield cluster


def leader_stream(cluster: Cluster, stream: str) -> list[lethedb.RecordedEvent]:
    with cluster.client(cluster.leader) as db:
        return list(db.read_stream(stream))


def test_an_append_sent_to_a_follower_lands_on_the_leader_exactly_once(
    small_cluster: Cluster,
) -> None:
    cluster = small_cluster
    with cluster.client(cluster.followers[0]) as db:
        result = db.append(
            "via-follower", lethedb.Event("Sent", {"n": 1}), idempotency_key="via-follower-1"
        )
        again = db.append(
            "via-follower", lethedb.Event("Sent", {"n": 1}), idempotency_key="via-follower-1"
        )
    assert not result.deduplicated
    assert again.deduplicated
    assert again.first_position == result.first_position
    on_leader = leader_stream(cluster, "via-follower")
    assert [(e.position, e.json()) for e in on_leader] == [(result.first_position, {"n": 1})]


def test_a_commit_sent_to_a_follower_lands_on_the_leader_exactly_once(
    small_cluster: Cluster,
) -> None:
    cluster = small_cluster
    with cluster.client(cluster.followers[0]) as db:
        parts = [
            lethedb.Append("via-follower-a", lethedb.Event("Moved", {"n": 1})),
            lethedb.Append("via-follower-b", lethedb.Event("Moved", {"n": 2})),
        ]
        db.commit(parts, idempotency_key="via-follower-commit-1")
        assert db.commit(parts, idempotency_key="via-follower-commit-1").deduplicated
    assert [e.json() for e in leader_stream(cluster, "via-follower-a")] == [{"n": 1}]
    assert [e.json() for e in leader_stream(cluster, "via-follower-b")] == [{"n": 2}]


def test_an_append_retried_on_a_follower_with_a_key_the_leader_holds_is_deduplicated(
    small_cluster: Cluster,
) -> None:
    cluster = small_cluster
    event = lethedb.Event("Paid", {"amount": 12}, subject_id="payer-1")
    with cluster.client(cluster.leader) as db:
        first = db.append("retried", event, idempotency_key="payment-7")
    cluster.wait_caught_up()
    with cluster.client(cluster.followers[0]) as db:
        retried = db.append("retried", event, idempotency_key="payment-7")
        with pytest.raises(lethedb.IdempotencyConflict):
            db.append(
                "retried",
                lethedb.Event("Paid", {"amount": 99}, subject_id="payer-1"),
                idempotency_key="payment-7",
            )
    assert retried.deduplicated
    assert (retried.first_position, retried.last_version) == (
        first.first_position,
        first.last_version,
    )
    assert len(leader_stream(cluster, "retried")) == 1
