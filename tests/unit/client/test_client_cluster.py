"""The SDK in a cluster: where writes and reads go, and how a client rides through a failover.

Every node here is a real gRPC server on a loopback port (tests/unit/client/
fake_cluster.py) that answers as a LetheDB node does: a follower refuses a
write with NotLeader and the ``lethedb-leader`` trailer made by the server's
own status module, a lagging follower answers a read CatchingUp, a stopped
node is a closed port. What is under test is the SDK's routing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest

import lethedb
from lethedb import Append, AsyncClient, Client, Event, RetryPolicy
from lethedb._cluster import NodeRouter
from lethedb._exceptions import error_from_status
from lethedb._retry import Retrying
from tests.unit.client.fake_cluster import FakeCluster, FakeNode

#: Quick retries, so that a test that must give up does so fast.
QUICK = RetryPolicy(max_retries=3, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    nodes = FakeCluster(3)
    try:
        yield nodes
    finally:
        nodes.close()


def idempotency_keys(node: FakeNode, method: str = "Append") -> list[str]:
    return [request.idempotency_key for request in node.received(method)]


# -- NotLeader: the error and its leader ---------------------------------------------


def test_not_leader_takes_the_leader_from_the_trailer() -> None:
    error = error_from_status(
        grpc.StatusCode.UNAVAILABLE, "a follower", error_name="NotLeader", leader="10.0.0.7:50051"
    )
    assert isinstance(error, lethedb.NotLeader)
    assert error.leader == "10.0.0.7:50051"


def test_not_leader_of_a_pipelined_append_takes_the_leader_from_the_message() -> None:
    error = error_from_status(
        grpc.StatusCode.UNAVAILABLE,
        "this node is a follower and takes no writes; the leader is 10.0.0.7:50051",
        error_name="NotLeader",
    )
    assert isinstance(error, lethedb.NotLeader)
    assert error.leader == "10.0.0.7:50051"


def test_not_leader_that_names_no_leader_has_an_empty_leader() -> None:
    error = error_from_status(
        grpc.StatusCode.UNAVAILABLE,
        "this node is a follower and takes no writes; the leader is not known right now",
        error_name="NotLeader",
    )
    assert isinstance(error, lethedb.NotLeader)
    assert error.leader == ""


# -- the router and the retry budget, without I/O -----------------------------------------


def not_leader(leader: str) -> lethedb.NotLeader:
    return lethedb.NotLeader("a follower", leader=leader)


def test_the_router_sends_writes_to_the_leader_it_last_heard_of() -> None:
    router = NodeRouter(("a:1", "b:1", "c:1"))
    assert router.for_write() == "a:1"
    router.observe("a:1", not_leader("c:1"))
    assert router.for_write() == "c:1"
    router.observe("c:1", lethedb.Unavailable("down"))  # the leader died: back to the hosts
    assert router.leader is None
    assert router.for_write() == "a:1"
    router.observe("a:1", not_leader(""))  # a follower that knows no leader: next host
    assert router.for_write() == "b:1"
    router.wrote("b:1")
    assert router.leader == "b:1"


def test_a_burst_of_failures_from_one_node_moves_the_router_one_host() -> None:
    router = NodeRouter(("a:1", "b:1", "c:1"))
    for _ in range(5):
        router.observe("a:1", lethedb.Unavailable("down"))
    assert router.for_write() == "b:1"


def test_a_leader_named_outside_the_connection_string_becomes_a_known_host() -> None:
    router = NodeRouter(("a:1",))
    assert not router.clustered
    router.observe("a:1", not_leader("z:9"))
    assert router.hosts == ("a:1", "z:9")
    assert router.clustered


def test_reads_preferring_a_follower_avoid_the_known_leader() -> None:
    router = NodeRouter(("a:1", "b:1", "c:1"), prefer="follower")
    router.wrote("a:1")
    assert router.for_read() == "b:1"
    assert router.for_read("leader") == "a:1"
    assert router.for_read("any") == "b:1"  # the host in use
    router.observe("b:1", lethedb.Unavailable("catching up"))
    assert router.for_read() == "c:1"
    assert router.for_write() == "a:1"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_in_a_cluster_retries_go_on_past_the_policy_count_until_the_deadline() -> None:
    clock = Clock()
    router = NodeRouter(("a:1", "b:1"))
    retrying = Retrying(QUICK, budget=1.0, cluster=router, clock=clock)
    waits = []
    while (delay := retrying.next_delay(lethedb.Unavailable("failover"))) is not None:
        waits.append(delay)
        clock.now += delay
    assert len(waits) > QUICK.max_retries
    assert clock.now < 1.0


def test_a_single_host_keeps_the_policy_count() -> None:
    retrying = Retrying(QUICK, budget=60.0, cluster=NodeRouter(("a:1",)), clock=Clock())
    waits = []
    while (delay := retrying.next_delay(lethedb.Unavailable("down"))) is not None:
        waits.append(delay)
    assert len(waits) == QUICK.max_retries


def test_the_first_redirect_is_followed_at_once_and_later_ones_back_off() -> None:
    retrying = Retrying(QUICK, budget=60.0, clock=Clock())
    assert retrying.next_delay(not_leader("b:1")) == 0.0
    delay = retrying.next_delay(not_leader("a:1"))
    assert delay is not None
    assert delay > 0


def test_no_retry_is_kept_even_for_a_redirect() -> None:
    retrying = Retrying(QUICK, no_retry="a backup", budget=60.0, clock=Clock())
    assert retrying.next_delay(not_leader("b:1")) is None


# -- writes follow NotLeader to the leader ---------------------------------------------


def test_a_write_sent_to_a_follower_lands_on_the_leader_once_with_the_same_key(
    cluster: FakeCluster,
) -> None:
    leader, follower, _ = cluster.nodes
    cluster.make_leader(leader)
    with Client(follower.address, coalesce_appends=False, retry=QUICK) as db:
        result = db.append("orders-1", Event("Placed"))
    assert result.first_position == 1
    assert len(cluster.log.events) == 1
    assert idempotency_keys(follower) == idempotency_keys(leader)
    assert len(idempotency_keys(leader)) == 1


def test_the_client_remembers_the_leader_after_one_redirect(cluster: FakeCluster) -> None:
    leader, follower, _ = cluster.nodes
    cluster.make_leader(leader)
    with Client(follower.address, coalesce_appends=False, retry=QUICK) as db:
        for index in range(3):
            db.append(f"orders-{index}", Event("Placed"))
    assert len(follower.received("Append")) == 1
    assert len(leader.received("Append")) == 3


def test_a_leader_outside_the_connection_string_gets_the_same_credentials(
    cluster: FakeCluster,
) -> None:
    leader, follower, _ = cluster.nodes
    cluster.make_leader(leader)
    with Client(follower.address, token="secret-token", retry=QUICK) as db:
        db.append("orders-1", Event("Placed"))
    assert leader.tokens == ["Bearer secret-token"]


WRITES: dict[str, Callable[[Client], object]] = {
    "Append": lambda db: db.append("a", Event("Placed")),
    "Commit": lambda db: db.commit([Append("b", Event("Placed")), Append("c", Event("Placed"))]),
    "ForgetSubject": lambda db: db.forget_subject("user-1", reason="gdpr-art17-request"),
    "SetLegalHold": lambda db: db.admin.set_legal_hold("user-2", "litigation"),
    "ReleaseLegalHold": lambda db: db.admin.release_legal_hold("user-2"),
    "CommitCheckpoint": lambda db: db.set_checkpoint("projector", 1),
}


@pytest.mark.parametrize("method", WRITES)
def test_every_kind_of_write_follows_not_leader(cluster: FakeCluster, method: str) -> None:
    leader, follower, _ = cluster.nodes
    cluster.make_leader(leader)
    with Client(follower.address, coalesce_appends=False, retry=QUICK) as db:
        WRITES[method](db)
        assert sorted(db._transport._nodes) == sorted([leader.address, follower.address])
    assert follower.received(method) == leader.received(method)  # the same request, key included
    assert len(leader.received(method)) == 1


def test_coalesced_appends_refused_by_a_follower_are_resent_to_the_leader(
    cluster: FakeCluster,
) -> None:
    leader, follower, _ = cluster.nodes
    cluster.make_leader(leader)

    async def main() -> list[lethedb.AppendResult]:
        async with AsyncClient(follower.address, retry=QUICK) as db:
            return await asyncio.gather(
                *(db.append(f"orders-{index}", Event("Placed")) for index in range(8))
            )

    results = asyncio.run(main())
    assert sorted(result.first_position for result in results) == list(range(1, 9))
    sent_to_follower = sorted(
        append.idempotency_key
        for batch in follower.received("AppendBatch")
        for append in batch.appends
    ) + sorted(idempotency_keys(follower))
    sent_to_leader = sorted(
        append.idempotency_key
        for batch in leader.received("AppendBatch")
        for append in batch.appends
    ) + sorted(idempotency_keys(leader))
    assert sorted(sent_to_follower) == sorted(sent_to_leader)
    assert len(cluster.log.events) == 8


def test_pipelined_appends_refused_by_a_follower_are_resent_to_the_leader(
    cluster: FakeCluster,
) -> None:
    leader, follower, _ = cluster.nodes
    cluster.make_leader(leader)
    items = [Append(f"orders-{index}", Event("Placed")) for index in range(5)]
    with Client(follower.address, retry=QUICK) as db:
        results = db.append_many(items)
    assert [getattr(result, "first_position", result) for result in results] == [1, 2, 3, 4, 5]
    assert idempotency_keys(leader, "AppendStream") == [
        request.idempotency_key for request in follower.received("AppendStream")[:1]
    ] + [request.idempotency_key for request in leader.received("AppendStream")[1:]]


def test_a_not_leader_without_a_leader_sends_the_write_to_the_other_hosts(
    cluster: FakeCluster,
) -> None:
    follower, other, leader = cluster.nodes
    cluster.make_leader(leader)
    follower.names_leader = ""  # it lost its leader: it cannot say where to go
    other.names_leader = ""
    with Client(cluster.hosts(), coalesce_appends=False, retry=QUICK) as db:
        db.append("orders-1", Event("Placed"))
    assert len(leader.received("Append")) == 1
    assert len(cluster.log.events) == 1


def test_a_host_that_is_down_is_passed_over(cluster: FakeCluster) -> None:
    down, leader, _ = cluster.nodes
    cluster.make_leader(leader)
    cluster.stop(down)
    with Client(cluster.hosts(), coalesce_appends=False, retry=QUICK) as db:
        result = db.append("orders-1", Event("Placed"))
    assert result.first_position == 1


def test_a_write_during_a_failover_waits_for_the_new_leader_instead_of_failing(
    cluster: FakeCluster,
) -> None:
    """The leader dies; the followers know no leader until one is elected, later
    than the retry policy's count of retries would last: the write still lands."""
    old, new, _ = cluster.nodes
    cluster.make_leader(old)
    with Client(cluster.hosts(old, new), coalesce_appends=False, retry=QUICK, timeout=5) as db:
        db.append("orders-1", Event("Placed"))
        cluster.stop(old)
        cluster.make_leader(None)
        new.names_leader = ""
        elected = threading.Event()

        def elect() -> None:
            new.names_leader = None
            cluster.make_leader(new)
            elected.set()

        timer = threading.Timer(0.5, elect)  # longer than QUICK's retries take in all
        timer.start()
        try:
            result = db.append("orders-2", Event("Placed"))
        finally:
            timer.cancel()
    assert elected.is_set()
    assert result.first_position == 2


