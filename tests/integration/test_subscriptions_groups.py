"""Consumer groups: partitioned delivery, server-side checkpoints, rebalancing.

Members of a group share its events: every event of one subject goes to the
same member while the membership stays the same; at every join or leave each
member restarts after the group's checkpoint with its new share, so nothing
is lost and at most the events after the checkpoint are delivered again.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator

import grpc
import pytest

from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server.engine.subscriptions import partition_of
from tests.integration.serverproc import ServerProcess
from tests.integration.subscribing import (
    Received,
    Stub,
    append,
    follow,
    head,
    proposed,
    uid,
    wait_until,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("groups") / "data").start()
    yield proc
    proc.stop()


def run(server: ServerProcess, scenario) -> None:
    async def main() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await asyncio.wait_for(scenario(Stub(channel)), 60)

    asyncio.run(main())


class Member:
    """One group member: its call, what it received, and a task following it."""

    def __init__(self, stub: Stub, group: str, member_id: str, after: int) -> None:
        self.stub = stub
        self.group = group
        self.member_id = member_id
        self.received = Received()
        self.call = stub.Subscribe(
            pb.SubscribeRequest(group=group, member_id=member_id, after_position=after)
        )
        self.task = asyncio.create_task(follow(self.call, self.received))

    @property
    def assignment(self) -> pb.GroupAssignment | None:
        return self.received.assignments[-1] if self.received.assignments else None

    def has_members(self, count: int) -> bool:
        a = self.assignment
        return a is not None and len(a.members) == count

    async def commit(self, position: int | None = None) -> pb.CommitCheckpointResponse:
        assert self.assignment is not None
        return await self.stub.CommitCheckpoint(
            pb.CommitCheckpointRequest(
                group=self.group,
                member_id=self.member_id,
                generation=self.assignment.generation,
                position=self.received.last_position if position is None else position,
            )
        )

    async def leave(self) -> None:
        self.call.cancel()
        await self.task


async def append_subjects(stub: Stub, tag: str, subjects: int, rounds: int) -> list[int]:
    """*rounds* events for each of *subjects* subjects (and some subject-less ones)."""
    positions = []
    for r in range(rounds):
        for s in range(subjects):
            result = await append(
                stub,
                f"user-{tag}-{s}",
                [proposed("Changed", f"subj-{tag}-{s}", str(r).encode())],
            )
            positions.append(result.last_position)
        result = await append(stub, f"system-{tag}-{r % 3}", [proposed("Tick")])
        positions.append(result.last_position)
    return positions


def check_per_subject_order(events: list[pb.RecordedEvent]) -> None:
    versions: dict[str, list[int]] = defaultdict(list)
    for e in events:
        versions[e.stream_id].append(e.stream_version)
    for stream, seen in versions.items():
        assert seen == sorted(seen), f"{stream} out of order: {seen}"


def test_three_members_share_the_events_disjointly_by_subject_and_in_order(server):
    async def scenario(stub: Stub) -> None:
        tag, group = uid(), f"g-{uid()}"
        start = await head(stub)
        members = [Member(stub, group, f"m{i}", start) for i in range(3)]
        await wait_until(lambda: all(m.has_members(3) for m in members), what="3 members")
        assert [m.assignment.generation for m in members] == [3, 3, 3]
        assert all(m.assignment.restart_after == start for m in members)

        positions = await append_subjects(stub, tag, subjects=30, rounds=4)
        end = positions[-1]
        await wait_until(
            lambda: all(m.received.last_position >= end for m in members), what="delivery"
        )
        shares = [{e.position for e in m.received.current} for m in members]
        assert not (shares[0] & shares[1])
        assert not (shares[0] & shares[2])
        assert not (shares[1] & shares[2])
        assert set().union(*shares) == set(range(start + 1, end + 1))
        assert all(shares), "every member got a share"
        for index, m in enumerate(members):
            assert m.assignment.member_index == index
            assert [e.position for e in m.received.current] == sorted(shares[index])
            check_per_subject_order(m.received.current)
            for e in m.received.current:
                key = e.subject_id or e.stream_id
                assert partition_of(key, 3) == index, "the documented partition function"
        for m in members:
            await m.leave()

    run(server, scenario)


def test_a_member_that_dies_hands_its_share_to_the_others_and_nothing_is_lost(server):
    async def scenario(stub: Stub) -> None:
        tag, group = uid(), f"g-{uid()}"
        start = await head(stub)
        a, b, c = (Member(stub, group, name, start) for name in ("a", "b", "c"))
        await wait_until(lambda: all(m.has_members(3) for m in (a, b, c)), what="3 members")

        first = await append_subjects(stub, tag, subjects=20, rounds=2)
        committed = first[-1]
        await wait_until(lambda: all(m.received.last_position >= committed for m in (a, b, c)))
        for m in (a, b, c):
            assert (await m.commit()).accepted
        checkpoint = await stub.GetCheckpoint(pb.GetCheckpointRequest(group=group))
        assert (checkpoint.found, checkpoint.position) == (True, committed)

        second = await append_subjects(stub, tag, subjects=20, rounds=2)
        end = second[-1]
        await wait_until(lambda: all(m.received.last_position >= end for m in (a, b, c)))
        c_share = [e.position for e in c.received.current if e.position > committed]
        assert c_share, "c received part of the second batch"
        generation = a.assignment.generation
        await c.leave()  # c dies without committing the second batch

        await wait_until(lambda: a.has_members(2) and b.has_members(2), what="rebalance")
        for m in (a, b):
            assert m.assignment.generation == generation + 1
            assert m.assignment.restart_after == committed
        await wait_until(lambda: all(m.received.last_position >= end for m in (a, b)))
        after = [{e.position for e in m.received.current} for m in (a, b)]
        assert not (after[0] & after[1])
        assert after[0] | after[1] == set(range(committed + 1, end + 1)), "nothing lost"
        assert set(c_share) <= after[0] | after[1], "c's uncommitted events were handed out again"
        for m in (a, b):
            check_per_subject_order(m.received.current)
        # A late commit for the old generation is not applied.
        stale = await stub.CommitCheckpoint(
            pb.CommitCheckpointRequest(
                group=group, member_id="a", generation=generation, position=end
            )
        )
        assert (stale.accepted, stale.position) == (False, committed)
        for m in (a, b):
            await m.leave()

    run(server, scenario)


def test_the_group_checkpoint_is_the_lowest_commit_of_its_live_members(server):
    async def scenario(stub: Stub) -> None:
        tag, group = uid(), f"g-{uid()}"
        start = await head(stub)
        a, b = Member(stub, group, "a", start), Member(stub, group, "b", start)
        await wait_until(lambda: a.has_members(2) and b.has_members(2))
        positions = await append_subjects(stub, tag, subjects=10, rounds=2)
        end = positions[-1]
        await wait_until(lambda: a.received.last_position >= end)
        await wait_until(lambda: b.received.last_position >= end)

        middle = positions[len(positions) // 2]
        assert (await a.commit()).position == 0  # b has committed nothing yet
        response = await b.commit(middle)
        assert (response.accepted, response.position) == (True, middle)
        assert (await b.commit()).position == end
        for m in (a, b):
            await m.leave()

    run(server, scenario)


def test_a_group_resumes_after_its_stored_checkpoint(server):
    async def scenario(stub: Stub) -> None:
        tag, group = uid(), f"g-{uid()}"
        start = await head(stub)
        solo = Member(stub, group, "solo", start)
        first = await append(stub, f"s-{tag}", [proposed() for _ in range(10)])
        await wait_until(lambda: solo.received.last_position >= first.last_position)
        middle = first.first_position + 4
        assert (await solo.commit(middle)).position == middle
        await solo.leave()

        again = Member(stub, group, "solo", 0)  # the start is ignored: the group has a checkpoint
        await wait_until(lambda: again.received.caught_up)
        assert again.assignment.restart_after == middle
        assert again.received.positions == list(range(middle + 1, first.last_position + 1))
        await again.leave()

    run(server, scenario)


def test_checkpoints_without_a_member_only_when_the_group_has_no_live_members(server):
    async def scenario(stub: Stub) -> None:
        group = f"g-{uid()}"
        start = await head(stub)
        member = Member(stub, group, "m", start)
        await wait_until(lambda: member.assignment is not None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CommitCheckpoint(pb.CommitCheckpointRequest(group=group, position=start))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "live members" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CommitCheckpoint(
                pb.CommitCheckpointRequest(group=group, member_id="ghost", generation=1)
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await member.leave()

        # With no live member an operator may set it, also backwards (to replay).
        response = await stub.CommitCheckpoint(pb.CommitCheckpointRequest(group=group, position=1))
        assert (response.accepted, response.position) == (True, 1)
        stored = await stub.GetCheckpoint(pb.GetCheckpointRequest(group=group))
        assert (stored.found, stored.position) == (True, 1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CommitCheckpoint(
                pb.CommitCheckpointRequest(group=group, position=start + 10**6)
            )
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        missing = await stub.GetCheckpoint(pb.GetCheckpointRequest(group=f"never-{uid()}"))
        assert (missing.found, missing.position) == (False, 0)

    run(server, scenario)


def test_a_member_subscribing_again_replaces_its_earlier_call(server):
    async def scenario(stub: Stub) -> None:
        group = f"g-{uid()}"
        start = await head(stub)
        old = Member(stub, group, "m", start)
        await wait_until(lambda: old.received.caught_up)
        new = Member(stub, group, "m", start)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await old.task
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert "replaced" in info.value.details()
        await wait_until(lambda: new.received.caught_up)
        assert new.assignment.members == ["m"]
        await new.leave()

    run(server, scenario)


def test_the_server_names_a_member_that_did_not_choose_an_id(server):
    async def scenario(stub: Stub) -> None:
        group = f"g-{uid()}"
        anonymous = Member(stub, group, "", await head(stub))
        await wait_until(lambda: anonymous.assignment is not None)
        assert anonymous.assignment.member_id
        assert list(anonymous.assignment.members) == [anonymous.assignment.member_id]
        await anonymous.leave()

    run(server, scenario)
