"""The verdict on a failover run: what the clients were told against what the nodes hold.

Each check returns findings (one line each, naming the key, position, node
and term concerned) instead of stopping at the first, so one failed run shows
everything that diverged; :func:`report` ties each finding to the round
whose fault it followed. The checks, as issue 22 states them:

* every acknowledged append is present exactly once on every node, at the
  positions it was acknowledged with, and nothing is in a log that no client
  attempted;
* all nodes hold identical records and chain heads (the stopped nodes' logs
  compared byte for byte, tests/integration/cluster.py::assert_same_log);
* no two acknowledgements name different events at the same position, and no
  term had two nodes acknowledging writes;
* the subscriber's sequence is the log;
* a forget acknowledged before a failover holds on every node (and on the new
  leader right after the failover: checked by the rounds themselves).
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import lmdb

from lethedb.v1 import eventstore_pb2 as pb
from lethedb.v1 import eventstore_pb2_grpc
from lethedb_server.engine.verify import verify_data_dir
from lethedb_server.storage import codec
from tests.faults.history import Ack, History, Seen
from tests.faults.nemesis import Round
from tests.integration.cluster import assert_same_log, subject_key_entries

CALL_TIMEOUT = 60.0


@dataclass(frozen=True)
class LogEntry:
    position: int
    stream_id: str
    event_id: uuid.UUID
    subject_id: str
    redacted: bool


def read_log(address: str, metadata: tuple[tuple[str, str], ...]) -> tuple[list[LogEntry], str]:
    """A running node's whole log, in order (ReadAll from the start), and why it stopped
    short ("" when it did not: a node that cannot read its own log is a finding too)."""
    entries: list[LogEntry] = []
    try:
        with grpc.insecure_channel(address) as channel:
            stub = eventstore_pb2_grpc.EventStoreStub(channel)
            request = pb.ReadAllRequest()
            for response in stub.ReadAll(request, metadata=metadata, timeout=CALL_TIMEOUT):
                entries.extend(
                    LogEntry(e.position, e.stream_id, uuid.UUID(bytes=e.event_id), e.subject_id,
                             e.redacted)
                    for e in response.events
                )  # fmt: skip
    except grpc.RpcError as error:
        return entries, f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
    return entries, ""


@dataclass
class Finding:
    """One divergence: which check, what, and when (monotonic time) it was acknowledged."""

    check: str
    what: str
    at: float | None = None
    key: str = ""  # the idempotency key of the append concerned, if one


@dataclass
class Verdict:
    findings: list[Finding] = field(default_factory=list)

    def add(self, check: str, what: str, at: float | None = None, key: str = "") -> None:
        self.findings.append(Finding(check, what, at, key))

    @property
    def ok(self) -> bool:
        return not self.findings


def check_acknowledged_present(
    history: History,
    logs: dict[str, list[LogEntry]],
    verdict: Verdict,
    unreadable_from: dict[str, int] | None = None,
) -> None:
    """Every acknowledged append's events on every node, where it was acknowledged (that
    they are there once is :func:`check_nothing_unattempted`'s). *unreadable_from*: the
    position at which a node's log stopped reading, per node that could not read it whole."""
    unreadable_from = unreadable_from or {}
    for node, log in logs.items():
        by_position = {entry.position: entry for entry in log}
        readable_to = unreadable_from.get(node, 0) - 1 if node in unreadable_from else None
        for ack in _first_acks(history):
            if readable_to is not None and ack.last_position > readable_to:
                continue  # beyond where the node's log could be read: reported as unreadable
            _, ids = history.attempted[ack.key]
            expected = range(ack.first_position, ack.last_position + 1)
            if len(expected) != len(ids):
                verdict.add(
                    "ack",
                    f"{ack.key} acknowledged {len(expected)} positions for {len(ids)} events",
                    ack.at,
                )
                continue
            for position, event in zip(expected, ids, strict=True):
                held = by_position.get(position)
                if held is None or held.event_id != event:
                    found = "nothing" if held is None else f"event {held.event_id}"
                    verdict.add(
                        "lost",
                        f"{ack.key} acknowledged by {ack.node} in term {ack.term} at position"
                        f" {position}; {node} holds {found} there",
                        ack.at,
                        ack.key,
                    )


