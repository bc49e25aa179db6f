"""The ``lethedb`` command: run the server, and poke at it from a shell.

``serve`` takes every option as a flag, a ``LETHEDB_*`` variable or a key of
the TOML file given with ``--config``. ``append`` and ``read`` are thin
wrappers over the SDK for quick use; they print JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lethedb_server import config as config_module
from lethedb_server import logs
from lethedb_server.errors import LetheError


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run a LetheDB server")
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    for name in config_module.field_names():
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=f"{config_module.HELP[name]} (env {config_module.ENV_PREFIX}{name.upper()})",
        )


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server", default="localhost:50051", help="address of the server (default %(default)s)"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lethedb", description="LetheDB: a GDPR-aware, immutable event store."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "append":
            return _append(args)
        return _read(args)
    except LetheError as exc:
        print(f"lethedb: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    from lethedb_server.server import serve  # grpc is loaded only when serving

    flags = {name: getattr(args, name) for name in config_module.field_names()}
    cfg = config_module.load(flags, config_file=args.config)
    if args.print_config:
        sys.stdout.write(config_module.render(cfg))
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
    try:
        with lethedb.Client(args.server, timeout=args.timeout) as db:
            result = db.append(
                args.stream_id,
                [event],
                expected_version=_expected(args.expected),
                idempotency_key=args.idempotency_key,
            )
    except lethedb.LetheError as exc:
        print(f"lethedb: {exc}", file=sys.stderr)
        return 1
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
    import lethedb

    try:
        with lethedb.Client(args.server, timeout=args.timeout) as db:
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
    except lethedb.LetheError as exc:
        print(f"lethedb: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


def _event_json(event: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "position": event.position,
        "stream_id": event.stream_id,
        "stream_version": event.stream_version,
        "event_id": str(event.event_id),
        "event_type": event.event_type,
        "subject_id": event.subject_id,
        "content_type": event.content_type,
        "recorded_at": event.recorded_at,
        "redacted": event.redacted,
    }
    if not event.redacted:
        if event.content_type == "application/json":
            doc["data"] = json.loads(event.data) if event.data else None
        else:
            doc["data_hex"] = event.data.hex()
    return doc


if __name__ == "__main__":
    raise SystemExit(main())
