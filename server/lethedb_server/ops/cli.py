"""The ``lethedb`` command: run the server, and poke at it from a shell.

``serve`` takes every option as a flag, a ``LETHEDB_*`` variable or a key of
the TOML file given with ``--config``. ``append`` and ``read`` are thin
wrappers over the SDK for quick use; they print JSON lines. ``verify`` walks
the log over ``--server``, or offline over ``--data`` while no server runs,
and exits 1 when a record is bad.

Every failure ends in one line on stderr that a person can act on, never a
traceback: exit 1 for an error reported by the server or the SDK, 2 for a
refused command or configuration (nothing was changed or created), 3 for an
erasure audit still pending a shred epoch, 130 on Ctrl-C. A closed stdout
(``lethedb stats | head -1``) is a normal end. Times print as ISO 8601 (UTC).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from lethedb_server.api import tokens
from lethedb_server.errors import LetheError, iso_time
from lethedb_server.ops import config as config_module
from lethedb_server.ops import logs

if TYPE_CHECKING:
    import lethedb
    from lethedb_server.engine.verify import DataReport


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run a LetheDB server")
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    switches = config_module.switches()
    for name in config_module.field_names():
        # A boolean option works as a bare flag (--insecure) or with a value.
        switch: dict[str, Any] = {"nargs": "?", "const": "true"} if name in switches else {}
        p.add_argument(
            "--" + name.replace("_", "-"),
            *config_module.FLAG_ALIASES.get(name, ()),
            dest=name,
            default=None,
            help=f"{config_module.HELP[name]} (env {config_module.ENV_PREFIX}{name.upper()})",
            **switch,
        )


DEFAULT_SERVER = "localhost:50051"


class _Unset(str):
    """A default told apart from the same value given on the command line."""


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        help="host:port or lethedb://host:port?tls=true&ca=PATH (default %(default)s)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("LETHEDB_TOKEN") or None,
        help="bearer token (default: env LETHEDB_TOKEN; prefer the variable to the flag)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lethedb")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lethedb", description="LetheDB: a GDPR-aware, immutable event store."
    )
    parser.add_argument("--version", action="version", version=f"lethedb {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    tokens.add_token_parser(sub)

    append = sub.add_parser("append", help="append one event to a stream")
    append.add_argument("stream_id")
    append.add_argument("event_type")
    append.add_argument("data", help="JSON document, or @FILE to send a file's bytes")
    append.add_argument("--subject", default="", help="data subject id of the event")
    append.add_argument(
        "--expected",
        default="any",
        help="any, no_stream, stream_exists or an exact version (default any)",
    )
    append.add_argument("--idempotency-key", default=None)
    _client_args(append)

    read = sub.add_parser("read", help="read a stream, or the whole log, as JSON lines")
    read.add_argument("stream_id", nargs="?", help="stream to read (default: the whole log)")
    read.add_argument("--from", dest="start", type=int, default=None, help="first version/position")
    read.add_argument("--backwards", action="store_true")
    read.add_argument("--max", dest="max_count", type=int, default=None)
    _client_args(read)

    forget = sub.add_parser("forget", help="forget a data subject (GDPR erasure)")
    forget.add_argument("subject_id")
    forget.add_argument("--reason", default="unspecified", help="reason code (no personal data)")
    forget.add_argument(
        "--force",
        action="store_true",
        help="forget even a subject with no events (a mistyped id is refused without it)",
    )
    _client_args(forget)

    subject = sub.add_parser("subject", help="show a subject's erasure receipt")
    subject.add_argument("subject_id")
    _client_args(subject)

    export = sub.add_parser("export", help="export every event of a subject, decrypted")
    export.add_argument("subject_id")
    export.add_argument("--format", choices=["json"], default="json")
    export.add_argument("--output", "-o", type=Path, help="file to write (default: stdout)")
    _client_args(export)

    shred = sub.add_parser("shred", help="run a shred epoch now")
    _client_args(shred)

    hold = sub.add_parser("legal-hold", help="set or release a subject's legal hold")
    hold.add_argument("action", choices=["set", "release"])
    hold.add_argument("subject_id")
    hold.add_argument("--reason", default="", help="why the subject is held (required to set)")
    hold.add_argument("--until", default=None, help="ISO 8601 time the hold ends (default: never)")
    _client_args(hold)

    backup = sub.add_parser("backup", help="hot backup of the log (compacted) into DEST")
    backup.add_argument(
        "destination",
        help="empty or missing directory on the server's machine, outside the master "
        "keyring's directory (with the default layout: outside the data directory)",
    )
    backup.add_argument(
        "--include-keys",
        action="store_true",
        help="also copy the key store (read docs/ERASURE.md first)",
    )
    _client_args(backup)

    restore = sub.add_parser(
        "restore",
        help="put a backup's log back into a data directory (server stopped)",
        description="Restore the log of BACKUP (written by lethedb backup) into --data, keeping "
        "the directory's current key store so that every erasure since the backup holds. The "
        "old log is moved aside, never deleted. See docs/OPERATIONS.md.",
    )
    restore.add_argument("backup", type=Path, help="directory written by lethedb backup")
    restore.add_argument("--data", type=Path, required=True, help="data directory to restore into")
    restore.add_argument(
        "--keyring", type=Path, default=None, help="default: <data>/master.keyring"
    )

    stats = sub.add_parser("stats", help="counts and sizes of the store")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _client_args(stats)

    cluster = sub.add_parser("cluster", help="replication: the nodes of a cluster")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    cluster_status = cluster_sub.add_parser(
        "status",
        help="nodes, roles, term, positions, lag and connection times, as --server sees them",
        description="Ask the node at --server for the cluster as it sees it: a leader lists "
        "every follower it has seen since it started, a follower its link to the leader.",
    )
    cluster_status.add_argument("--json", action="store_true", help="print JSON, not a table")
    _client_args(cluster_status)

    verify = sub.add_parser(
        "verify", help="check the hash chain and every record's authentication tag"
    )
    verify.add_argument(
        "--data", type=Path, default=None, help="check a data directory offline (server stopped)"
    )
    verify.add_argument(
        "--keyring", type=Path, default=None, help="with --data; default: <data>/master.keyring"
    )
    _client_args(verify)
    # The walk is one call: its deadline must fit a whole store, not a page.
    verify.set_defaults(server=_Unset(DEFAULT_SERVER), timeout=86400.0)

    rotate = sub.add_parser(
        "rotate-master-key", help="re-wrap live data keys under a new master key version"
    )
    _client_args(rotate)

    project = sub.add_parser(
        "project",
        help="run a projection daemon: follow the log into a derived store",
        description="Import PROJECTION (module:Class, a lethedb.projections.Projection), "
        "and keep it up to date with the log until SIGTERM or SIGINT, which finish the "
        "current batch and exit 0. The working directory is importable.",
    )
    project.add_argument("projection", help="module:Class, e.g. myapp.projections:Users")
    project.add_argument(
        "--db", default=None, help="passed to the class (SQLiteProjection: the database file)"
    )
    project.add_argument(
        "--group",
        default=None,
        help="consumer group on the server (token role consumer; with --rebuild: admin)",
    )
    project.add_argument(
        "--member-id", default=None, help="member id in the group (default: projection)"
    )
    project.add_argument(
        "--rebuild",
        action="store_true",
        help="drop the projection's state and replay the log from position 0, with progress",
    )
    project.add_argument(
        "--until-caught-up", action="store_true", help="exit once the head of the log is reached"
    )
    _client_args(project)

    audit = sub.add_parser(
        "audit-erasure", help="prove from the files that forgotten subjects are erased"
    )
    audit.add_argument("--data", type=Path, required=True, help="data directory")
    audit.add_argument("--keyring", type=Path, default=None, help="default: <data>/master.keyring")
    audit.add_argument(
        "--backup",
        type=Path,
        action="append",
        default=[],
        help="backup or copy to scan for keys, keyrings and canaries (repeatable)",
    )
    audit.add_argument("--canary", action="append", default=[], help="text that must not appear")
    return parser


#: Exit status of ``audit-erasure`` when nothing failed but a check waits for a shred epoch.
EXIT_PENDING = 3


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's C core writes its own log lines to stderr (a failed TLS handshake,
    # a failed bind): they would break the server's text/JSON log format and
    # the CLI's one-line errors. Set before grpc is first imported; an
    # explicit GRPC_VERBOSITY (for debugging gRPC) is honoured.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    args = build_parser().parse_args(argv)
    commands = {
        "serve": _serve,
        "append": _append,
        "read": _read,
        "forget": _forget,
        "subject": _subject,
        "export": _export,
        "shred": _shred,
        "legal-hold": _legal_hold,
        "backup": _backup,
        "restore": _restore,
        "stats": _stats,
        "cluster": _cluster,
        "verify": _verify,
        "rotate-master-key": _rotate_master_key,
        "audit-erasure": _audit,
        "project": _project,
        "token": tokens.run_token_command,
    }
    try:
        code = commands[args.command](args)
        sys.stdout.flush()  # here, so that a closed stdout is seen inside the try
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except LetheError as exc:
        print(f"lethedb: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lethedb: interrupted", file=sys.stderr)
        return 130


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): a normal end, not an error.

    Whatever is still buffered can never be written; pointing stdout at
    /dev/null keeps the interpreter's final flush from failing again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from lethedb_server.ops.server import serve  # grpc is loaded only when serving

    flags = {name: getattr(args, name) for name in config_module.field_names()}
    cfg = config_module.load(flags, config_file=args.config)
    if args.print_config:
        # The keyring actually used, not the empty "default" that stands for it.
        shown = msgspec.structs.replace(cfg, keyring=str(cfg.keyring_path))
        sys.stdout.write(config_module.render(shown))
        return 0
    logs.configure(cfg.log_level, cfg.log_format)
    asyncio.run(serve(cfg))
    return 0


def _expected(text: str) -> Any:
    import lethedb

    named = {
        "any": lethedb.ANY,
        "no_stream": lethedb.NO_STREAM,
        "stream_exists": lethedb.STREAM_EXISTS,
    }
    if text.lower() in named:
        return named[text.lower()]
    try:
        return int(text)
    except ValueError:
        raise SystemExit(
            f"lethedb: --expected is {text!r}; use any, no_stream, stream_exists or a version"
        ) from None


def _append(args: argparse.Namespace) -> int:
    import lethedb

    data: Any
    if args.data.startswith("@"):
        data = Path(args.data[1:]).read_bytes()
    else:
        try:
            data = json.loads(args.data)
        except json.JSONDecodeError as exc:
            raise SystemExit(
                f"lethedb: data is not JSON ({exc}); use @FILE for raw bytes"
            ) from None
    event = lethedb.Event(args.event_type, data, subject_id=args.subject)
    with _client(args) as db:
        result = db.append(
            args.stream_id,
            [event],
            expected_version=_expected(args.expected),
            idempotency_key=args.idempotency_key,
        )
    print(
        json.dumps(
            {
                "position": result.first_position,
                "stream_version": result.first_version,
                "deduplicated": result.deduplicated,
            }
        )
    )
    return 0


def _read(args: argparse.Namespace) -> int:

    with _client(args) as db:
        events: Iterator[lethedb.RecordedEvent]
        if args.stream_id:
            events = db.read_stream(
                args.stream_id,
                from_version=args.start,
                backwards=args.backwards,
                max_count=args.max_count,
            )
        else:
            events = db.read_all(
                from_position=args.start, backwards=args.backwards, max_count=args.max_count
            )
        for event in events:
            print(json.dumps(_event_json(event)))
    return 0


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[lethedb.Client]:
    """A connected SDK client; SDK errors end the command with status 1."""
    import lethedb

    try:
        with lethedb.Client(args.server, timeout=args.timeout, token=args.token) as db:
            yield db
    except lethedb.LetheError as exc:
        print(f"lethedb: {_cli_message(exc, args)}", file=sys.stderr)
        raise SystemExit(1) from None


def _cli_message(error: lethedb.LetheError, args: argparse.Namespace) -> str:
    """The SDK's message, pointing at this command's options rather than at gRPC terms."""
    import lethedb

    if isinstance(error, lethedb.Unauthenticated):
        if args.token is None:
            return (
                f"the server at {args.server} requires a bearer token: set LETHEDB_TOKEN "
                "(or pass --token; the variable keeps it out of the process list)"
            )
        return (
            f"the server at {args.server} refused the token given by --token or "
            f"LETHEDB_TOKEN: {error.details}"
        )
    if isinstance(error, lethedb.PermissionDenied):
        return f"{error}; use a token with that role (--token or LETHEDB_TOKEN)"
    if isinstance(error, lethedb.Unavailable) and error.details != str(error):
        # A connection problem the SDK has put in words: say which option sets the address.
        return f"{error} (--server)"
    return str(error)


def _receipt_json(receipt: lethedb.SubjectReceipt) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "subject_id": receipt.subject_id,
        "state": "unknown" if _unknown(receipt) else receipt.state.name.lower(),
        "event_count": receipt.event_count,
    }
    if receipt.tombstone_position:
        doc.update(
            tombstone_position=receipt.tombstone_position,
            forgotten_at=_iso(receipt.forgotten_at),
            reason=receipt.reason,
            shred_epoch=receipt.shred_epoch,
        )
    if receipt.shredded_at:
        doc["shredded_at"] = _iso(receipt.shredded_at)
    if receipt.legal_hold is not None:
        hold = receipt.legal_hold
        doc["legal_hold"] = {
            "reason": hold.reason,
            "set_at": _iso(hold.set_at),
            "until": _iso(hold.until) if hold.until else None,
        }
    if receipt.nodes:
        doc["nodes"] = [
            {"node_id": n.node_id, "state": n.state.name.lower(), "connected": n.connected}
            for n in receipt.nodes
        ]
    return doc


def _utc(moment: datetime) -> datetime:
    """Times given without a zone are taken as UTC, the zone of every stored time."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _iso(ns: int) -> str:
    return iso_time(ns)