def test_a_write_gives_up_with_not_leader_when_no_leader_appears_within_the_deadline(
    cluster: FakeCluster,
) -> None:
    first, second, _ = cluster.nodes
    cluster.make_leader(None)
    first.names_leader = second.names_leader = ""
    hosts = cluster.hosts(first, second)
    with (
        Client(hosts, coalesce_appends=False, retry=QUICK, timeout=0.3) as db,
        pytest.raises(lethedb.NotLeader) as raised,
    ):
        db.append("orders-1", Event("Placed"))
    assert raised.value.leader == ""
    assert cluster.log.events == []


# -- reads with a node preference ------------------------------------------------------------


def test_reads_go_where_their_preference_says(cluster: FakeCluster) -> None:
    leader, first_follower, second_follower = cluster.nodes
    cluster.make_leader(leader)
    hosts = cluster.hosts(leader, first_follower, second_follower)
    with Client(hosts, prefer="follower", retry=QUICK) as db:
        db.append("orders-1", Event("Placed"))  # the client now knows the leader
        db.get_subject("user-1")
        db.get_subject("user-2", prefer="leader")
        list(db.read_all())
    assert [r.subject_id for r in leader.received("GetSubject")] == ["user-2"]
    assert [r.subject_id for r in first_follower.received("GetSubject")] == ["user-1"]
    assert len(first_follower.received("ReadAll")) == 1