def check_nothing_unattempted(
    history: History, logs: dict[str, list[LogEntry]], verdict: Verdict
) -> None:
    """Every client event in a log was attempted, at most once (erasures are the store's)."""
    attempted = {event for _, ids in history.attempted.values() for event in ids}
    for node, log in logs.items():
        counts = Counter(entry.event_id for entry in log if entry.event_id in attempted)
        for event, count in counts.items():
            if count > 1:
                verdict.add("duplicate", f"event {event} is {count}x in {node}'s log")
        for entry in log:
            if entry.event_id not in attempted and not entry.stream_id.startswith("$"):
                verdict.add(
                    "phantom",
                    f"{node} holds event {entry.event_id} at {entry.position} nobody appended",
                )


def check_acks_agree(history: History, verdict: Verdict) -> None:
    """One event per acknowledged position; one set of positions per key; one node per term."""
    claims: dict[int, str] = {}
    positions: dict[str, tuple[int, int]] = {}
    for ack in history.acks:
        span = (ack.first_position, ack.last_position)
        earlier = positions.setdefault(ack.key, span)
        if earlier != span:
            verdict.add(
                "ack",
                f"{ack.key} acknowledged at {earlier} and again at {span} by {ack.node}"
                f" (term {ack.term})",
                ack.at,
            )
        for position in range(ack.first_position, ack.last_position + 1):
            claim = claims.setdefault(position, ack.key)
            if claim != ack.key:
                verdict.add(
                    "position",
                    f"position {position} acknowledged for {claim} and for {ack.key}"
                    f" (by {ack.node}, term {ack.term})",
                    ack.at,
                )
    leaders: dict[int, set[str]] = defaultdict(set)
    for ack in history.acks:
        leaders[ack.term].add(ack.node)
    for forget in history.forgets:
        leaders[forget.term].add(forget.node)
    for term, nodes in sorted(leaders.items()):
        if term == 0:
            verdict.add("term", f"{len(nodes)} node(s) acknowledged without naming a term")
        elif len(nodes) > 1:
            verdict.add("term", f"term {term} had writes acknowledged by {sorted(nodes)}")


def check_subscriber(
    seen: list[Seen],
    log: list[LogEntry],
    error: BaseException | None,
    verdict: Verdict,
    *,
    whole: bool = True,
) -> None:
    """The subscription delivered the log: every position once, in order, the same events.

    *whole*: *log* is a node's whole log; when it is not (the node could not read
    past a point, reported apart), only that prefix is compared."""
    if error is not None:
        verdict.add("subscriber", f"the subscription ended with {error!r}")
    got = [(s.position, s.event_id) for s in seen]
    want = [(e.position, e.event_id) for e in log]
    if not whole:
        got = got[: len(want)]
    if got == want:
        return
    for index, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            verdict.add(
                "subscriber",
                f"delivery {index}: got position {a[0]} event {a[1]}, the log has position"
                f" {b[0]} event {b[1]}",
                seen[index].at,
            )
            return
    verdict.add(
        "subscriber", f"delivered {len(got)} events, the log holds {len(want)} (a prefix matches)"
    )


def check_forgets_on_logs(
    history: History, logs: dict[str, list[LogEntry]], verdict: Verdict
) -> None:
    """Each forgotten subject's events read as redacted on every node."""
    for forget in history.forgets:
        for node, log in logs.items():
            readable = [
                e.position for e in log if e.subject_id == forget.subject_id and not e.redacted
            ]
            if readable:
                verdict.add(
                    "forget",
                    f"{forget.subject_id} forgotten (by {forget.node}, term {forget.term}) is"
                    f" readable on {node} at positions {readable[:5]}",
                    forget.at,
                )


