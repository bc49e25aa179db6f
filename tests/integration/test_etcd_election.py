"""Leader election through a real etcd: one leader, growing terms, step-down on the own clock.

Each test runs its own cluster name on a shared etcd (or on an etcd of its
own when it stops, pauses or restarts it). Lease TTLs are short (2 s) so
takeovers happen within a few seconds; every wait is bounded and says what
it waited for.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from lethedb_server.coord.election import (
    Election,
    ElectionOptions,
    Leader,
    NodeInfo,
    Outcome,
    Progress,
)
from lethedb_server.coord.etcd import EtcdClient, EtcdUnavailable
from tests.etcdproc import EtcdProcess, etcd_binary
from tests.ports import free_port

TTL_S = 2
MARGIN_S = 0.8
ZERO = Progress(term=0, commit=0, position=0)


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    proc = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data", etcd_binary()).start()
    yield proc
    proc.stop()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    """An etcd of the test's own, for tests that pause or restart it."""
    proc = EtcdProcess(tmp_path / "etcd", etcd_binary()).start()
    yield proc
    proc.resume()
    proc.stop()


class Cluster:
    """Election instances of one cluster name, each with its own etcd client."""

    def __init__(self, endpoint: str, *, quorum: int = 1) -> None:
        self.endpoint = endpoint
        self.name = f"c{uuid.uuid4().hex[:10]}"
        self.quorum = quorum
        self.members: list[Election] = []

    async def join(self, node_id: str, progress: Progress = ZERO) -> Election:
        options = ElectionOptions(self.name, ttl_s=TTL_S, margin_s=MARGIN_S, quorum=self.quorum)
        node = NodeInfo(node_id, f"127.0.0.1:{7000 + len(self.members)}")
        client = EtcdClient(self.endpoint, timeout_s=1.0)
        election = Election(client, node, options, lambda: progress)
        await election.start()
        self.members.append(election)
        return election

    def leaders_now(self) -> list[str]:
        return [e.node.node_id for e in self.members if e.is_leader_now()]

    async def close(self) -> None:
        for election in self.members:
            await election.close()
            await election.client.close()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=60))


async def eventually(check: Callable[[], Awaitable[bool] | bool], within_s: float, what: str):
    deadline = time.monotonic() + within_s
    while True:
        outcome = check()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("size", [2, 3])
def test_of_nodes_campaigning_at_once_exactly_one_leads(shared_etcd: EtcdProcess, size: int):
    async def body() -> None:
        cluster = Cluster(shared_etcd.endpoint)
        try:
            members = [await cluster.join(f"n{i}") for i in range(size)]

            results = await asyncio.gather(*(m.campaign() for m in members))

            elected = [r for r in results if r.elected]
            assert len(elected) == 1, results
            winner = elected[0].leader
            assert winner is not None
            assert {r.outcome for r in results if not r.elected} == {Outcome.LED}
            assert all(r.leader == winner for r in results)
            assert cluster.leaders_now() == [winner.node.node_id]
            for member in members:
                assert await member.leader() == winner
        finally:
            await cluster.close()

    run(body)


def test_the_term_grows_with_every_new_leader(shared_etcd: EtcdProcess):
    async def body() -> None:
        cluster = Cluster(shared_etcd.endpoint)
        try:
            members = [await cluster.join(f"n{i}") for i in range(3)]
            terms = []
            for round_ in range(4):
                candidate = members[round_ % 3]
                terms.append(await asyncio.wait_for(candidate.campaign_until_elected(), 5))
                assert cluster.leaders_now() == [candidate.node.node_id]
                await candidate.resign()
                assert cluster.leaders_now() == []

            assert terms == sorted(set(terms)), terms
        finally:
            await cluster.close()

    run(body)


def test_watchers_see_each_leader_and_each_vacancy(shared_etcd: EtcdProcess):
    async def body() -> None:
        cluster = Cluster(shared_etcd.endpoint)
        try:
            a, b, watcher = [await cluster.join(n) for n in ("a", "b", "w")]
            seen: list[Leader | None] = []

            async def watch() -> None:
                async for leader in watcher.observe():
                    seen.append(leader)

            watching = asyncio.create_task(watch())
            await eventually(lambda: seen == [None], 5, "the watcher reports no leader at first")
            term_a = await a.campaign_until_elected()
            await a.resign()
            term_b = await b.campaign_until_elected()
            await eventually(lambda: len(seen) == 4, 5, f"four observations, got {seen}")
            watching.cancel()

            assert seen == [None, Leader(a.node, term_a), None, Leader(b.node, term_b)]
        finally:
            await cluster.close()

    run(body)