def _unknown(receipt: lethedb.SubjectReceipt) -> bool:
    """No event of the subject is stored and it was never forgotten: the server has no trace.

    The server answers ACTIVE for any id; to a person that reads as "this
    subject exists", which hides a mistyped id.
    """
    import lethedb

    return receipt.state is lethedb.SubjectState.ACTIVE and receipt.event_count == 0


def _forget(args: argparse.Namespace) -> int:
    with _client(args) as db:
        if not args.force and _unknown(db.get_subject(args.subject_id)):
            print(
                f"lethedb: subject {args.subject_id!r} has no events; nothing was forgotten. "
                "Check the id, or pass --force to record its erasure anyway",
                file=sys.stderr,
            )
            return 2
        receipt = db.forget_subject(args.subject_id, reason=args.reason)
    print(json.dumps(_receipt_json(receipt), indent=2))
    return 0


def _subject(args: argparse.Namespace) -> int:
    with _client(args) as db:
        receipt = db.get_subject(args.subject_id)
    print(json.dumps(_receipt_json(receipt), indent=2))
    return 0


EXPORT_FORMAT = "lethedb.subject-export.v1"


def _export(args: argparse.Namespace) -> int:
    """Right of access: one JSON document with every event of the subject."""
    with _client(args) as db:
        events = [_event_json(e, export=True) for e in db.export_subject(args.subject_id)]
    document = {
        "format": EXPORT_FORMAT,
        "subject_id": args.subject_id,
        "exported_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "event_count": len(events),
        "events": events,
    }
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        _write_private(args.output, text)
        print(
            f"wrote {len(events)} events of subject {args.subject_id} to {args.output}",
            file=sys.stderr,
        )
    return 0