def check_stopped_nodes(
    history: History, nodes: dict[str, tuple[Path, Path]], verdict: Verdict
) -> None:
    """Stopped nodes (name -> data directory, keyring): identical logs byte for byte, every
    record intact (``lethedb verify --data``), no key left of a forgotten subject."""
    names = list(nodes)
    for other in names[1:]:
        try:
            assert_same_log(nodes[names[0]][0], nodes[other][0])
        except AssertionError as error:
            verdict.add("files", f"{names[0]} and {other} differ: {error}")
    for name, (data_dir, keyring) in nodes.items():
        checked = verify_data_dir(data_dir, keyring)
        for damage in checked.damage[:5]:
            verdict.add("verify", f"{name}: {damage}{_key_of(data_dir, damage.position)}")
    for forget in history.forgets:
        for name, (data_dir, _) in nodes.items():
            keys = subject_key_entries(data_dir, forget.subject_id)
            if keys:
                verdict.add(
                    "forget", f"{name} still holds {keys} data key(s) of {forget.subject_id}"
                )


def _key_of(data_dir: Path, position: int) -> str:
    """Which data key a stopped node's record at *position* names (subject, version)."""
    if not position:
        return ""
    env = lmdb.open(str(data_dir / "log"), readonly=True, lock=True, max_dbs=32)
    try:
        with env.begin() as txn:
            raw = txn.get(codec.position_key(position), db=env.open_db(b"events", txn=txn))
            if raw is None:
                return ""
            ref = codec.decode_record_key_ref(raw)
            return f" [key: subject {ref.subject_id or '(the store)'!r} version {ref.dek_version}]"
    finally:
        env.close()


def _first_acks(history: History) -> list[Ack]:
    seen: dict[str, Ack] = {}
    for ack in history.acks:
        seen.setdefault(ack.key, ack)
    return list(seen.values())


def round_of(at: float | None, rounds: Sequence[Round]) -> str:
    """The round during (or after) which something happened at monotonic time *at*."""
    if at is None:
        return "after the rounds"
    current = "before the first round"
    for round_ in rounds:
        if round_.started <= at:
            current = f"round {round_.number} ({round_.action} {round_.target})"
    return current


def report(
    seed: int,
    rounds: Sequence[Round],
    verdict: Verdict,
    *,
    failure: str = "",
    cluster: str = "",
    history: History | None = None,
) -> str:
    """The failure report: the seed, what each round did, and every divergence by round."""
    lines = [f"failover run, seed {seed} (LETHEDB_FAILOVER_SEED={seed} replays the schedule)"]
    if failure:
        lines += ["", f"STOPPED: {failure}"]
    if history is not None:
        lines.append(
            f"{len(history.acks)} acknowledgements, {len(history.forgets)} forgets,"
            f" {len(history.indeterminate)} appends in flight at the stop;"
            f" errors the writers met: {history.errors or 'none'}"
        )
    if history is not None:
        for kind, (at, message) in history.first_errors.items():
            lines.append(f"  first {kind} a writer met: [{round_of(at, rounds)}] {message}")
    lines += ["", "rounds:", *(f"  {r.line()}" for r in rounds)]
    by_check: dict[str, list[Finding]] = defaultdict(list)
    for finding in verdict.findings:
        by_check[finding.check].append(finding)
    for check, findings in by_check.items():
        keys = {f.key for f in findings if f.key}
        appends = f" ({len(keys)} append(s))" if keys else ""
        lines += ["", f"{check}: {len(findings)} finding(s){appends}"]
        for finding in findings[:20]:
            lines.append(f"  [{round_of(finding.at, rounds)}] {finding.what}")
        if len(findings) > 20:
            lines.append(f"  ... and {len(findings) - 20} more")
    if cluster:
        lines += ["", "cluster:", cluster]
    return "\n".join(lines)