def test_a_leader_that_stops_renewing_is_replaced_once_its_lease_runs_out(
    shared_etcd: EtcdProcess,
):
    async def body() -> None:
        cluster = Cluster(shared_etcd.endpoint)
        try:
            a, b = await cluster.join("a"), await cluster.join("b")
            old_term = await a.campaign_until_elected()

            await a.abandon()  # a crashed leader: no resignation, no revocation
            refused = await b.campaign()
            new_term = await asyncio.wait_for(b.campaign_until_elected(), 3 * TTL_S)

            assert refused.outcome is Outcome.LED
            assert new_term > old_term
            assert cluster.leaders_now() == ["b"]
            assert await b.leader() == Leader(b.node, new_term)
        finally:
            await cluster.close()

    run(body)


def test_a_leader_cut_off_from_etcd_steps_down_before_its_lease_can_expire(
    own_etcd: EtcdProcess,
):
    async def body() -> None:
        cluster = Cluster(own_etcd.endpoint)
        try:
            a, b = await cluster.join("a"), await cluster.join("b")
            term = await a.campaign_until_elected()
            await eventually(a.is_leader_now, TTL_S, "a leads")

            own_etcd.pause()
            await eventually(lambda: not a.is_leader_now(), 2 * TTL_S, "a steps down")
            own_etcd.resume()

            # etcd still holds a's key: a stopped acknowledging while its lease was alive.
            async with EtcdClient(own_etcd.endpoint) as probe:
                key, _ = await probe.get(a.keys.leader)
            assert key is not None
            assert key.create_revision == term
            assert not b.is_leader_now()
            # Renewals work again: a leads again, in the same term; nobody else does.
            await eventually(a.is_leader_now, 2 * TTL_S, "a leads again once etcd answers")
            assert cluster.leaders_now() == ["a"]
            assert a.term == term
        finally:
            await cluster.close()

    run(body)


def test_a_less_advanced_node_does_not_campaign_while_a_more_advanced_one_lives(
    shared_etcd: EtcdProcess,
):
    async def body() -> None:
        cluster = Cluster(shared_etcd.endpoint, quorum=2)
        try:
            ahead = await cluster.join("ahead", Progress(term=3, commit=10, position=100))
            behind = await cluster.join("behind", Progress(term=3, commit=9, position=120))

            alone = await ahead.campaign()  # only its own position seen: not a quorum of 2
            refused = await behind.campaign()
            elected = await ahead.campaign()

            assert alone.outcome is Outcome.TOO_FEW, alone
            assert refused.outcome is Outcome.BEHIND, refused
            assert "ahead" in refused.reason
            assert elected.elected, elected
            assert cluster.leaders_now() == ["ahead"]
        finally:
            await cluster.close()

    run(body)


def test_a_later_term_outranks_a_longer_log(shared_etcd: EtcdProcess):
    async def body() -> None:
        cluster = Cluster(shared_etcd.endpoint)
        try:
            later = await cluster.join("later", Progress(term=5, commit=3, position=10))
            longer = await cluster.join("longer", Progress(term=4, commit=50, position=500))
            await later.campaign()
            await later.resign()

            refused = await longer.campaign()

            assert refused.outcome is Outcome.BEHIND, refused
        finally:
            await cluster.close()

    run(body)


def test_elections_carry_on_after_etcd_restarts(own_etcd: EtcdProcess):
    async def body() -> None:
        cluster = Cluster(own_etcd.endpoint)
        try:
            a, b = await cluster.join("a"), await cluster.join("b")
            term = await a.campaign_until_elected()

            own_etcd.restart()

            # etcd keeps its leases across a restart: a renews and leads on, in its term.
            await eventually(a.is_leader_now, 3 * TTL_S, "a leads after the restart")
            assert (await b.campaign()).outcome is Outcome.LED
            assert a.term == term
            # And elections still work: a leaves, b takes over in a higher term.
            await a.close()
            assert await asyncio.wait_for(b.campaign_until_elected(), 3 * TTL_S) > term
            assert cluster.leaders_now() == ["b"]
        finally:
            await cluster.close()

    run(body)


def test_a_leader_paused_out_of_its_lease_is_replaced_in_a_higher_term(own_etcd: EtcdProcess):
    async def body() -> None:
        cluster = Cluster(own_etcd.endpoint)
        try:
            a, b = await cluster.join("a"), await cluster.join("b")
            old_term = await a.campaign_until_elected()

            own_etcd.pause()  # longer than the TTL: etcd lets every lease run out on resume
            await eventually(lambda: not a.is_leader_now(), 2 * TTL_S, "a steps down")
            await asyncio.sleep(TTL_S + 0.5)
            own_etcd.resume()
            winner = await asyncio.wait_for(
                asyncio.wait(
                    [asyncio.create_task(m.campaign_until_elected()) for m in (a, b)],
                    return_when=asyncio.FIRST_COMPLETED,
                ),
                4 * TTL_S,
            )

            (done,), pending = winner
            for task in pending:
                task.cancel()
            assert done.result() > old_term
            await eventually(lambda: len(cluster.leaders_now()) == 1, TTL_S, "one leader")
        finally:
            await cluster.close()

    run(body)


