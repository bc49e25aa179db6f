"""A small etcd v3 client: exactly the calls leader election needs.

Written on the stubs generated from etcd's own .proto files (``etcdpb``) with
the project's pinned grpcio and protobuf, rather than on a third-party client:
see docs/CLUSTERING.md, "Coordinator: etcd". Everything here is asyncio
(``grpc.aio``), like the server.

Several endpoints (the members of an etcd cluster) may be given: a call that
finds its member unreachable is tried on the next one, so the client rides
through the loss of a minority of etcd members. Every call has a deadline, so
a paused or partitioned etcd turns into :class:`EtcdUnavailable` rather than a
hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TypeVar

import grpc

from lethedb_server.coord.endpoints import parse_endpoints
from lethedb_server.coord.etcdpb import kv_pb2, rpc_pb2, rpc_pb2_grpc

T = TypeVar("T")

#: Codes after which the same call may succeed on another member (or later).
RETRY_ELSEWHERE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}
)


class EtcdError(Exception):
    """etcd answered, but not as a call expects (a refused request, a bad answer).

    ``code`` is the gRPC status etcd answered with, when it did.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No etcd member answered within the deadline."""


class _NoAnswer(Exception):
    """A member closed a stream without answering: try the next one, as for UNAVAILABLE."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key as etcd holds it, with the revisions the election reasons with."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv: kv_pb2.KeyValue) -> KeyValue:
        return cls(
            key=kv.key,
            value=kv.value,
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
            version=kv.version,
            lease=kv.lease,
        )


