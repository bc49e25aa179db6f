"""A leader and a follower, two real server processes on loopback (docs/CLUSTERING.md).

The follower copies the leader's log over the Replication service with a
``replica`` token and serves reads; writes sent to it fail with NotLeader
naming the leader; a read with ``min_position`` waits for that position (or
fails CatchingUp at its deadline); a consumer group's checkpoint committed on
the follower is stored by the leader. The ``replica`` role replicates and does
nothing else, and no client role replicates. A node holding another store is
refused as a follower, with a log line that says why.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from lethedb.v1 import admin_pb2 as apb
from lethedb.v1 import admin_pb2_grpc, eventstore_pb2_grpc, replication_pb2_grpc
from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import replication_pb2 as rpb
from lethedb_contract import ERROR_KEY, LEADER_KEY
from lethedb_server.api.tokens import create_token
from tests.integration.pki import CertificateAuthority
from tests.integration.serverproc import ServerProcess

ROLES = ("reader", "consumer", "writer", "admin", "replica")
WAIT_S = 10.0


class Cluster:
    """The two processes and a token of every role (one tokens file serves both)."""

    def __init__(self, leader: ServerProcess, follower: ServerProcess, tokens: dict[str, str]):
        self.leader = leader
        self.follower = follower
        self.tokens = tokens

    def bearer(self, role: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[role]}"),)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("replication")
    tokens_path = root / "tokens.json"
    tokens = {role: create_token(tokens_path, role, f"repl-{role}")[0] for role in ROLES}
    replica_token = root / "replica.token"
    replica_token.write_text(tokens["replica"] + "\n")
    auth = ("--tokens-file", str(tokens_path), "--shred-interval-s", "0")
    leader = ServerProcess(root / "leader", *auth).start()
    follower = ServerProcess(
        root / "follower",
        *auth,
        "--follow", leader.address,
        "--node-id", "follower-1",
        "--follow-token-file", str(replica_token),
    ).start()  # fmt: skip
    try:
        yield Cluster(leader, follower, tokens)
    finally:
        assert follower.stop() == 0, follower.logs()
        assert leader.stop() == 0, leader.logs()


def events_stub(server: ServerProcess) -> eventstore_pb2_grpc.EventStoreStub:
    return eventstore_pb2_grpc.EventStoreStub(server.channel())


def append(cluster: Cluster, count: int, subject: str = "") -> int:
    """Append *count* events to a new stream on the leader; the last position."""
    request = pb.AppendRequest(
        stream_id=f"repl-{uuid.uuid4().hex[:10]}",
        events=[
            pb.ProposedEvent(
                event_type="Registered",
                data=f'{{"n": {n}}}'.encode(),
                metadata=b'{"source": "test"}',
                subject_id=subject,
                content_type="application/json",
            )
            for n in range(count)
        ],
    )
    answer = events_stub(cluster.leader).Append(
        request, metadata=cluster.bearer("writer"), timeout=WAIT_S
    )
    return int(answer.last_position)


def read_all(
    cluster: Cluster, server: ServerProcess, min_position: int = 0, timeout: float = WAIT_S
) -> list[pb.RecordedEvent]:
    request = pb.ReadAllRequest(min_position=min_position)
    responses = events_stub(server).ReadAll(
        request, metadata=cluster.bearer("reader"), timeout=timeout
    )
    return [event for response in responses for event in response.events]


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value


def trailer(error: grpc.RpcError, key: str) -> str:
    return dict(error.trailing_metadata() or ()).get(key, "")  # type: ignore[attr-defined]


def wait_for_log(server: ServerProcess, text: str) -> str:
    deadline = time.monotonic() + WAIT_S
    while text not in server.logs():
        assert time.monotonic() < deadline, f"no log line with {text!r} in:\n{server.logs()}"
        time.sleep(0.05)
    return next(line for line in server.logs().splitlines() if text in line)


def test_appends_on_the_leader_appear_identical_on_the_follower(cluster: Cluster):
    last = append(cluster, 20, subject=f"user-{uuid.uuid4().hex[:8]}")
    append(cluster, 5)
    head = append(cluster, 1)
    assert head > last
    copied = read_all(cluster, cluster.follower, min_position=head)
    assert copied == read_all(cluster, cluster.leader)
    assert copied[-1].position == head

    def stats(server: ServerProcess) -> apb.StatsResponse:
        stub = admin_pb2_grpc.AdminStub(server.channel())
        return stub.Stats(apb.StatsRequest(), metadata=cluster.bearer("admin"), timeout=WAIT_S)

    leader, follower = stats(cluster.leader), stats(cluster.follower)
    assert follower.store_id == leader.store_id  # the follower adopted the leader's store
    assert follower.last_position >= head
    # Every record on the follower links into the chain and opens with its key.
    verify = admin_pb2_grpc.AdminStub(cluster.follower.channel()).Verify(
        apb.VerifyRequest(), metadata=cluster.bearer("admin"), timeout=WAIT_S
    )
    final = list(verify)[-1]
    assert final.done, final
    assert not final.problem, final
    assert final.checked >= head


def test_a_subscription_on_the_follower_receives_the_leader_s_new_commits(cluster: Cluster):
    head = append(cluster, 1)
    read_all(cluster, cluster.follower, min_position=head)
    request = pb.SubscribeRequest(from_end=True)
    responses = events_stub(cluster.follower).Subscribe(
        request, metadata=cluster.bearer("reader"), timeout=WAIT_S
    )
    try:
        stream = iter(responses)
        # The live phase has begun once the subscription reports it caught up.
        while next(stream).WhichOneof("message") != "caught_up":
            pass
        last = append(cluster, 3)
        received: list[int] = []
        while not received or received[-1] < last:
            message = next(stream)
            received += [event.position for event in message.events.events]
        assert received == [last - 2, last - 1, last]
    finally:
        responses.cancel()


def test_a_write_to_the_follower_fails_not_leader_naming_the_leader(cluster: Cluster):
    stub = events_stub(cluster.follower)
    request = pb.AppendRequest(
        stream_id="repl-refused", events=[pb.ProposedEvent(event_type="E", data=b"{}")]
    )
    refused = refusal(
        lambda: stub.Append(request, metadata=cluster.bearer("writer"), timeout=WAIT_S)
    )
    assert refused.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert trailer(refused, ERROR_KEY) == "NotLeader"
    assert trailer(refused, LEADER_KEY) == cluster.leader.address
    commit = pb.CommitRequest(appends=[pb.StreamAppend(stream_id="repl-refused", events=[])])
    refused = refusal(lambda: stub.Commit(commit, metadata=cluster.bearer("writer"), timeout=5))
    assert trailer(refused, LEADER_KEY) == cluster.leader.address
    # The streaming write ends whole with the same answer.
    appends = stub.AppendStream(iter([request]), metadata=cluster.bearer("writer"), timeout=5)
    refused = refusal(lambda: list(appends))
    assert trailer(refused, ERROR_KEY) == "NotLeader"
    assert trailer(refused, LEADER_KEY) == cluster.leader.address
    assert not [e for e in read_all(cluster, cluster.leader) if e.stream_id == "repl-refused"]


def test_a_read_with_min_position_waits_until_the_leader_writes_it(cluster: Cluster):
    head = append(cluster, 1)
    wanted = head + 1
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(read_all, cluster, cluster.follower, wanted)
        done, _ = concurrent.futures.wait([waiting], timeout=0.5)
        assert not done, "the read answered before the position it asked for existed"
        append(cluster, 1)
        events = waiting.result(timeout=WAIT_S)
    assert events[-1].position == wanted


def test_a_read_with_min_position_fails_catching_up_at_its_deadline(cluster: Cluster):
    head = append(cluster, 1)
    wanted = head + 1000
    refused = refusal(lambda: read_all(cluster, cluster.follower, wanted, timeout=1.5))
    assert refused.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert trailer(refused, ERROR_KEY) == "CatchingUp"
    details = refused.details()  # type: ignore[attr-defined]
    assert str(wanted) in details
    assert "holds positions up to" in details
    # The same wait guards the other reads.
    stub = events_stub(cluster.follower)
    request = pb.GetCheckpointRequest(group="nobody", min_position=wanted)
    refused = refusal(
        lambda: stub.GetCheckpoint(request, metadata=cluster.bearer("reader"), timeout=1.0)
    )
    assert trailer(refused, ERROR_KEY) == "CatchingUp"


REPLICA_WRITE = pb.AppendRequest(
    stream_id="repl-replica", events=[pb.ProposedEvent(event_type="E", data=b"{}")]
)


def test_a_replica_token_cannot_use_the_event_store(cluster: Cluster):
    replica = cluster.bearer("replica")
    for server in (cluster.leader, cluster.follower):
        stub = events_stub(server)
        reads = stub.ReadAll(pb.ReadAllRequest(), metadata=replica, timeout=5)
        refused = refusal(lambda reads=reads: list(reads))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        refused = refusal(lambda stub=stub: stub.Append(REPLICA_WRITE, metadata=replica, timeout=5))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def test_no_client_role_may_replicate(cluster: Cluster):
    stub = replication_pb2_grpc.ReplicationStub(cluster.leader.channel())
    forward = rpb.ForwardCheckpointRequest(group="stolen", position=1)
    hello = rpb.FollowRequest(hello=rpb.FollowerHello(node_id="intruder"))
    for role in ("writer", "admin"):
        refused = refusal(
            lambda role=role: stub.ForwardCheckpoint(
                forward, metadata=cluster.bearer(role), timeout=5
            )
        )
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        follow = stub.Follow(iter([hello]), metadata=cluster.bearer(role), timeout=5)
        refused = refusal(lambda follow=follow: next(iter(follow)))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def test_commit_checkpoint_on_a_follower_lands_on_the_leader(cluster: Cluster):
    head = append(cluster, 3)
    read_all(cluster, cluster.follower, min_position=head)
    group = f"g-{uuid.uuid4().hex[:8]}"
    follower = events_stub(cluster.follower)
    answer = follower.CommitCheckpoint(
        pb.CommitCheckpointRequest(group=group, position=head),
        metadata=cluster.bearer("consumer"),
        timeout=WAIT_S,
    )
    assert (answer.accepted, answer.position) == (True, head)
    for server in (cluster.leader, cluster.follower):
        stored = events_stub(server).GetCheckpoint(
            pb.GetCheckpointRequest(group=group), metadata=cluster.bearer("reader"), timeout=5
        )
        assert (stored.found, stored.position) == (True, head), server.address


def test_a_node_holding_another_store_is_refused_as_a_follower(cluster: Cluster, tmp_path: Path):
    other = ServerProcess(tmp_path / "other").start()
    with grpc.insecure_channel(other.address) as channel:
        eventstore_pb2_grpc.EventStoreStub(channel).Append(
            pb.AppendRequest(
                stream_id="elsewhere", events=[pb.ProposedEvent(event_type="E", data=b"{}")]
            ),
            timeout=WAIT_S,
        )
    other.stop()
    token = tmp_path / "replica.token"
    token.write_text(cluster.tokens["replica"])
    intruder = ServerProcess(
        tmp_path / "other",
        "--follow", cluster.leader.address,
        "--node-id", "other-store",
        "--follow-token-file", str(token),
    ).start()  # fmt: skip
    try:
        line = wait_for_log(cluster.leader, "refused follower 'other-store'")
        assert "another store" in line
        assert "another store" in wait_for_log(intruder, "the leader refused this follower")
        # It never caught up, so it serves no read.
        with grpc.insecure_channel(intruder.address) as channel:
            refused = refusal(
                lambda: list(eventstore_pb2_grpc.EventStoreStub(channel).ReadAll(
                    pb.ReadAllRequest(), timeout=5
                ))
            )  # fmt: skip
        assert trailer(refused, ERROR_KEY) == "CatchingUp"
    finally:
        assert intruder.stop() == 0


def test_a_follower_reaches_an_mtls_leader_with_its_own_certificate(tmp_path: Path):
    ca = CertificateAuthority()
    server_cert, server_key = ca.issue("leader", server=True).write(tmp_path, "leader")
    node_cert, node_key = ca.issue("follower", server=False).write(tmp_path, "follower")
    ca_path = ca.write(tmp_path / "ca.pem")
    credentials = grpc.ssl_channel_credentials(
        ca.pem, node_key.read_bytes(), node_cert.read_bytes()
    )
    leader = ServerProcess(
        tmp_path / "leader",
        "--tls-cert", str(server_cert),
        "--tls-key", str(server_key),
        "--tls-client-ca", str(ca_path),
        credentials=credentials,
    ).start()  # fmt: skip
    follower = ServerProcess(
        tmp_path / "follower",
        "--follow", leader.address,
        "--follow-tls-ca", str(ca_path),
        "--follow-tls-cert", str(node_cert),
        "--follow-tls-key", str(node_key),
    ).start()  # fmt: skip
    try:
        with leader.channel() as channel:
            written = eventstore_pb2_grpc.EventStoreStub(channel).Append(
                pb.AppendRequest(
                    stream_id="over-tls", events=[pb.ProposedEvent(event_type="E", data=b"{}")]
                ),
                timeout=WAIT_S,
            )
        with follower.channel() as channel:
            responses = eventstore_pb2_grpc.EventStoreStub(channel).ReadAll(
                pb.ReadAllRequest(min_position=written.last_position), timeout=WAIT_S
            )
            copied = [event.stream_id for response in responses for event in response.events]
        assert copied == ["over-tls"]
        assert "(TLS)" in wait_for_log(follower, "following the leader")
    finally:
        assert follower.stop() == 0
        assert leader.stop() == 0