def test_a_leader_whose_key_is_deleted_steps_down(shared_etcd: EtcdProcess):
    async def body() -> None:
        cluster = Cluster(shared_etcd.endpoint)
        try:
            a = await cluster.join("a")
            await a.campaign_until_elected()

            async with EtcdClient(shared_etcd.endpoint) as operator:
                assert await operator.delete(a.keys.leader) == 1

            await eventually(lambda: not a.is_leader_now(), 2 * TTL_S, "a steps down")
            assert a.term is None
        finally:
            await cluster.close()

    run(body)


def test_after_the_leader_dies_the_majority_elects_the_node_holding_the_most(
    shared_etcd: EtcdProcess,
):
    """3 nodes, sync_replicas 1, quorum 2: the last acknowledged write is on the leader and b."""

    async def body() -> None:
        cluster = Cluster(shared_etcd.endpoint, quorum=2)
        try:
            old = await cluster.join("old", Progress(term=2, commit=12, position=40))
            b = await cluster.join("b", Progress(term=2, commit=12, position=40))
            c = await cluster.join("c", Progress(term=2, commit=11, position=38))
            assert (await c.campaign()).outcome is Outcome.TOO_FEW  # c publishes, alone
            assert (await old.campaign()).elected  # with c's position: a quorum of 2

            await old.abandon()
            new_term = await asyncio.wait_for(
                race(b.campaign_until_elected(), c.campaign_until_elected()), 4 * TTL_S
            )

            assert cluster.leaders_now() == ["b"]
            assert await c.leader() == Leader(b.node, new_term)
        finally:
            await cluster.close()

    run(body)


async def race(*campaigns: Awaitable[int]) -> int:
    """The term of the first campaign to win; the others are cancelled."""
    tasks = [asyncio.ensure_future(c) for c in campaigns]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return next(iter(done)).result()


def test_the_watch_carries_on_across_an_etcd_restart(own_etcd: EtcdProcess):
    async def body() -> None:
        cluster = Cluster(own_etcd.endpoint)
        try:
            a, b, watcher = [await cluster.join(n) for n in ("a", "b", "w")]
            seen: list[Leader | None] = []

            async def watch() -> None:
                async for leader in watcher.observe(retry_s=0.05):
                    seen.append(leader)

            watching = asyncio.create_task(watch())
            term_a = await a.campaign_until_elected()
            await eventually(lambda: Leader(a.node, term_a) in seen, 5, "the watcher sees a")

            own_etcd.restart()
            await a.resign()
            term_b = await asyncio.wait_for(b.campaign_until_elected(), 4 * TTL_S)

            await eventually(
                lambda: seen[-1] == Leader(b.node, term_b), 4 * TTL_S, f"b last, got {seen}"
            )
            watching.cancel()
        finally:
            await cluster.close()

    run(body)


def test_the_client_moves_to_another_endpoint_when_one_is_down(shared_etcd: EtcdProcess):
    async def body() -> None:
        down = f"http://127.0.0.1:{free_port()}"
        async with EtcdClient([down, shared_etcd.endpoint], timeout_s=1.0) as client:
            key = f"/lethedb-test/{uuid.uuid4().hex}".encode()
            revision = await client.put(key, b"v")
            found, _ = await client.get(key)

        assert found is not None
        assert (found.value, found.mod_revision) == (b"v", revision)

    run(body)


def test_a_client_without_a_reachable_endpoint_says_so(shared_etcd: EtcdProcess):
    async def body() -> None:
        async with EtcdClient(f"127.0.0.1:{free_port()}", timeout_s=0.5) as client:
            with pytest.raises(EtcdUnavailable, match="no member answered"):
                await client.get(b"/anything")

    run(body)


def test_a_revoked_lease_takes_its_keys_and_renews_no_more(shared_etcd: EtcdProcess):
    async def body() -> None:
        async with EtcdClient(shared_etcd.endpoint) as client:
            key = f"/lethedb-test/{uuid.uuid4().hex}".encode()
            lease, granted = await client.grant_lease(TTL_S)
            first = await client.put_if_absent(key, b"mine", lease)
            second = await client.put_if_absent(key, b"theirs", lease)
            renewed = await client.keep_alive_once(lease)

            await client.revoke_lease(lease)
            await client.revoke_lease(lease)  # already gone: no error
            after_revoke, _ = await client.get(key)

            assert granted >= TTL_S
            assert first.created
            assert not second.created
            assert second.kv is not None
            assert (second.kv.value, second.kv.create_revision) == (b"mine", first.revision)
            assert renewed >= TTL_S
            assert after_revoke is None
            assert await client.keep_alive_once(lease) == 0

    run(body)
