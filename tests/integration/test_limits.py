"""Resource limits against a real server: the right code, and everybody else still served.

One server with deliberately small limits: 1 MiB messages, 4 streaming calls
per connection, 4 appends in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import eventstore_pb2_grpc
from tests.integration.serverproc import ServerProcess

MAX_MESSAGE = 1 << 20
STREAMS_PER_CONNECTION = 4
INFLIGHT_APPENDS = 4
#: A channel with a connection of its own (the default pool would share one).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("limits") / "data",
        "--max-message-bytes", str(MAX_MESSAGE),
        "--max-streams-per-connection", str(STREAMS_PER_CONNECTION),
        "--max-inflight-appends", str(INFLIGHT_APPENDS),
    ).start()  # fmt: skip
    yield proc
    proc.stop()


def append_request(stream: str, size: int = 16, events: int = 1) -> pb.AppendRequest:
    return pb.AppendRequest(
        stream_id=stream,
        events=[pb.ProposedEvent(event_type="Sized", data=b"x" * size) for _ in range(events)],
    )


def serving(channel: grpc.Channel) -> bool:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return response.status == health_pb2.HealthCheckResponse.SERVING


def test_an_oversize_message_is_resource_exhausted_and_others_are_still_served(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = eventstore_pb2_grpc.EventStoreStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Append(append_request("oversize", 2 * MAX_MESSAGE), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in refused.value.details()
        with pytest.raises(grpc.RpcError) as in_stream:
            list(stub.AppendStream(iter([append_request("oversize", 2 * MAX_MESSAGE)]), timeout=10))
        assert in_stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Same connection, right after: served, and nothing of the refused calls was written.
        assert stub.Append(append_request("oversize"), timeout=10).first_version == 0
        assert serving(channel)


def test_streaming_calls_beyond_the_per_connection_limit_are_refused_and_others_served(server):
    async def main() -> None:
        async with (
            grpc.aio.insecure_channel(server.address) as busy,
            grpc.aio.insecure_channel(server.address, options=OWN_CONNECTION) as other,
        ):
            stub = eventstore_pb2_grpc.EventStoreStub(busy)
            done = asyncio.Event()

            async def held_open(stream: str) -> AsyncIterator[pb.AppendRequest]:
                yield append_request(stream)
                await done.wait()

            open_calls = []
            for i in range(STREAMS_PER_CONNECTION):
                call = stub.AppendStream(held_open(f"held-{i}"), timeout=30)
                assert (await call.read()).HasField("ok")  # established and counted
                open_calls.append(call)

            async def silent() -> AsyncIterator[pb.AppendRequest]:
                # The refusal comes when the call starts. A request written
                # meanwhile races the server's close, and grpc.aio then reports
                # its own INTERNAL send failure instead of the server's status.
                await done.wait()
                return
                yield

            extra = stub.AppendStream(silent(), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await extra.read()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams_per_connection" in (refused.value.details() or "")

            # The same connection still serves unary calls; another connection streams.
            assert (await stub.Append(append_request("busy-unary"), timeout=10)).last_version == 0
            other_stub = eventstore_pb2_grpc.EventStoreStub(other)
            responses = [r async for r in other_stub.AppendStream(_one("other"), timeout=10)]
            assert responses[0].HasField("ok")

            # A finished call frees its slot. The server releases it when its
            # handler returns, which may be just after the client saw the end.
            done.set()
            for call in open_calls:
                assert await call.read() is grpc.aio.EOF
            again = await _stream_once_slot_is_free(stub, "again")
            assert again[0].HasField("ok")

    asyncio.run(main())


async def _one(stream: str) -> AsyncIterator[pb.AppendRequest]:
    yield append_request(stream)


async def _stream_once_slot_is_free(
    stub: eventstore_pb2_grpc.EventStoreStub, stream: str
) -> list[pb.AppendResult]:
    """Open a stream, retrying for a few seconds while freed slots are being released."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        try:
            return [r async for r in stub.AppendStream(_one(stream), timeout=10)]
        except grpc.aio.AioRpcError as exc:
            late = asyncio.get_running_loop().time() > deadline
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or late:
                raise
            await asyncio.sleep(0.05)


def test_appends_beyond_the_in_flight_limit_are_refused_and_write_nothing(server):
    """Concurrent heavy appends: those over the limit are refused at once, the rest land."""
    events_per_append = 400

    async def burst(stub: eventstore_pb2_grpc.EventStoreStub, stream: str) -> list[object]:
        calls = [
            stub.Append(append_request(stream, 1024, events_per_append), timeout=60)
            for _ in range(40)
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    async def main() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            for attempt in range(5):  # one burst suffices in practice; never flake
                stream = f"inflight-{attempt}"
                outcomes = await burst(stub, stream)
                refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
                written = [o for o in outcomes if isinstance(o, pb.AppendResponse)]
                assert len(refused) + len(written) == len(outcomes)
                if refused:
                    break
            assert refused, "40 concurrent appends never exceeded a limit of 4 in flight"
            for error in refused:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_inflight_appends" in (error.details() or "")
            assert written
            versions = [e.stream_version async for r in stub.ReadStream(
                pb.ReadStreamRequest(stream_id=stream)) for e in r.events]  # fmt: skip
            assert len(versions) == len(written) * events_per_append
            # Once the burst is over, appends are accepted again.
            assert (await stub.Append(append_request("after-burst"), timeout=10)).last_version == 0

    asyncio.run(main())
