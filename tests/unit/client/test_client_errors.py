"""How the SDK turns gRPC statuses (and in-stream append errors) into its exceptions.

The fakes below are gRPC errors as a server would produce them: a status code,
details and trailing metadata. They are the input, not the thing under test.
"""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

import lethedb
from lethedb._exceptions import error_from_rpc_error
from lethedb._requests import error_from_append_error
from lethedb.v1 import eventstore_pb2 as pb
from tests.unit.client.grpc_fakes import FakeRpcError


def _server_error(code: grpc.StatusCode, name: str, details: str = "msg") -> FakeRpcError:
    return FakeRpcError(code, details, (("lethedb-error", name),))


@pytest.mark.parametrize(
    ("code", "name", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "ValidationError", lethedb.ValidationError),
        (grpc.StatusCode.ABORTED, "WrongExpectedVersion", lethedb.WrongExpectedVersion),
        (grpc.StatusCode.NOT_FOUND, "StreamNotFound", lethedb.StreamNotFound),
        (grpc.StatusCode.FAILED_PRECONDITION, "SubjectForgotten", lethedb.SubjectForgotten),
        (grpc.StatusCode.FAILED_PRECONDITION, "IdempotencyConflict", lethedb.IdempotencyConflict),
        (grpc.StatusCode.FAILED_PRECONDITION, "LegalHoldActive", lethedb.LegalHoldActive),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "StorageFull", lethedb.StorageFull),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Overloaded", lethedb.Overloaded),
        (grpc.StatusCode.DATA_LOSS, "DataLoss", lethedb.DataLoss),
        (grpc.StatusCode.DATA_LOSS, "DataDirDamaged", lethedb.DataLoss),
        (grpc.StatusCode.UNAVAILABLE, "ShuttingDown", lethedb.Unavailable),
        (grpc.StatusCode.FAILED_PRECONDITION, "DataDirLocked", lethedb.ServerError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "TooManyGroups", lethedb.StorageFull),
        (grpc.StatusCode.PERMISSION_DENIED, "PermissionDenied", lethedb.PermissionDenied),
    ],
)
def test_the_server_error_name_picks_the_exception(code, name, expected):
    error = error_from_rpc_error(_server_error(code, name))
    assert type(error) is expected
    assert error.code is code


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, lethedb.ValidationError),
        (grpc.StatusCode.ABORTED, lethedb.WrongExpectedVersion),
        (grpc.StatusCode.NOT_FOUND, lethedb.StreamNotFound),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, lethedb.StorageFull),
        (grpc.StatusCode.DATA_LOSS, lethedb.DataLoss),
        (grpc.StatusCode.UNAVAILABLE, lethedb.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, lethedb.DeadlineExceeded),
        (grpc.StatusCode.UNAUTHENTICATED, lethedb.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, lethedb.PermissionDenied),
        (grpc.StatusCode.INTERNAL, lethedb.ServerError),
        (grpc.StatusCode.UNKNOWN, lethedb.ServerError),
    ],
)
def test_without_a_server_error_name_the_status_code_picks_the_exception(code, expected):
    assert type(error_from_rpc_error(FakeRpcError(code, "x"))) is expected


def test_failed_precondition_without_a_name_is_a_server_error_not_a_guess():
    error = error_from_rpc_error(FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "why"))
    assert type(error) is lethedb.ServerError
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION


def test_an_unknown_error_name_falls_back_to_the_status_code():
    error = error_from_rpc_error(_server_error(grpc.StatusCode.NOT_FOUND, "SomethingNew"))
    assert type(error) is lethedb.StreamNotFound


def test_every_exception_is_a_lethe_error():
    error = error_from_rpc_error(_server_error(grpc.StatusCode.ABORTED, "WrongExpectedVersion"))
    assert isinstance(error, lethedb.LetheError)


def test_the_server_message_is_the_exception_message_and_details():
    error = error_from_rpc_error(
        _server_error(grpc.StatusCode.NOT_FOUND, "StreamNotFound", "stream 'x' does not exist")
    )
    assert str(error) == "stream 'x' does not exist"
    assert error.details == "stream 'x' does not exist"