def test_prefer_in_the_connection_string_is_the_clients_default(cluster: FakeCluster) -> None:
    leader, follower, _ = cluster.nodes
    cluster.make_leader(leader)
    with Client(cluster.hosts(leader, follower) + "?prefer=follower", retry=QUICK) as db:
        db.append("orders-1", Event("Placed"))
        db.get_checkpoint("projector")
    assert len(follower.received("GetCheckpoint")) == 1
    assert leader.received("GetCheckpoint") == []


def test_a_read_that_meets_a_follower_catching_up_moves_to_another_node(
    cluster: FakeCluster,
) -> None:
    lagging, leader, _ = cluster.nodes
    cluster.make_leader(leader)
    lagging.catching_up = True
    cluster.append_events(3)
    with Client(cluster.hosts(lagging, leader), prefer="any", retry=QUICK) as db:
        events = list(db.read_all())
    assert [event.position for event in events] == [1, 2, 3]
    assert len(lagging.received("ReadAll")) == 1
    assert len(leader.received("ReadAll")) == 1


def test_min_position_is_sent_with_every_read(cluster: FakeCluster) -> None:
    leader = cluster.nodes[0]
    cluster.make_leader(leader)
    cluster.append_events(2)
    with Client(leader.address, retry=QUICK) as db:
        list(db.read_all(min_position=2))
        list(db.read_stream("seed", min_position=2))
        list(db.export_subject("user-1", min_position=2))
        db.get_subject("user-1", min_position=2)
        db.get_checkpoint("projector", min_position=2)
    for method in ("ReadAll", "ReadStream", "ExportSubject", "GetSubject", "GetCheckpoint"):
        assert [request.min_position for request in leader.received(method)] == [2], method


