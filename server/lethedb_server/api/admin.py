"""``lethedb.v1.Admin``: shred epochs, legal holds, backups, stats and cluster status.

Everything that changes state goes through the store's writer, so its order
against appends and forgets is well defined (a legal hold set before a forget
in the queue blocks that forget). Like every handler, these call only the
:class:`~lethedb_server.engine.store.Store` façade.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from lethedb.v1 import admin_pb2 as apb
from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server.api import messages
from lethedb_server.api.rpc import Context, register, server_streaming, unary
from lethedb_server.api.validation import Validator, check_name
from lethedb_server.engine.cluster import ClusterNode
from lethedb_server.engine.erasure import KEY_BACKUP_WARNING
from lethedb_server.engine.model import LegalHoldCommand
from lethedb_server.engine.store import Store
from lethedb_server.errors import ValidationError, iso_time

log = logging.getLogger(__name__)

SERVICE_NAME = "lethedb.v1.Admin"
VERIFY_PROGRESS_S = 0.5


class AdminService:
    def __init__(
        self, store: Store, validator: Validator, cluster: ClusterNode | None = None
    ) -> None:
        self.store = store
        self.validator = validator
        self.cluster = cluster if cluster is not None else ClusterNode()

    @unary
    async def Shred(self, request: apb.ShredRequest, context: Context) -> apb.ShredResponse:  # noqa: N802
        return messages.shred_response(await self.store.shred())

    @unary
    async def SetLegalHold(  # noqa: N802
        self, request: apb.SetLegalHoldRequest, context: Context
    ) -> pb.SubjectReceipt:
        self.validator.check_subject_id(request.subject_id, "subject_id", required=True)
        check_name(request.reason, "reason", 256)
        if request.until and request.until <= time.time_ns():
            raise ValidationError(
                f"until is {iso_time(request.until)}, which is in the past; a hold must end "
                "in the future (0 for a hold without end)"
            )
        command = LegalHoldCommand(request.subject_id, request.reason, request.until)
        return await self._hold(command)

    @unary
    async def ReleaseLegalHold(  # noqa: N802
        self, request: apb.ReleaseLegalHoldRequest, context: Context
    ) -> pb.SubjectReceipt:
        self.validator.check_subject_id(request.subject_id, "subject_id", required=True)
        return await self._hold(LegalHoldCommand(request.subject_id, release=True))

    async def _hold(self, command: LegalHoldCommand) -> pb.SubjectReceipt:
        await self.store.set_legal_hold(command)
        receipt = await asyncio.to_thread(self.store.receipt, command.subject_id)
        return messages.subject_receipt(receipt)

    @unary
    async def Backup(self, request: apb.BackupRequest, context: Context) -> apb.BackupResponse:  # noqa: N802
        if not request.destination:
            raise ValidationError("destination is empty; name a directory on the server")
        destination = Path(request.destination)
        try:
            log_bytes, key_bytes, head = await asyncio.to_thread(
                self.store.backup, destination, request.include_keys
            )
        except (OSError, ValueError) as exc:
            raise ValidationError(f"backup to {destination} failed: {exc}") from exc
        if request.include_keys:
            log.warning("backup to %s: %s", destination, KEY_BACKUP_WARNING)
        return apb.BackupResponse(
            destination=str(destination),
            last_position=head,
            log_bytes=log_bytes,
            key_bytes=key_bytes,
        )

    @unary
    async def Stats(self, request: apb.StatsRequest, context: Context) -> apb.StatsResponse:  # noqa: N802
        return await asyncio.to_thread(self._stats)

    def _stats(self) -> apb.StatsResponse:
        store = self.store
        cluster = self.cluster
        return messages.stats_response(
            store.stats(), cluster.role(store), cluster.follower_lag(store)
        )

    @unary
    async def ClusterStatus(  # noqa: N802
        self, request: apb.ClusterStatusRequest, context: Context
    ) -> apb.ClusterStatusResponse:
        view = await asyncio.to_thread(self.cluster.view, self.store)
        return messages.cluster_status_response(view)

    @server_streaming
    async def Verify(  # noqa: N802
        self, request: apb.VerifyRequest, context: Context
    ) -> AsyncIterator[apb.VerifyProgress]:
        """Walk the whole log, reporting progress about twice a second."""
        verifier = self.store.verifier()
        last_report = time.monotonic()
        while await asyncio.to_thread(verifier.step):
            if time.monotonic() - last_report >= VERIFY_PROGRESS_S:
                last_report = time.monotonic()
                yield messages.verify_progress(verifier, done=False)
        verifier.finish()
        if not verifier.ok:
            log.error(
                "verify: position %d is bad: %s", verifier.first_bad_position, verifier.problem
            )
        yield messages.verify_progress(verifier, done=True)

    @unary
    async def RotateMasterKey(  # noqa: N802
        self, request: apb.RotateMasterKeyRequest, context: Context
    ) -> apb.RotateMasterKeyResponse:
        result = await self.store.rotate()
        log.info(
            "master key rotated to version %d; %d keys re-wrapped",
            result.master_version,
            result.rewrapped_keys,
        )
        return apb.RotateMasterKeyResponse(
            master_version=result.master_version, rewrapped_keys=result.rewrapped_keys
        )


def add_admin(server: grpc.aio.Server, service: AdminService) -> None:
    register(
        server,
        SERVICE_NAME,
        {
            "Shred": ("unary", service.Shred, apb.ShredRequest, apb.ShredResponse),
            "SetLegalHold": (
                "unary", service.SetLegalHold, apb.SetLegalHoldRequest, pb.SubjectReceipt
            ),
            "ReleaseLegalHold": (
                "unary", service.ReleaseLegalHold, apb.ReleaseLegalHoldRequest, pb.SubjectReceipt
            ),
            "Backup": ("unary", service.Backup, apb.BackupRequest, apb.BackupResponse),
            "Stats": ("unary", service.Stats, apb.StatsRequest, apb.StatsResponse),
            "Verify": ("server_streaming", service.Verify, apb.VerifyRequest, apb.VerifyProgress),
            "RotateMasterKey": (
                "unary", service.RotateMasterKey, apb.RotateMasterKeyRequest,
                apb.RotateMasterKeyResponse,
            ),
            "ClusterStatus": (
                "unary", service.ClusterStatus, apb.ClusterStatusRequest,
                apb.ClusterStatusResponse,
            ),
        },
    )  # fmt: skip
