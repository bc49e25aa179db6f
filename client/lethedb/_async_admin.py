"""Operator calls of ``lethedb.v1.Admin``, through the client's transport.

``_async_admin.py`` is the source; ``_admin.py`` is generated from it
(``make sync-client``). Requests and results are built in
:mod:`lethedb._admin_requests`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

import grpc

from lethedb._admin_requests import (
    BACKUP_NOT_RETRIED,
    build_backup_request,
    build_release_legal_hold_request,
    build_set_legal_hold_request,
    to_backup_result,
    to_cluster_status,
    to_rotate_result,
    to_shred_result,
    to_store_stats,
)
from lethedb._async_transport import AsyncTransport
from lethedb._cursors import VerifyWalk
from lethedb._models import (
    BackupResult,
    ClusterStatus,
    RotateResult,
    ShredResult,
    StoreStats,
    SubjectReceipt,
    VerifyProgress,
)
from lethedb._requests import to_subject_receipt
from lethedb.v1 import admin_pb2 as apb

__all__ = ["AsyncAdminClient"]


class AsyncAdminClient:
    """Operator calls of ``lethedb.v1.Admin``; get one from the client's ``admin``.

    It shares the client's channels, timeout and retry policy, and is closed
    with it. Every call needs the admin role (PermissionDenied otherwise).
    In a cluster, each call goes to the leader (the last one known, else the
    first host that answers): shred, key rotation, stats, verify and backup
    act on that one node, so address another node with a client of its own.
    """

    def __init__(self, transport: AsyncTransport) -> None:
        self._transport = transport

    async def shred(self, *, timeout: float | None = None) -> ShredResult:
        """Run a shred epoch now and wait for it to complete.

        A new master key version wraps the live keys in a compacted key store;
        the old store is overwritten and older master versions destroyed, so
        every subject forgotten before the epoch becomes SHREDDED. Retrying is
        safe (a repeat just runs another epoch); as an epoch rewrites every
        live key, a large store may need more than the default ``timeout``.
        """
        transport = self._transport
        deadline = transport.deadline(timeout)
        response = await transport.unary(
            lambda node: node.admin.Shred, apb.ShredRequest(), deadline
        )
        return to_shred_result(response)

    async def set_legal_hold(
        self,
        subject_id: str,
        reason: str,
        *,
        until: datetime | int | None = None,
        timeout: float | None = None,
    ) -> SubjectReceipt:
        """Block forgetting a subject until ``until`` or until released.

        ``until`` is an aware datetime, an int of nanoseconds since the Unix
        epoch, or ``None`` for a hold without end. Setting a hold again
        replaces it. ``reason`` is stored in clear: no personal data.
        """
        request = build_set_legal_hold_request(subject_id, reason, until)
        transport = self._transport
        deadline = transport.deadline(timeout)
        response = await transport.unary(
            lambda node: node.admin.SetLegalHold, request, deadline, write=True
        )
        return to_subject_receipt(response)

    async def release_legal_hold(
        self, subject_id: str, *, timeout: float | None = None
    ) -> SubjectReceipt:
        """Release a subject's legal hold (a subject without one is left as it is)."""
        request = build_release_legal_hold_request(subject_id)
        transport = self._transport
        deadline = transport.deadline(timeout)
        response = await transport.unary(
            lambda node: node.admin.ReleaseLegalHold, request, deadline, write=True
        )
        return to_subject_receipt(response)

    async def backup(
        self, destination: str, *, include_keys: bool = False, timeout: float | None = None
    ) -> BackupResult:
        """Write a consistent backup into ``destination``, a directory on the server's machine.

        The directory must be missing or empty. This call is never retried:
        a second attempt could find the first one's partial output. With
        ``include_keys`` the backup also holds the key store, with wrapped
        keys of subjects that a later forget erases; such a backup must never
        be kept together with the master keyring (see docs/ERASURE.md).
        """
        request = build_backup_request(destination, include_keys)
        transport = self._transport
        deadline = transport.deadline(timeout)
        response = await transport.unary(
            lambda node: node.admin.Backup, request, deadline, no_retry=BACKUP_NOT_RETRIED
        )
        return to_backup_result(response)

    async def stats(self, *, timeout: float | None = None) -> StoreStats:
        """Counts and sizes of the store: positions, streams, subjects, erasures, files."""
        transport = self._transport
        deadline = transport.deadline(timeout)
        response = await transport.unary(
            lambda node: node.admin.Stats, apb.StatsRequest(), deadline
        )
        return to_store_stats(response)

    async def cluster_status(self, *, timeout: float | None = None) -> ClusterStatus:
        """The cluster as the node this client writes to sees it: roles, term, positions, lag.

        Asked of the leader it lists every follower; asked of a single node
        its role is "single" and the list is empty.
        """
        transport = self._transport
        deadline = transport.deadline(timeout)
        response = await transport.unary(
            lambda node: node.admin.ClusterStatus, apb.ClusterStatusRequest(), deadline
        )
        return to_cluster_status(response)

    async def verify(
        self,
        *,
        progress: Callable[[VerifyProgress], None] | None = None,
        timeout: float | None = None,
    ) -> VerifyProgress:
        """Walk the whole log on the server, checking its hash chain and every record's tag.

        ``progress`` is called with each message of the walk, about twice a
        second, the final one included; the final one (``done``) is returned.
        (With the asyncio client it is a plain function, called in the event
        loop: keep it quick.) A bad record does not raise: check ``result.ok``,
        and ``result.first_bad_position`` and ``result.problem`` say which
        record and what is wrong. The call is retried only until the first
        message arrives, since a walk cannot resume. ``timeout`` bounds the
        whole walk, so give a large store a large one.
        """
        walk = VerifyWalk(progress)
        transport = self._transport
        deadline = transport.deadline(timeout)
        retrying = transport.retrying(deadline)
        while True:
            node = transport.writer()
            call = node.admin.Verify(apb.VerifyRequest(), timeout=deadline)
            try:
                async for message in call:
                    if walk.track(message):
                        break
                return walk.finished()
            except grpc.RpcError as exc:
                transport.observe(node.address, exc)
                await asyncio.sleep(walk.retry_delay(exc, retrying))
            finally:
                call.cancel()

    async def rotate_master_key(self, *, timeout: float | None = None) -> RotateResult:
        """Re-wrap every live data key under a new master key version.

        Older versions are kept (every key stays readable if the rotation is
        interrupted); the next shred epoch destroys them. Retrying is safe: a
        repeat rotates once more.
        """
        transport = self._transport
        deadline = transport.deadline(timeout)
        request = apb.RotateMasterKeyRequest()
        response = await transport.unary(lambda node: node.admin.RotateMasterKey, request, deadline)
        return to_rotate_result(response)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._transport.settings.target!r})"
