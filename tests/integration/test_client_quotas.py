"""Per-client quotas: one client cannot hold every subscription or stream slot.

A client is a token when authentication is on, and a peer host when it is
off. Either way its calls are counted across all of its connections, so
opening more connections does not buy more slots; the call beyond a quota is
refused with RESOURCE_EXHAUSTED naming the option, and every other client is
still served.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import lethedb
from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import eventstore_pb2_grpc
from lethedb_server.api.tokens import create_token
from tests.integration.serverproc import ServerProcess

SUBSCRIPTIONS_PER_CLIENT = 2
STREAMS_PER_CLIENT = 4
#: Each channel gets a connection of its own.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def quota_args() -> tuple[str, ...]:
    return (
        "--max-subscriptions-per-client", str(SUBSCRIPTIONS_PER_CLIENT),
        "--max-streams-per-client", str(STREAMS_PER_CLIENT),
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | Path]:
    path = tmp_path_factory.mktemp("quotas") / "tokens.json"
    made: dict[str, str | Path] = {"path": path}
    for name in ("greedy", "other"):
        made[name], _ = create_token(path, "writer", name)
    return made


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tokens: dict[str, str | Path]
) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("quotas-server") / "data"
    proc = ServerProcess(data, "--tokens-file", str(tokens["path"]), *quota_args()).start()
    yield proc
    proc.stop()


class Calls:
    """Streaming calls held open, each on a connection of its own."""

    def __init__(self, address: str, token: str | None) -> None:
        self.address = address
        self.metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        self.channels: list[grpc.Channel] = []
        self.calls: list[grpc.Future] = []
        self.outgoing: list[queue.Queue[pb.AppendRequest | None]] = []

    def stub(self) -> eventstore_pb2_grpc.EventStoreStub:
        channel = grpc.insecure_channel(self.address, OWN_CONNECTION)
        self.channels.append(channel)
        return eventstore_pb2_grpc.EventStoreStub(channel)

    def subscribe(self) -> pb.SubscribeResponse:
        """A subscription, open once its first message arrived (or the refusal, raised)."""
        call = self.stub().Subscribe(pb.SubscribeRequest(from_end=True), metadata=self.metadata)
        self.calls.append(call)
        return next(call)

    def append_stream(self) -> pb.AppendResult:
        """An append stream, open once it answered its first append."""
        outgoing: queue.Queue[pb.AppendRequest | None] = queue.Queue()
        self.outgoing.append(outgoing)

        def requests() -> Iterator[pb.AppendRequest]:
            while (request := outgoing.get()) is not None:
                yield request

        call = self.stub().AppendStream(requests(), metadata=self.metadata)
        self.calls.append(call)
        outgoing.put(pb.AppendRequest(stream_id="quota", events=[pb.ProposedEvent(event_type="E")]))
        return next(call)

    def close(self) -> None:
        for outgoing in self.outgoing:
            outgoing.put(None)
        for call in self.calls:
            call.cancel()
        for channel in self.channels:
            channel.close()


def refused(open_call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        open_call()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return info.value


def test_a_token_cannot_hold_more_subscriptions_than_its_quota_over_many_connections(
    server, tokens
):
    greedy = Calls(server.address, str(tokens["greedy"]))
    other = Calls(server.address, str(tokens["other"]))
    try:
        for _ in range(SUBSCRIPTIONS_PER_CLIENT):
            assert greedy.subscribe().HasField("caught_up")
        error = refused(greedy.subscribe)
        assert "max_subscriptions_per_client" in error.details()
        assert "'greedy'" in error.details()
        assert other.subscribe().HasField("caught_up")  # another client is still served
        # The SDK names the refusal.
        with (
            lethedb.Client(server.address, token=str(tokens["greedy"])) as db,
            pytest.raises(lethedb.TooManySubscribers),
            db.subscribe(from_end=True) as sub,
        ):
            next(iter(sub))
        # A slot given back can be taken again.
        greedy.calls.pop(0).cancel()
        greedy.channels.pop(0).close()
        deadline = time.monotonic() + 10
        while True:  # the server gives the slot back once it has seen the cancel
            try:
                assert greedy.subscribe().HasField("caught_up")
                break
            except grpc.RpcError as exc:
                code = exc.code()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "a cancelled subscription kept its slot"
            time.sleep(0.05)
    finally:
        greedy.close()
        other.close()


def test_a_token_cannot_hold_more_streaming_calls_than_its_quota(server, tokens):
    greedy = Calls(server.address, str(tokens["greedy"]))
    other = Calls(server.address, str(tokens["other"]))
    try:
        for _ in range(SUBSCRIPTIONS_PER_CLIENT):
            greedy.subscribe()
        for _ in range(STREAMS_PER_CLIENT - SUBSCRIPTIONS_PER_CLIENT):
            assert greedy.append_stream().HasField("ok")
        error = refused(greedy.append_stream)
        assert "max_streams_per_client" in error.details()
        assert other.append_stream().HasField("ok")
    finally:
        greedy.close()
        other.close()


def test_without_tokens_the_quota_is_per_peer_host_whatever_the_connections(tmp_path):
    proc = ServerProcess(tmp_path / "data", *quota_args()).start()
    calls = Calls(proc.address, None)
    try:
        for _ in range(SUBSCRIPTIONS_PER_CLIENT):
            calls.subscribe()
        error = refused(calls.subscribe)
        assert "max_subscriptions_per_client" in error.details()
        assert "127.0.0.1" in error.details()
    finally:
        calls.close()
        proc.stop()