class EventKind(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change of a watched key. For a deletion, ``kv.mod_revision`` is the deletion's."""

    kind: EventKind
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class PutIfAbsent:
    """What a put-if-absent found: whether it created the key, and the key as it now stands."""

    created: bool
    kv: KeyValue | None
    revision: int


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """Client TLS to etcd: the CA that signed etcd's certificate, and an optional client pair."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


@dataclass(slots=True)
class _Member:
    """One etcd endpoint: its channel and the stubs on it."""

    address: str
    channel: grpc.aio.Channel
    kv: rpc_pb2_grpc.KVAsyncStub
    lease: rpc_pb2_grpc.LeaseAsyncStub
    watch: rpc_pb2_grpc.WatchAsyncStub


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes a range (or a watch) cover every key starting with *prefix*."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


class EtcdClient:
    """Leases, transactions, ranges and watches on one etcd cluster."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout_s: float = 2.0,
        tls: EtcdTls | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        credentials = tls.credentials() if tls is not None else None
        self._members = [
            self._connect(address, credentials) for address in parse_endpoints(endpoints)
        ]
        self._current = 0

    @staticmethod
    def _connect(address: str, credentials: grpc.ChannelCredentials | None) -> _Member:
        channel = (
            grpc.aio.secure_channel(address, credentials)
            if credentials is not None
            else grpc.aio.insecure_channel(address)
        )
        return _Member(
            address=address,
            channel=channel,
            kv=rpc_pb2_grpc.KVStub(channel),
            lease=rpc_pb2_grpc.LeaseStub(channel),
            watch=rpc_pb2_grpc.WatchStub(channel),
        )

    async def close(self) -> None:
        await asyncio.gather(*(member.channel.close(None) for member in self._members))

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, what: str, call: Callable[[_Member], Awaitable[T]]) -> T:
        """Run *call* on the current member; on an unreachable one, try the next ones."""
        failures = []
        for _ in self._members:
            member = self._members[self._current]
            try:
                return await call(member)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRY_ELSEWHERE:
                    raise EtcdError(
                        f"etcd {what}: {error.code().name}: {error.details()}", error.code()
                    ) from None
                failures.append(f"{member.address}: {error.code().name}")
            except _NoAnswer as error:
                failures.append(f"{member.address}: {error}")
            self._current = (self._current + 1) % len(self._members)
        raise EtcdUnavailable(f"etcd {what}: no member answered ({'; '.join(failures)})")

    # -- leases ------------------------------------------------------------

    async def grant_lease(self, ttl_s: int) -> tuple[int, int]:
        """A new lease of *ttl_s* seconds: (lease id, the TTL etcd granted, which may be longer)."""
        request = rpc_pb2.LeaseGrantRequest(TTL=ttl_s)
        response = await self._call(
            "lease grant", lambda m: m.lease.LeaseGrant(request, timeout=self.timeout_s)
        )
        if response.error:
            raise EtcdError(f"etcd lease grant: {response.error}")
        return response.ID, response.TTL

    async def keep_alive_once(self, lease_id: int, timeout_s: float | None = None) -> int:
        """Renew a lease once: its TTL from now on, or 0 when etcd no longer knows it.

        One short stream per renewal: nothing to resynchronise after a broken
        connection or an etcd restart, and the caller times each renewal itself
        (*timeout_s*, default the client's).
        """
        timeout = timeout_s if timeout_s is not None else self.timeout_s

        async def renew(member: _Member) -> int:
            call = member.lease.LeaseKeepAlive(
                iter([rpc_pb2.LeaseKeepAliveRequest(ID=lease_id)]), timeout=timeout
            )
            try:
                async for response in call:
                    return response.TTL
            finally:
                call.cancel()
            raise _NoAnswer("the keep-alive stream closed without an answer")

        return await self._call("lease keep-alive", renew)

    async def revoke_lease(self, lease_id: int) -> None:
        """End a lease now: etcd deletes every key attached to it. An unknown lease is no error."""
        request = rpc_pb2.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(
                "lease revoke", lambda m: m.lease.LeaseRevoke(request, timeout=self.timeout_s)
            )
        except EtcdError as error:
            if error.code is not grpc.StatusCode.NOT_FOUND:
                raise

    # -- keys ----------------------------------------------------------------

    async def get(self, key: bytes) -> tuple[KeyValue | None, int]:
        """The key (None when absent) and the store revision the answer was read at."""
        request = rpc_pb2.RangeRequest(key=key)
        response = await self._call("get", lambda m: m.kv.Range(request, timeout=self.timeout_s))
        kv = KeyValue.from_pb(response.kvs[0]) if response.kvs else None
        return kv, response.header.revision

    async def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under *prefix* (by key) and the store revision the answer was read at."""
        request = rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix))
        response = await self._call(
            "get prefix", lambda m: m.kv.Range(request, timeout=self.timeout_s)
        )
        return [KeyValue.from_pb(kv) for kv in response.kvs], response.header.revision

    async def get_many(self, *keys: bytes) -> tuple[list[KeyValue | None], int]:
        """Several keys read at ONE revision (a read-only transaction), and that revision."""
        request = rpc_pb2.TxnRequest(
            success=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=k)) for k in keys]
        )
        response = await self._txn("get many", request)
        found = [
            KeyValue.from_pb(op.response_range.kvs[0]) if op.response_range.kvs else None
            for op in response.responses
        ]
        return found, response.header.revision

    async def put(self, key: bytes, value: bytes, lease_id: int = 0) -> int:
        """Write *key* (attached to *lease_id* unless 0); the revision of the write."""
        request = rpc_pb2.PutRequest(key=key, value=value, lease=lease_id)
        response = await self._call("put", lambda m: m.kv.Put(request, timeout=self.timeout_s))
        return response.header.revision

    async def delete(self, key: bytes) -> int:
        """Delete *key*; how many keys went (0 or 1)."""
        request = rpc_pb2.DeleteRangeRequest(key=key)
        response = await self._call(
            "delete", lambda m: m.kv.DeleteRange(request, timeout=self.timeout_s)
        )
        return response.deleted

    async def put_if_absent(
        self,
        key: bytes,
        value: bytes,
        lease_id: int,
        *,
        also_put: Sequence[tuple[bytes, bytes]] = (),
        unchanged: Sequence[tuple[bytes, int]] = (),
    ) -> PutIfAbsent:
        """Create *key* under *lease_id* only if it does not exist, in one transaction.

        *also_put* keys (without lease) are written in the same transaction, so
        at the same revision. *unchanged* adds conditions: each (key,
        mod_revision) must still stand (mod_revision 0: the key is still
        absent). Either way the answer carries *key* as it stands after the
        transaction, so a caller whose earlier try timed out can see its own
        write (the key's lease is its own).
        """
        compare = [
            rpc_pb2.Compare(
                key=key,
                target=rpc_pb2.Compare.CREATE,
                result=rpc_pb2.Compare.EQUAL,
                create_revision=0,
            ),
            *(
                rpc_pb2.Compare(
                    key=other,
                    target=rpc_pb2.Compare.MOD,
                    result=rpc_pb2.Compare.EQUAL,
                    mod_revision=revision,
                )
                for other, revision in unchanged
            ),
        ]
        puts = [
            rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease_id))
        ]
        puts += [
            rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k, value=v)) for k, v in also_put
        ]
        read = rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))
        request = rpc_pb2.TxnRequest(compare=compare, success=[*puts, read], failure=[read])
        response = await self._txn("put if absent", request)
        found = response.responses[-1].response_range.kvs
        return PutIfAbsent(
            created=response.succeeded,
            kv=KeyValue.from_pb(found[0]) if found else None,
            revision=response.header.revision,
        )

    async def delete_if_created_at(self, key: bytes, create_revision: int) -> bool:
        """Delete *key* only if it is still the one created at *create_revision*."""
        request = rpc_pb2.TxnRequest(
            compare=[
                rpc_pb2.Compare(
                    key=key,
                    target=rpc_pb2.Compare.CREATE,
                    result=rpc_pb2.Compare.EQUAL,
                    create_revision=create_revision,
                )
            ],
            success=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))],
        )
        return (await self._txn("delete if created at", request)).succeeded

    async def _txn(self, what: str, request: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        return await self._call(what, lambda m: m.kv.Txn(request, timeout=self.timeout_s))

    # -- watches -------------------------------------------------------------

    async def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int = 0
    ) -> AsyncIterator[WatchEvent]:
        """The changes of *key* (or every key under it) from *start_revision* on (0: from now).

        Ends with :class:`EtcdUnavailable` when the member goes away (the
        caller re-reads and watches again from the revision after its read);
        a watch never silently stops delivering.
        """
        create = rpc_pb2.WatchCreateRequest(
            key=key, range_end=prefix_end(key) if prefix else b"", start_revision=start_revision
        )
        member = self._members[self._current]
        call = member.watch.Watch(iter([rpc_pb2.WatchRequest(create_request=create)]))
        try:
            async for response in call:
                if response.canceled:
                    raise EtcdError(
                        f"etcd watch canceled: {response.cancel_reason or 'no reason given'}"
                        f" (compacted at {response.compact_revision})"
                    )
                for event in response.events:
                    kind = EventKind.DELETE if event.type == kv_pb2.Event.DELETE else EventKind.PUT
                    yield WatchEvent(kind, KeyValue.from_pb(event.kv))
        except grpc.aio.AioRpcError as error:
            self._current = (self._current + 1) % len(self._members)
            raise EtcdUnavailable(f"etcd watch on {member.address}: {error.code().name}") from None
        finally:
            call.cancel()
        raise EtcdUnavailable(f"etcd watch on {member.address}: the stream ended")