def test_a_min_position_no_node_reaches_in_time_fails_unavailable(cluster: FakeCluster) -> None:
    leader = cluster.nodes[0]
    cluster.make_leader(leader)
    with Client(leader.address, retry=QUICK) as db, pytest.raises(lethedb.Unavailable):
        db.get_subject("user-1", min_position=10)


def test_bad_preferences_and_positions_are_refused_before_anything_is_sent(
    cluster: FakeCluster,
) -> None:
    leader = cluster.nodes[0]
    with pytest.raises(lethedb.ValidationError, match="prefer"):
        Client(leader.address, prefer="nearest")  # type: ignore[arg-type]
    with pytest.raises(lethedb.ValidationError, match="prefer"):
        Client(f"lethedb://{leader.address}?prefer=nearest")
    with Client(leader.address) as db:
        with pytest.raises(lethedb.ValidationError, match="prefer"):
            db.get_subject("user-1", prefer="closest")  # type: ignore[arg-type]
        with pytest.raises(lethedb.ValidationError, match="min_position"):
            db.get_subject("user-1", min_position=-1)
    assert leader.calls == []


# -- subscriptions move to another node ------------------------------------------------


def test_a_subscription_that_loses_its_node_resumes_on_another_without_gap_or_duplicate(
    cluster: FakeCluster,
) -> None:
    first, second, _ = cluster.nodes
    cluster.make_leader(first)
    cluster.append_events(5)
    with (
        Client(cluster.hosts(first, second), prefer="any", retry=QUICK) as db,
        db.subscribe(from_start=True) as subscription,
    ):
        positions = [next(subscription).position for _ in range(5)]  # type: ignore[union-attr]
        cluster.stop(first)
        cluster.append_events(5)
        positions += [next(subscription).position for _ in range(5)]  # type: ignore[union-attr]
        assert subscription.reconnects >= 1
    assert positions == list(range(1, 11))
    resumed = second.received("Subscribe")[0]
    assert resumed.after_position == 5
    assert resumed.min_position == 5