def _write_private(path: Path, text: str) -> None:
    """Write *text* to *path*, mode 0600: an export is a subject's personal data in clear."""
    from lethedb_server.files import PRIVATE_FILE_MODE, open_private

    fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
    with open(fd, "w", encoding="utf-8") as out:
        if os.path.isfile(path):
            os.fchmod(fd, PRIVATE_FILE_MODE)  # an existing file keeps its mode otherwise
        out.write(text)


def _shred(args: argparse.Namespace) -> int:
    with _client(args) as db:
        result = db.admin.shred()
    print(
        f"shred epoch {result.epoch} complete: master key version {result.master_version} "
        f"is current, {result.live_keys} live keys re-wrapped, "
        f"{result.shredded_subjects} forgotten subjects shredded"
    )
    return 0


def _legal_hold(args: argparse.Namespace) -> int:
    with _client(args) as db:
        if args.action == "release":
            receipt = db.admin.release_legal_hold(args.subject_id)
        else:
            if not args.reason:
                raise SystemExit("lethedb: --reason is required to set a legal hold")
            until = _hold_until(args.until) if args.until else None
            receipt = db.admin.set_legal_hold(args.subject_id, args.reason, until=until)
    print(json.dumps(_receipt_json(receipt), indent=2))
    return 0


def _hold_until(text: str) -> datetime:
    """``--until`` as an aware datetime in the future, or a one-line refusal."""
    try:
        moment = _utc(datetime.fromisoformat(text))
    except ValueError:
        raise SystemExit(
            f"lethedb: --until is {text!r}; expected an ISO 8601 date or time, "
            "e.g. 2027-01-31 or 2027-01-31T18:00:00Z (UTC unless a zone is given)"
        ) from None
    if moment <= datetime.now(UTC):
        raise SystemExit(
            f"lethedb: --until {moment.isoformat().replace('+00:00', 'Z')} is in the past; "
            "a hold must end in the future (omit --until for a hold without end)"
        )
    return moment


