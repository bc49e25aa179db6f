"""The wire contract (lethedb_contract) is the one definition both sides use.

The server's error tree and the SDK's exception map are checked against it and
against each other through the real mapping code on both sides (status.py
builds the status and trailers, lethedb._exceptions reads them back); a scan
of the source finds any second copy of a contract value or of the loopback
rule.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import lethedb
import lethedb_contract
import lethedb_server
from lethedb import _coalescing, _exceptions, _requests
from lethedb._connection import resolve
from lethedb.v1 import eventstore_pb2 as pb
from lethedb_server import errors
from lethedb_server.api import status, validation
from lethedb_server.ops.config import Config
from tests.unit.client.grpc_fakes import FakeRpcError

ROOT = Path(__file__).resolve().parents[3]
SOURCES = [
    *sorted((ROOT / "client" / "lethedb").rglob("*.py")),
    *sorted((ROOT / "server" / "lethedb_server").rglob("*.py")),
]
SOURCES = [p for p in SOURCES if "v1" not in p.relative_to(ROOT).parts]


def _server_errors() -> list[type[errors.LetheError]]:
    """Every LetheError subclass of the server, wherever it is defined."""
    for module in pkgutil.walk_packages(lethedb_server.__path__, "lethedb_server."):
        importlib.import_module(module.name)
    found: list[type[errors.LetheError]] = []
    pending = list(errors.LetheError.__subclasses__())
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: cls.__name__)


def _instance(cls: type[errors.LetheError]) -> errors.LetheError:
    """An instance without the class's own constructor (their arguments differ)."""
    error = cls.__new__(cls)
    Exception.__init__(error, f"a {cls.__name__} for the test")
    if isinstance(error, errors.WrongExpectedVersion):
        error.actual_version = 7
    if isinstance(error, errors.NotLeader):
        error.leader = "127.0.0.1:7001"
    return error


def test_the_contract_names_every_error_the_server_can_send():
    assert {cls.__name__ for cls in _server_errors()} == lethedb_contract.ERROR_NAMES


def test_the_sdk_maps_every_name_of_the_contract():
    assert set(_exceptions._BY_NAME) == lethedb_contract.ERROR_NAMES


@pytest.mark.parametrize("cls", _server_errors(), ids=lambda cls: cls.__name__)
def test_each_server_error_arrives_as_the_sdk_exception_of_its_name(cls):
    """status.py's status and trailers, read back by the SDK's one mapping function."""
    error = _instance(cls)
    code = status.status_code(error)
    raised = _exceptions.error_from_rpc_error(
        FakeRpcError(code, str(error), status.trailing_metadata(error))
    )
    assert raised.code == code
    assert raised.details == str(error)
    same_name = getattr(lethedb, cls.__name__, None)
    if isinstance(same_name, type) and issubclass(same_name, lethedb.LetheError):
        assert type(raised) is same_name
    else:
        # A server-only error: handled like what its status code alone means,
        # so a client that predates the name reacts the same way.
        unnamed = _exceptions.error_from_status(code, str(error))
        assert type(raised) is type(unnamed)
    if isinstance(error, errors.WrongExpectedVersion):
        assert isinstance(raised, lethedb.WrongExpectedVersion)
        assert raised.actual_version == 7


@pytest.mark.parametrize("cls", _server_errors(), ids=lambda cls: cls.__name__)
def test_a_failed_pipelined_append_maps_like_a_failed_call(cls):
    error = _instance(cls)
    code, message, actual, name = status.append_error_fields(error)
    answer = pb.AppendError(code=code, message=message, actual_version=actual, error=name)
    from_append = _requests.error_from_append_error(answer)
    from_call = _exceptions.error_from_rpc_error(
        FakeRpcError(status.status_code(error), message, status.trailing_metadata(error))
    )
    assert type(from_append) is type(from_call)
    assert from_append.code == from_call.code


def test_the_limits_the_sdk_respects_are_the_servers():
    assert validation.Limits().max_request_events == lethedb_contract.DEFAULT_MAX_REQUEST_EVENTS
    assert _coalescing.MAX_BATCH_EVENTS == lethedb_contract.DEFAULT_MAX_REQUEST_EVENTS
    assert Config().max_message_bytes == lethedb_contract.DEFAULT_MAX_MESSAGE_BYTES
    assert _coalescing.MAX_BATCH_BYTES < lethedb_contract.DEFAULT_MAX_MESSAGE_BYTES
    validation.check_append_batch(lethedb_contract.MAX_APPENDS_PER_BATCH)
    with pytest.raises(errors.ValidationError, match="limit is 1000 per AppendBatch"):
        validation.check_append_batch(lethedb_contract.MAX_APPENDS_PER_BATCH + 1)


def test_the_reserved_prefix_is_refused_and_the_servers_own_names_use_it():
    for name in (lethedb_contract.ERASURE_STREAM, lethedb_contract.ERASURE_EVENT_TYPE):
        assert name.startswith(lethedb_contract.RESERVED_PREFIX)
        with pytest.raises(errors.ValidationError, match="reserved for the server"):
            validation.check_name(name, "stream_id", 256)


def test_a_host_name_that_starts_with_unix_is_not_loopback():
    """The SDK's own copy took any address starting with ``unix`` as local, and
    would have sent a bearer token in clear to ``unixhost:50051``."""
    assert not lethedb_contract.is_loopback_address("unixhost:50051")
    with pytest.raises(lethedb.ValidationError, match="in clear to unixhost:50051"):
        resolve("unixhost:50051", token="t0ken")
    assert resolve("unix-abstract:lethedb", token="t0ken").credentials() is not None


def _contract_strings() -> set[str]:
    return {
        value
        for name in lethedb_contract.__all__
        if isinstance(value := getattr(lethedb_contract, name), str)
    }


def _docstrings(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def test_nothing_outside_the_contract_redefines_it():
    """No second copy: no contract name assigned, no contract string written out,
    no loopback rule of its own, in the SDK or the server."""
    names = set(lethedb_contract.__all__)
    strings = _contract_strings() - {lethedb_contract.RESERVED_PREFIX}  # '$' is too common
    copies: list[str] = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        docstrings = _docstrings(tree)
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            copies += [
                f"{where}:{node.lineno} assigns {t.id}"
                for t in targets
                if isinstance(t, ast.Name) and t.id in names
            ]
            if isinstance(node, ast.FunctionDef) and "loopback" in node.name:
                copies.append(f"{where}:{node.lineno} defines {node.name}")
            if (
                isinstance(node, ast.Constant)
                and node.value in strings
                and id(node) not in docstrings
            ):
                copies.append(f"{where}:{node.lineno} writes {node.value!r}")
    assert copies == []