def test_an_asyncio_subscription_resumes_on_another_node_too(cluster: FakeCluster) -> None:
    first, second, _ = cluster.nodes
    cluster.make_leader(first)
    cluster.append_events(3)

    async def main() -> list[int]:
        positions: list[int] = []
        async with (
            AsyncClient(cluster.hosts(first, second), prefer="any", retry=QUICK) as db,
            db.subscribe(from_start=True) as subscription,
        ):
            async for item in subscription:
                positions.append(item.position)
                if item.position == 3:
                    await asyncio.to_thread(cluster.stop, first)
                    await asyncio.to_thread(cluster.append_events, 3)
                if item.position == 6:
                    break
        return positions

    assert asyncio.run(main()) == [1, 2, 3, 4, 5, 6]
    assert second.received("Subscribe")[0].after_position == 3


def test_a_group_members_commit_goes_to_the_node_serving_its_subscription(
    cluster: FakeCluster,
) -> None:
    leader, follower, _ = cluster.nodes
    cluster.make_leader(leader)
    cluster.append_events(2)
    with (
        Client(cluster.hosts(leader, follower), prefer="follower", retry=QUICK) as db,
        db.subscribe(group="projector") as subscription,
    ):
        db.append("orders-1", Event("Placed"))  # the client now knows the leader
        assert next(subscription).position == 1  # type: ignore[union-attr]
        assert subscription.commit()
    assert [request.position for request in follower.received("CommitCheckpoint")] == [1]
    assert leader.received("CommitCheckpoint") == []


def test_a_read_preferring_followers_skips_one_that_is_catching_up(cluster: FakeCluster) -> None:
    leader, lagging, current = cluster.nodes
    cluster.make_leader(leader)
    lagging.catching_up = True
    with Client(cluster.hosts(), prefer="follower", retry=QUICK) as db:
        db.append("orders-1", Event("Placed"))
        db.get_subject("user-1")
    assert len(lagging.received("GetSubject")) == 1
    assert len(current.received("GetSubject")) == 1
    assert leader.received("GetSubject") == []


# -- cluster status --------------------------------------------------------------------


def test_cluster_status_describes_the_leader_and_its_followers(cluster: FakeCluster) -> None:
    leader, follower, _ = cluster.nodes
    cluster.make_leader(leader)
    with Client(follower.address, retry=QUICK) as db:
        db.append("orders-1", Event("Placed"))
        status = db.admin.cluster_status()
    assert isinstance(status, lethedb.ClusterStatus)
    assert (status.node_id, status.role, status.term, status.leader) == (
        "node-0",
        "leader",
        4,
        leader.address,
    )
    assert status.sync_replicas == 1
    assert [f.node_id for f in status.followers] == ["node-1", "node-2"]
    follower_status = status.followers[0]
    assert isinstance(follower_status, lethedb.FollowerStatus)
    assert (follower_status.advertise, follower_status.lag_seconds) == (follower.address, 0.25)


def test_the_asyncio_client_follows_the_same_routes(cluster: FakeCluster) -> None:
    leader, follower, _ = cluster.nodes
    cluster.make_leader(leader)

    async def main() -> lethedb.ClusterStatus:
        async with AsyncClient(follower.address, coalesce_appends=False, retry=QUICK) as db:
            await db.append("orders-1", Event("Placed"))
            await db.commit([Append("b", Event("Placed"))])
            return await db.admin.cluster_status()

    status = asyncio.run(main())
    assert status.role == "leader"
    assert len(leader.received("Append")) == len(leader.received("Commit")) == 1
