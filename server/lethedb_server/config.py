"""Server configuration: one struct, filled from defaults, a TOML file, the
environment and flags, in that order of precedence (a flag wins).

Every option has the same name everywhere: ``max_event_bytes`` in the TOML
file, ``LETHEDB_MAX_EVENT_BYTES`` in the environment, ``--max-event-bytes`` as
a flag. docs/CONFIGURATION.md lists them; ``lethedb serve --print-config``
shows the effective values.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from lethedb_server.errors import ValidationError
from lethedb_server.keys import DEFAULT_MAX_USES
from lethedb_server.store import StoreOptions
from lethedb_server.validation import Limits
from lethedb_server.writer import WriterLimits

ENV_PREFIX = "LETHEDB_"


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    data: str = "./lethedb-data"
    listen: str = "127.0.0.1:50051"
    keyring: str = ""
    dek_cache_size: int = 10_000
    dek_max_uses: int = DEFAULT_MAX_USES
    max_event_bytes: int = 1 << 20
    max_events_per_append: int = 10_000
    max_append_bytes: int = 16 << 20
    max_message_bytes: int = 32 << 20
    subject_id_pattern: str = ""
    idempotency_window_s: float = 24 * 3600.0
    batch_max_commands: int = 1024
    batch_max_bytes: int = 16 << 20
    shutdown_grace_s: float = 10.0
    shred_interval_s: float = 3600.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    ready_file: str = ""

    @property
    def data_dir(self) -> Path:
        return Path(self.data)

    @property
    def keyring_path(self) -> Path:
        return Path(self.keyring) if self.keyring else self.data_dir / "master.keyring"

    def store_options(self) -> StoreOptions:
        return StoreOptions(
            keyring_path=self.keyring_path,
            dek_cache_size=self.dek_cache_size,
            dek_max_uses=self.dek_max_uses,
            writer=WriterLimits(
                max_batch_commands=self.batch_max_commands,
                max_batch_bytes=self.batch_max_bytes,
                idempotency_window_ns=int(self.idempotency_window_s * 1e9),
            ),
        )

    def limits(self) -> Limits:
        return Limits(
            max_event_bytes=self.max_event_bytes,
            max_events_per_append=self.max_events_per_append,
            max_append_bytes=self.max_append_bytes,
            subject_id_pattern=self.subject_id_pattern or None,
        )


HELP: dict[str, str] = {
    "data": "data directory (created on first start)",
    "listen": "host:port to serve gRPC on (port 0 picks a free port)",
    "keyring": "master keyring file (default: <data>/master.keyring)",
    "dek_cache_size": "subjects whose unwrapped keys are cached in memory",
    "dek_max_uses": "encryptions per data key version before it rolls to a new one",
    "max_event_bytes": "largest data + metadata of one event",
    "max_events_per_append": "most events in one append",
    "max_append_bytes": "largest total data + metadata of one append",
    "max_message_bytes": "largest gRPC message the server accepts",
    "subject_id_pattern": "regular expression every subject id must match (empty: any)",
    "idempotency_window_s": "seconds an idempotency key is remembered",
    "batch_max_commands": "most commands the writer commits in one transaction",
    "batch_max_bytes": "most bytes the writer commits in one transaction",
    "shutdown_grace_s": "seconds in-flight calls get to finish on shutdown",
    "shred_interval_s": "seconds between automatic shred epochs when forgets are pending (0: off)",
    "log_level": "debug, info, warning or error",
    "log_format": "text (key=value) or json",
    "ready_file": "file to write the bound address to once serving (for supervisors)",
}


def field_names() -> tuple[str, ...]:
    return Config.__struct_fields__


def load(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Config:
    """Merge defaults < TOML file < LETHEDB_* variables < flags (None means unset)."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        try:
            merged.update(tomllib.loads(config_file.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValidationError(f"config file {config_file}: {exc}") from exc
    env = os.environ if environ is None else environ
    for name in field_names():
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None:
            merged[name] = value
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})
    try:
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ValidationError(f"configuration: {exc}") from exc


def render(config: Config) -> str:
    """The effective configuration as TOML (no secrets exist yet to mask)."""
    lines = []
    for name in field_names():
        value = getattr(config, name)
        text = str(value).lower() if isinstance(value, bool) else json.dumps(value)
        lines.append(f"{name} = {text}")
    return "\n".join(lines) + "\n"
