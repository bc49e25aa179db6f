"""Who may move a consumer group, how far, and how many groups there may be.

A group's checkpoint decides what its members are sent: a checkpoint moved
past a ``$subject.forgotten`` event hides that erasure from the group's
projection, and every group is a row the store keeps for ever. So:

* only a ``consumer`` (or higher) token may join a group or commit its
  checkpoint; a ``reader`` may only read it;
* a checkpoint moves forward only, unless an admin sets it back;
* the number of groups with a stored checkpoint is bounded
  (``max_consumer_groups``), and a new group beyond it writes nothing;
* group names follow the rules of stream ids.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import lethedb
from examples.users_read_model import Users as ReadModel
from lethedb.projections import ProjectionError, ProjectionRunner
from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import eventstore_pb2_grpc
from lethedb_server.api.tokens import create_token
from tests.integration.serverproc import ServerProcess

ROLES = ("reader", "consumer", "writer", "admin")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | Path]:
    path = tmp_path_factory.mktemp("group-access") / "tokens.json"
    made: dict[str, str | Path] = {"path": path}
    for role in ROLES:
        made[role], _ = create_token(path, role, f"group-{role}")
    return made


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tokens: dict[str, str | Path]
) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("group-access-server") / "data"
    proc = ServerProcess(data, "--tokens-file", str(tokens["path"])).start()
    yield proc
    proc.stop()


def token(tokens: dict[str, str | Path], role: str) -> str:
    value = tokens[role]
    assert isinstance(value, str)
    return value


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


def group_name() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


def fill(server: ServerProcess, admin: str, count: int = 5) -> int:
    """Append *count* events; the head after them."""
    with lethedb.Client(server.address, token=admin) as db:
        result = db.append(
            f"groups-{uuid.uuid4().hex[:8]}", [lethedb.Event("E", b"{}") for _ in range(count)]
        )
    return result.last_position


def commit(stub: eventstore_pb2_grpc.EventStoreStub, who: str, group: str, position: int) -> int:
    response = stub.CommitCheckpoint(
        pb.CommitCheckpointRequest(group=group, position=position), metadata=bearer(who), timeout=10
    )
    return int(response.position)


def stored(stub: eventstore_pb2_grpc.EventStoreStub, who: str, group: str) -> int | None:
    response = stub.GetCheckpoint(
        pb.GetCheckpointRequest(group=group), metadata=bearer(who), timeout=10
    )
    return int(response.position) if response.found else None


def first_response(
    stub: eventstore_pb2_grpc.EventStoreStub, who: str, request: pb.SubscribeRequest
) -> pb.SubscribeResponse:
    call = stub.Subscribe(request, metadata=bearer(who), timeout=10)
    try:
        return next(iter(call))
    finally:
        call.cancel()


def code_of(call: object) -> grpc.StatusCode:
    try:
        call() if callable(call) else None
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_a_reader_can_neither_commit_a_checkpoint_nor_join_a_group(server, tokens):
    """The attack of issue 18: a reader moved a group past an erasure event."""
    reader = token(tokens, "reader")
    head = fill(server, token(tokens, "admin"))
    group = group_name()
    with grpc.insecure_channel(server.address) as channel:
        stub = eventstore_pb2_grpc.EventStoreStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            commit(stub, reader, group, head)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "consumer role" in denied.value.details()
        assert stored(stub, reader, group) is None, "a refused commit wrote a checkpoint"

        with pytest.raises(grpc.RpcError) as denied:
            first_response(stub, reader, pb.SubscribeRequest(group=group, after_position=0))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "joining a consumer group needs the consumer role" in denied.value.details()
        # Reading stays a reader's right: a plain subscription works.
        plain = first_response(stub, reader, pb.SubscribeRequest(after_position=head - 1))
        assert plain.HasField("events")


def test_a_consumer_moves_a_checkpoint_forward_and_only_an_admin_moves_it_back(server, tokens):
    consumer, writer, admin = (token(tokens, r) for r in ("consumer", "writer", "admin"))
    head = fill(server, admin)
    group = group_name()
    with grpc.insecure_channel(server.address) as channel:
        stub = eventstore_pb2_grpc.EventStoreStub(channel)
        assert commit(stub, consumer, group, head - 2) == head - 2
        assert commit(stub, consumer, group, head - 2) == head - 2  # the same: no move
        for who in (consumer, writer):
            with pytest.raises(grpc.RpcError) as denied:
                commit(stub, who, group, head - 4)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "needs the admin role" in denied.value.details()
            assert stored(stub, consumer, group) == head - 2, "a refused rewind was written"
        assert commit(stub, consumer, group, head) == head
        assert commit(stub, admin, group, 1) == 1  # an admin's reset
        assert stored(stub, consumer, group) == 1


def test_a_consumer_token_runs_a_projection_with_a_group_and_a_rebuild_needs_admin(
    server, tokens, tmp_path
):
    admin = token(tokens, "admin")
    fill(server, admin)
    group = group_name()
    path = tmp_path / "users.db"

    def run(who: str, *, rebuild: bool = False) -> int:
        with lethedb.Client(server.address, token=who) as db:
            runner = ProjectionRunner(ReadModel(path), db, group=group, until_caught_up=True)
            return runner.run(rebuild=rebuild)

    consumer = token(tokens, "consumer")
    position = run(consumer)
    assert position > 0
    with lethedb.Client(server.address, token=consumer) as db:
        assert db.get_checkpoint(group) == position
    with pytest.raises(ProjectionError) as refused:
        run(consumer, rebuild=True)
    assert "admin" in str(refused.value)
    assert run(admin, rebuild=True) >= position  # the documented way: rebuild as admin
    assert run(consumer) >= position  # and back to the daemon's own token


@pytest.mark.parametrize(
    "bad",
    ["$system", "nul\x00inside", " padded", "tab\t", "x" * 129],
)
def test_group_names_are_held_to_the_rules_of_stream_ids(server, tokens, bad):
    consumer = token(tokens, "consumer")
    with grpc.insecure_channel(server.address) as channel:
        stub = eventstore_pb2_grpc.EventStoreStub(channel)
        calls = {
            "CommitCheckpoint": lambda: commit(stub, consumer, bad, 0),
            "GetCheckpoint": lambda: stored(stub, consumer, bad),
            "Subscribe": lambda: first_response(stub, consumer, pb.SubscribeRequest(group=bad)),
        }
        codes = {name: code_of(call) for name, call in calls.items()}
    assert codes == dict.fromkeys(calls, grpc.StatusCode.INVALID_ARGUMENT)


def test_groups_beyond_max_consumer_groups_are_refused_and_nothing_is_written(tmp_path):
    limit = 3
    proc = ServerProcess(tmp_path / "data", "--max-consumer-groups", str(limit)).start()
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            stub.Append(
                pb.AppendRequest(stream_id="s", events=[pb.ProposedEvent(event_type="E")] * 3),
                timeout=10,
            )

            def commit_as_anyone(group: str, position: int) -> None:
                stub.CommitCheckpoint(
                    pb.CommitCheckpointRequest(group=group, position=position), timeout=10
                )

            for n in range(limit):
                commit_as_anyone(f"group-{n}", 1)
            with pytest.raises(grpc.RpcError) as refused:
                commit_as_anyone("one-too-many", 1)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_consumer_groups" in refused.value.details()
            missing = stub.GetCheckpoint(pb.GetCheckpointRequest(group="one-too-many"))
            assert not missing.found
            with pytest.raises(grpc.RpcError) as refused:
                next(iter(stub.Subscribe(pb.SubscribeRequest(group="new-member"), timeout=10)))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The groups there are keep working.
            commit_as_anyone("group-0", 2)
            assert stub.GetCheckpoint(pb.GetCheckpointRequest(group="group-0")).position == 2
            call = stub.Subscribe(pb.SubscribeRequest(group="group-1"), timeout=10)
            assert next(iter(call)).HasField("assignment")
            call.cancel()
    finally:
        proc.stop()