def test_an_empty_message_falls_back_to_the_code_name():
    assert str(error_from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE))) == "UNAVAILABLE"


def test_wrong_expected_version_carries_actual_version():
    error = error_from_rpc_error(
        FakeRpcError(
            grpc.StatusCode.ABORTED,
            "stream 's': expected no stream, found version 4",
            (("lethedb-error", "WrongExpectedVersion"), ("lethedb-actual-version", "4")),
        )
    )
    assert isinstance(error, lethedb.WrongExpectedVersion)
    assert error.actual_version == 4


def test_wrong_expected_version_of_a_missing_stream_has_no_actual_version():
    error = error_from_rpc_error(
        FakeRpcError(
            grpc.StatusCode.ABORTED,
            "found no stream",
            (("lethedb-error", "WrongExpectedVersion"), ("lethedb-actual-version", "-1")),
        )
    )
    assert isinstance(error, lethedb.WrongExpectedVersion)
    assert error.actual_version is None


def test_binary_metadata_values_are_read_too():
    error = error_from_rpc_error(
        FakeRpcError(
            grpc.StatusCode.FAILED_PRECONDITION, "x", (("lethedb-error", b"SubjectForgotten"),)
        )
    )
    assert type(error) is lethedb.SubjectForgotten


def test_aio_errors_with_aio_metadata_map_the_same_way():
    metadata = grpc.aio.Metadata(
        ("lethedb-error", "WrongExpectedVersion"), ("lethedb-actual-version", "9")
    )
    exc = grpc.aio.AioRpcError(
        grpc.StatusCode.ABORTED, grpc.aio.Metadata(), metadata, "found version 9", None
    )
    error = error_from_rpc_error(exc)
    assert isinstance(error, lethedb.WrongExpectedVersion)
    assert error.actual_version == 9


def test_a_bare_rpc_error_without_a_status_is_a_server_error():
    error = error_from_rpc_error(grpc.RpcError())
    assert type(error) is lethedb.ServerError
    assert error.code is None


class TestInStreamAppendErrors:
    def test_a_wrong_version_append_error_carries_actual_version(self):
        error = error_from_append_error(
            pb.AppendError(
                code=grpc.StatusCode.ABORTED.value[0], message="found version 19", actual_version=19
            )
        )
        assert isinstance(error, lethedb.WrongExpectedVersion)
        assert error.actual_version == 19
        assert error.code is grpc.StatusCode.ABORTED
        assert str(error) == "found version 19"

    def test_a_wrong_version_append_error_for_a_missing_stream_has_no_actual_version(self):
        error = error_from_append_error(
            pb.AppendError(code=grpc.StatusCode.ABORTED.value[0], message="m", actual_version=-1)
        )
        assert isinstance(error, lethedb.WrongExpectedVersion)
        assert error.actual_version is None

    @pytest.mark.parametrize(
        ("code", "expected"),
        [
            (grpc.StatusCode.INVALID_ARGUMENT, lethedb.ValidationError),
            (grpc.StatusCode.RESOURCE_EXHAUSTED, lethedb.StorageFull),
            (grpc.StatusCode.UNAVAILABLE, lethedb.Unavailable),
        ],
    )
    def test_other_append_errors_map_by_code_like_call_errors(self, code, expected):
        error = error_from_append_error(pb.AppendError(code=code.value[0], message="m"))
        assert type(error) is expected

    def test_an_unknown_numeric_code_is_a_server_error(self):
        error = error_from_append_error(pb.AppendError(code=999, message="m"))
        assert type(error) is lethedb.ServerError

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("SubjectForgotten", lethedb.SubjectForgotten),
            ("IdempotencyConflict", lethedb.IdempotencyConflict),
            ("LegalHoldActive", lethedb.LegalHoldActive),
            ("DataDirLocked", lethedb.ServerError),
        ],
    )
    def test_the_server_error_name_picks_the_exception_as_for_a_call(self, name, expected):
        error = error_from_append_error(
            pb.AppendError(
                code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="m", error=name
            )
        )
        assert type(error) is expected
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION

    def test_without_an_error_name_failed_precondition_is_a_server_error(self):
        error = error_from_append_error(
            pb.AppendError(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="m")
        )
        assert type(error) is lethedb.ServerError

    def test_a_named_wrong_version_error_still_carries_actual_version(self):
        error = error_from_append_error(
            pb.AppendError(
                code=grpc.StatusCode.ABORTED.value[0],
                message="m",
                actual_version=4,
                error="WrongExpectedVersion",
            )
        )
        assert isinstance(error, lethedb.WrongExpectedVersion)
        assert error.actual_version == 4