def _backup(args: argparse.Namespace) -> int:
    from lethedb_server.engine.erasure import KEY_BACKUP_WARNING

    if args.include_keys:
        print(f"lethedb: warning: {KEY_BACKUP_WARNING}", file=sys.stderr)
    with _client(args) as db:
        result = db.admin.backup(args.destination, include_keys=args.include_keys)
    print(
        f"backed up the log up to position {result.last_position} to {result.destination} "
        f"({result.log_bytes} bytes"
        + (f", key store {result.key_bytes} bytes)" if args.include_keys else ", no keys)")
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    from lethedb_server.engine.restore import restore

    status, lines = restore(args.backup, args.data, args.keyring)
    for line in lines:
        print(line)
    return status


def _stats(args: argparse.Namespace) -> int:
    from lethedb_server.engine.model import human_size

    with _client(args) as db:
        stats = db.admin.stats()
    if args.json:
        doc: dict[str, Any] = {name: getattr(stats, name) for name in stats.__struct_fields__}
        doc["store_id"] = stats.store_id.hex()
        print(json.dumps(doc, indent=2))
        return 0
    rows = [
        ("last position", f"{stats.last_position:,}"),
        ("streams", f"{stats.streams:,}"),
        ("subjects (live)", f"{stats.subjects:,}"),
        ("forgotten subjects", f"{stats.forgotten_subjects:,}"),
        ("  pending shred", f"{stats.pending_shred:,}"),
        ("shred epoch", str(stats.shred_epoch)),
        ("master key version", str(stats.master_version)),
        ("log file", human_size(stats.log_file_bytes)),
        ("log map size", human_size(stats.log_map_bytes)),
        ("key store file", human_size(stats.key_file_bytes)),
        ("store id", stats.store_id.hex()),
    ]
    if stats.role:
        rows.append(("role", stats.role))
    if stats.role == "leader":
        lag = f"{stats.max_follower_lag_positions:,} positions, "
        rows.append(("slowest follower lag", lag + f"{stats.max_follower_lag_seconds:.3f}s"))
    if stats.restored_at:
        rows.append(("restored log", _restored_log(stats)))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


def _restored_log(stats: lethedb.StoreStats) -> str:
    lost = stats.restored_from - stats.restored_to
    return (
        f"accepted {_iso(stats.restored_at)}: it ended at position {stats.restored_to:,}, "
        f"the last known head was {stats.restored_from:,} ({lost:,} positions lost)"
    )


def _cluster(args: argparse.Namespace) -> int:
    """``cluster status``: the one cluster subcommand so far."""
    with _client(args) as db:
        status = db.admin.cluster_status()
    if args.json:
        print(json.dumps(msgspec.to_builtins(status), indent=2))
        return 0
    for line in cluster_table(status, _host_port(args.server)):
        print(line)
    return 0


_CLUSTER_COLUMNS = (
    "NODE", "ROLE", "ADDRESS", "CONNECTED SINCE", "COMMIT", "POSITION", "LAG", "LAG SECONDS",
)  # fmt: skip


def cluster_table(status: lethedb.ClusterStatus, address: str) -> list[str]:
    """The answer of ``cluster status`` as a summary line and one table row per node.

    The node asked comes first (*address* is how it was reached), then, on a
    leader, each follower; a follower's own row shows its lag behind the leader.
    """
    summary = f"term {status.term}, sync replicas {status.sync_replicas}"
    if status.role == "follower":
        link = "connected" if status.connected else "NOT connected"
        caught_up = "caught up" if status.caught_up else "NOT caught up (reads refused)"
        summary += f"; leader {status.leader or '(unknown)'}: {link}, {caught_up}"
    rows = [
        (
            status.node_id, status.role, address, "(asked)", f"{status.commit:,}",
            f"{status.position:,}", f"{status.lag_positions:,}", f"{status.lag_seconds:.3f}",
        )
    ]  # fmt: skip
    for f in status.followers:
        since = _iso(f.connected_since) if f.connected else "disconnected"
        rows.append(
            (
                f.node_id, "follower", f.advertise or "-", since, f"{f.commit:,}",
                f"{f.position:,}", f"{f.lag_positions:,}", f"{f.lag_seconds:.3f}",
            )
        )  # fmt: skip
    widths = [max(len(row[i]) for row in (_CLUSTER_COLUMNS, *rows)) for i in range(8)]
    lines = [summary]
    for row in (_CLUSTER_COLUMNS, *rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return lines


def _host_port(server: str) -> str:
    """The host:port part of a ``--server`` value (a connection string may carry more)."""
    return server.removeprefix("lethedb://").split("?", 1)[0].split("/", 1)[0]


def _verify(args: argparse.Namespace) -> int:
    """Walk the log over --server, or offline over --data; exit 1 when a record is bad."""
    from lethedb_server.ops.progress import ProgressBar

    if args.data is not None and not isinstance(args.server, _Unset):
        raise SystemExit("lethedb: give --server or --data, not both")
    if args.keyring is not None and args.data is None:
        raise SystemExit("lethedb: --keyring goes with --data (a server has its own keyring)")
    if args.data is not None:
        return _verify_offline(args)
    with _client(args) as db, ProgressBar("verify") as bar:
        result = db.admin.verify(
            progress=lambda p: bar.update(p.checked, p.last_position), timeout=args.timeout
        )
    return _verify_outcome(
        result.checked, result.redacted, result.first_bad_position, result.problem
    )


def _verify_offline(args: argparse.Namespace) -> int:
    from lethedb_server.engine.verify import verify_data_dir
    from lethedb_server.errors import DataDirLocked
    from lethedb_server.ops.progress import ProgressBar

    data: Path = args.data
    if not (data / "log").is_dir():
        print(f"lethedb: {data} is not a LetheDB data directory (it has no log/)", file=sys.stderr)
        return 2
    # Verifying must never create a keyring: a fresh one would make every
    # record look damaged, and a later start could pick it up.
    keyring: Path = args.keyring or data / "master.keyring"
    if not keyring.is_file():
        print(
            f"lethedb: no master keyring at {keyring}; give its path with --keyring",
            file=sys.stderr,
        )
        return 2
    try:
        with ProgressBar("verify") as bar:
            report = verify_data_dir(data, keyring, progress=bar.update)
    except DataDirLocked as exc:
        print(
            f"lethedb: {exc}.\nA running server holds {data}: verify through it instead, "
            "with lethedb verify --server ADDRESS",
            file=sys.stderr,
        )
        return 2
    return _verify_report(report)


#: Damaged places listed one per line before the rest are only counted.
_DAMAGE_SHOWN = 20


def _verify_report(report: DataReport) -> int:
    """Print every damaged place (up to a cap) and what to do; exit 1 when there is any."""
    if report.ok:
        return _verify_outcome(report.checked, report.redacted, None, "")
    bad = report.first_bad_position
    first = next(d for d in report.damage if bad is None or d.position == bad)
    if bad is None:
        print(f"FAILED at {first.where}: {first.what}")
    else:
        print(f"FAILED at position {bad}: {first.what}")
    if len(report.damage) > 1:
        print(f"{len(report.damage)} damaged places:")
        for damage in report.damage[:_DAMAGE_SHOWN]:
            print(f"  {damage}")
        if len(report.damage) > _DAMAGE_SHOWN:
            print(f"  ... and {len(report.damage) - _DAMAGE_SHOWN} more")
    if not report.tags_checked:
        print(
            "Authentication tags were not checked: LMDB must not read a file whose own "
            "structure is damaged."
        )
    return _verify_remedy()


def _verify_outcome(checked: int, redacted: int, bad: int | None, problem: str) -> int:
    if bad is None and not problem:
        print(f"OK: {checked} events verified ({redacted} redacted), chain head matches")
        return 0
    print(f"FAILED at position {bad if bad is not None else '?'}: {problem}")
    return _verify_remedy()


def _verify_remedy() -> int:
    from lethedb_server.engine.verify import REMEDY

    print(f"To repair: {REMEDY}.")
    return 1


def _rotate_master_key(args: argparse.Namespace) -> int:
    with _client(args) as db:
        result = db.admin.rotate_master_key()
    print(
        f"master key version {result.master_version} is current: {result.rewrapped_keys} "
        "live keys re-wrapped; older versions are kept until the next shred epoch"
    )
    return 0


def _project(args: argparse.Namespace) -> int:
    """Run a projection until SIGTERM/SIGINT (exit 0) or an error (exit 1)."""
    import signal

    import lethedb
    from lethedb.projections import Projection, ProjectionRunner
    from lethedb_server.ops.progress import ProgressBar

    logs.configure("info", "text")
    cls = _import_projection(args.projection)
    try:
        projection = cls(args.db) if args.db is not None else cls()
    except TypeError as exc:
        raise SystemExit(f"lethedb: cannot create {args.projection}: {exc}") from None
    assert isinstance(projection, Projection)
    bar = ProgressBar("rebuild") if args.rebuild else None

    def progress(position: int, head: int) -> None:
        if bar is not None:
            bar.update(position, head)

    with _client(args) as db:
        try:
            runner = ProjectionRunner(
                projection,
                db,
                group=args.group,
                member_id=args.member_id,
                until_caught_up=args.until_caught_up,
                progress=progress,
            )
        except lethedb.LetheError as exc:
            print(f"lethedb: {exc}", file=sys.stderr)
            return 2
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: runner.stop())
        try:
            position = runner.run(rebuild=args.rebuild)
        finally:
            if bar is not None:
                bar.close()
    print(f"lethedb: {args.projection} stopped at position {position}", file=sys.stderr)
    return 0


def _import_projection(spec: str) -> type[Any]:
    import importlib

    from lethedb.projections import Projection

    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise SystemExit(f"lethedb: projection is {spec!r}; expected module:Class")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the application's own modules
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"lethedb: cannot import {module_name}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, Projection):
        raise SystemExit(
            f"lethedb: {spec} is not a projection class (a lethedb.projections.Projection)"
        )
    return cls


def _audit(args: argparse.Namespace) -> int:
    from lethedb_server.engine.audit import FAIL, PASS, PENDING, audit_erasure

    report = audit_erasure(args.data, args.keyring, args.backup, args.canary)
    print(report.render())
    return {PASS: 0, FAIL: 1, PENDING: EXIT_PENDING}[report.verdict]


def _event_json(event: Any, *, export: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "position": event.position,
        "stream_id": event.stream_id,
        "stream_version": event.stream_version,
        "event_id": str(event.event_id),
        "event_type": event.event_type,
        "subject_id": event.subject_id,
        "content_type": event.content_type,
        "recorded_at": _iso(event.recorded_at),
        "recorded_at_ns": event.recorded_at,
        "redacted": event.redacted,
    }
    if export:
        del doc["subject_id"], doc["redacted"], doc["recorded_at_ns"]
    if not event.redacted:
        doc.update(_payload_json("data", event.data, event.content_type))
        if event.metadata:
            doc.update(_payload_json("metadata", event.metadata, "application/json"))
    return doc


def _payload_json(name: str, raw: bytes, content_type: str) -> dict[str, Any]:
    """JSON payloads inline; anything else base64-encoded under ``<name>_base64``."""
    if content_type == "application/json":
        try:
            return {name: json.loads(raw) if raw else None}
        except ValueError:
            pass
    return {f"{name}_base64": base64.b64encode(raw).decode()}


if __name__ == "__main__":
    raise SystemExit(main())