class TestValidationBeforeIO:
    """Obvious mistakes fail at the call, before a connection is even attempted."""

    class _NoCalls:
        def __getattr__(self, name):
            raise AssertionError(f"{name} was called despite invalid arguments")

    @pytest.fixture
    def client(self):
        with lethedb.Client("127.0.0.1:9", max_retries=0) as db:
            db._transport.events = self._NoCalls()
            yield db

    def test_append_with_a_negative_version_raises_without_a_call(self, client):
        with pytest.raises(lethedb.ValidationError, match="expected_version is -1"):
            client.append("s", lethedb.Event("E"), expected_version=-1)

    def test_read_all_with_two_starts_raises_at_the_call_not_at_iteration(self, client):
        with pytest.raises(lethedb.ValidationError, match="give at most one"):
            client.read_all(after=1, from_position=2)

    def test_a_non_positive_timeout_is_refused(self, client):
        with pytest.raises(lethedb.ValidationError, match="timeout is 0"):
            client.append("s", lethedb.Event("E"), timeout=0)

    def test_bad_client_settings_are_refused(self):
        with pytest.raises(lethedb.ValidationError, match="max_retries is -1"):
            lethedb.Client(max_retries=-1)
        with pytest.raises(lethedb.ValidationError, match=r"max_backoff is 0\.01"):
            lethedb.Client(initial_backoff=0.1, max_backoff=0.01)


# gRPC's own texts (grpcio 1.85), as the SDK receives them: no lethedb-error trailer.
GRPC_TEXTS = [
    (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "SERVER: Received message larger than max (100092 vs. 65536)",
        lethedb.RequestTooLarge,
        ["100092 bytes", "at most 65536 bytes", "max_message_bytes"],
    ),
    (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Received message larger than max (5000000 vs. 4194304)",
        lethedb.RequestTooLarge,
        ["a response is 5000000 bytes", "4194304", "max_receive_message_length"],
    ),
    (
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50051: "
        "Failed to connect to remote host: Connection refused",
        lethedb.Unavailable,
        ["no LetheDB server at 127.0.0.1:50051 (connection refused)", "lethedb serve"],
    ),
    (
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:9: "
        "Socket closed",
        lethedb.Unavailable,
        ["127.0.0.1:9", "TLS expected"],
    ),
    (
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: Tls "
        "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
        "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer "
        "certificate: OK",
        lethedb.Unavailable,
        ["certificate verify failed", "unable to get local issuer certificate", "ca=PATH"],
    ),
    (
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: ipv6:%5B::1%5D:9: Tls "
        "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL "
        "routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification",
        lethedb.Unavailable,
        ["[::1]:9", "does not speak TLS"],
    ),
]


@pytest.mark.parametrize(("code", "details", "expected", "phrases"), GRPC_TEXTS)
def test_grpcs_own_errors_become_one_line_naming_the_cause(code, details, expected, phrases):
    error = error_from_rpc_error(FakeRpcError(code, details, ()))
    assert type(error) is expected
    assert error.details == details  # the raw text is kept for logs
    assert "\n" not in str(error)
    for phrase in phrases:
        assert phrase in str(error)


def test_request_too_large_is_not_retried_and_not_storage_full():
    error = error_from_rpc_error(
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Sent message larger than max (9 vs. 8)")
    )
    assert isinstance(error, lethedb.RequestTooLarge)
    assert not isinstance(error, lethedb.StorageFull)
    assert (error.size, error.limit) == (9, 8)


def test_the_servers_own_storage_full_keeps_its_type():
    error = error_from_rpc_error(
        _server_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "StorageFull", "disk full")
    )
    assert type(error) is lethedb.StorageFull
