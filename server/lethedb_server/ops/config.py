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
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from lethedb_contract import DEFAULT_MAX_MESSAGE_BYTES
from lethedb_server.api.validation import Limits
from lethedb_server.coord.endpoints import DEFAULT_TTL_S, parse_endpoints
from lethedb_server.engine.store import StoreOptions
from lethedb_server.engine.subscriptions import SubscriptionLimits
from lethedb_server.engine.writer import WriterLimits
from lethedb_server.errors import ValidationError
from lethedb_server.storage.keys import DEFAULT_MAX_USES

ENV_PREFIX = "LETHEDB_"


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every option of the server. An option the engine also has takes its
    default from the engine's own (StoreOptions, WriterLimits, Limits,
    SubscriptionLimits), so each default is written once."""

    data: str = "./lethedb-data"
    listen: str = "127.0.0.1:50051"
    keyring: str = ""
    dek_cache_size: int = StoreOptions.dek_cache_size
    dek_max_uses: int = DEFAULT_MAX_USES
    max_event_bytes: int = Limits.max_event_bytes
    max_events_per_append: int = Limits.max_events_per_append
    max_append_bytes: int = Limits.max_append_bytes
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    subject_id_pattern: str = ""
    idempotency_window_s: float = WriterLimits.idempotency_window_ns / 1e9
    batch_max_commands: int = WriterLimits.max_batch_commands
    batch_max_bytes: int = WriterLimits.max_batch_bytes
    shutdown_grace_s: float = 10.0
    shred_interval_s: float = 3600.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    ready_file: str = ""
    accept_restored_log: bool = False
    # security and operations (docs/CONFIGURATION.md, "Security")
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tokens_file: str = ""
    insecure: bool = False
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    max_concurrent_streams: Annotated[int, msgspec.Meta(ge=1)] = 256
    max_streams_per_connection: Annotated[int, msgspec.Meta(ge=0)] = 128
    max_inflight_appends: Annotated[int, msgspec.Meta(ge=0)] = WriterLimits.max_inflight_appends
    keepalive_time_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    keepalive_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 20.0
    keepalive_min_ping_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    keepalive_permit_without_calls: bool = True
    max_ping_strikes: Annotated[int, msgspec.Meta(ge=0)] = 2
    max_subscribers: int = SubscriptionLimits.max_subscribers
    subscription_heartbeat_s: float = SubscriptionLimits.heartbeat_interval_s
    # per-client quotas and consumer groups (docs/CONFIGURATION.md, "Limits")
    max_streams_per_client: Annotated[int, msgspec.Meta(ge=0)] = 4000
    max_subscriptions_per_client: Annotated[int, msgspec.Meta(ge=0)] = 2000
    max_consumer_groups: Annotated[int, msgspec.Meta(ge=0)] = SubscriptionLimits.max_consumer_groups
    # request, in-flight and connection limits against floods (docs/CONFIGURATION.md, "Limits")
    max_request_events: Annotated[int, msgspec.Meta(ge=1)] = Limits.max_request_events
    max_request_bytes: Annotated[int, msgspec.Meta(ge=1)] = Limits.max_request_bytes
    max_inflight_events: Annotated[int, msgspec.Meta(ge=0)] = WriterLimits.max_inflight_events
    max_inflight_bytes: Annotated[int, msgspec.Meta(ge=0)] = WriterLimits.max_inflight_bytes
    max_connections: Annotated[int, msgspec.Meta(ge=0)] = 4096
    max_connections_per_peer: Annotated[int, msgspec.Meta(ge=0)] = 256
    handshake_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    connection_idle_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 600.0
    # replication (docs/CLUSTERING.md)
    follow: str = ""
    node_id: str = ""
    advertise: str = ""
    sync_replicas: Annotated[int, msgspec.Meta(ge=0)] = StoreOptions.sync_replicas
    sync_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = StoreOptions.sync_timeout_s
    follow_token_file: str = ""
    follow_tls_ca: str = ""
    follow_tls_cert: str = ""
    follow_tls_key: str = ""
    # automatic failover through etcd (docs/CLUSTERING.md)
    cluster: str = ""
    etcd: str = ""
    lease_ttl_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = DEFAULT_TTL_S
    replication_advertise: str = ""

    @property
    def data_dir(self) -> Path:
        return Path(self.data)

    @property
    def keyring_path(self) -> Path:
        return Path(self.keyring) if self.keyring else self.data_dir / "master.keyring"

    @property
    def role(self) -> str:
        """This node's part at start: ``follower`` with ``follow`` or ``cluster`` (a cluster
        member starts as a follower of nobody until etcd names a leader, maybe itself);
        else ``leader`` when writes wait for followers, else ``single`` (which serves
        followers too: no flag is needed to be followed)."""
        if self.follow or self.cluster:
            return "follower"
        return "leader" if self.sync_replicas else "single"

    def store_options(self) -> StoreOptions:
        return StoreOptions(
            role=self.role,
            leader=self.follow,
            sync_replicas=self.sync_replicas,
            sync_timeout_s=self.sync_timeout_s,
            keyring_path=self.keyring_path,
            dek_cache_size=self.dek_cache_size,
            dek_max_uses=self.dek_max_uses,
            accept_restored_log=self.accept_restored_log,
            writer=WriterLimits(
                max_batch_commands=self.batch_max_commands,
                max_batch_bytes=self.batch_max_bytes,
                idempotency_window_ns=int(self.idempotency_window_s * 1e9),
                max_inflight_appends=self.max_inflight_appends,
                max_inflight_events=self.max_inflight_events,
                max_inflight_bytes=self.max_inflight_bytes,
            ),
        )

    def subscription_limits(self) -> SubscriptionLimits:
        return SubscriptionLimits(
            max_subscribers=self.max_subscribers,
            heartbeat_interval_s=self.subscription_heartbeat_s,
            max_consumer_groups=self.max_consumer_groups,
        )

    def limits(self) -> Limits:
        return Limits(
            max_event_bytes=self.max_event_bytes,
            max_events_per_append=self.max_events_per_append,
            max_append_bytes=self.max_append_bytes,
            max_request_events=self.max_request_events,
            max_request_bytes=self.max_request_bytes,
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
    "max_append_bytes": "largest append: every field of its events plus 128 bytes per event",
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
    "accept_restored_log": (
        "serve a log that ends before the position its key store has seen (a log restored "
        "from an older backup); see docs/OPERATIONS.md"
    ),
    "tls_cert": "PEM certificate chain of the server; with tls_key, enables TLS",
    "tls_key": "PEM private key of tls_cert (unencrypted; keep it mode 0600)",
    "tls_client_ca": "PEM CA bundle; clients must present a certificate it signed (mTLS)",
    "tokens_file": "JSON file of bearer-token hashes and roles; enables authentication",
    "insecure": "allow a non-loopback listen address without TLS and tokens (logged loudly)",
    "metrics_port": "port of the Prometheus /metrics endpoint on the listen host (0: off)",
    "max_concurrent_streams": "HTTP/2 streams per connection; more wait at the client",
    "max_streams_per_connection": (
        "streaming calls in progress per connection; more get RESOURCE_EXHAUSTED (0: no limit)"
    ),
    "max_inflight_appends": (
        "appends and commits in flight per server; more get RESOURCE_EXHAUSTED (0: no limit)"
    ),
    "keepalive_time_s": "seconds between the server's keepalive pings on a connection",
    "keepalive_timeout_s": "seconds to wait for a keepalive ping's answer before closing",
    "keepalive_min_ping_interval_s": (
        "shortest interval between a client's pings without data; faster ones are strikes"
    ),
    "keepalive_permit_without_calls": "accept client keepalive pings on connections without calls",
    "max_ping_strikes": "ping strikes before the connection is closed (GOAWAY); 0: unlimited",
    "max_subscribers": "most concurrent Subscribe calls; more are refused (RESOURCE_EXHAUSTED)",
    "subscription_heartbeat_s": "seconds of silence before an idle subscription gets a heartbeat",
    "max_streams_per_client": (
        "streaming calls in progress per token (per peer host without tokens); more get "
        "RESOURCE_EXHAUSTED (0: no limit)"
    ),
    "max_subscriptions_per_client": (
        "subscriptions per token (per peer host without tokens); more get RESOURCE_EXHAUSTED "
        "(0: no limit)"
    ),
    "max_consumer_groups": (
        "consumer groups with a stored checkpoint; a new one beyond it gets RESOURCE_EXHAUSTED "
        "(0: no limit)"
    ),
    "max_request_events": "most events in one call (Append, Commit, AppendBatch, stream message)",
    "max_request_bytes": "largest call: its encoded size plus 128 bytes per event",
    "max_inflight_events": (
        "events of appends in flight per server; more get RESOURCE_EXHAUSTED (0: no limit)"
    ),
    "max_inflight_bytes": (
        "bytes of appends in flight per server; more get RESOURCE_EXHAUSTED (0: no limit)"
    ),
    "max_connections": "most open connections; more are closed at accept (0: what fds allow)",
    "max_connections_per_peer": (
        "most open connections per peer address; the newest beyond it are closed (0: no limit)"
    ),
    "handshake_timeout_s": (
        "seconds a new connection gets to finish its TLS/HTTP/2 handshake before it is closed"
    ),
    "connection_idle_timeout_s": (
        "seconds without calls after which a connection is closed (GOAWAY); 0: never"
    ),
    "follow": "leader address (host:port) to replicate from; makes this node a read-only follower",
    "node_id": (
        "this node's name in the cluster (default: the host name and a digest of the data "
        "directory's path)"
    ),
    "advertise": "host:port clients use to reach this node (default: the bound listen address)",
    "sync_replicas": (
        "followers that must hold a write durably before it is acknowledged (0: asynchronous)"
    ),
    "sync_timeout_s": (
        "seconds a write waits for sync_replicas followers before it fails NotEnoughReplicas"
    ),
    "follow_token_file": "file holding the replica-role bearer token this follower sends",
    "follow_tls_ca": (
        "PEM CA bundle that signed the leader's certificate (default: the system roots; "
        "plaintext only to a loopback leader)"
    ),
    "follow_tls_cert": "PEM client certificate this follower presents to the leader (mTLS)",
    "follow_tls_key": "PEM private key of follow_tls_cert",
    "cluster": (
        "name of the cluster this node joins; etcd elects its leader (needs etcd; excludes follow)"
    ),
    "etcd": "etcd endpoints of the cluster, comma-separated: http://host:2379[,http://host2:2379]",
    "replication_advertise": (
        "host:port the other nodes replicate from when this node leads (default: advertise):"
        " a separate network for replication, or a proxy"
    ),
    "lease_ttl_s": (
        "seconds of the leader's etcd lease: a leader that cannot renew it stops acknowledging "
        "writes before it expires, and another node leads about this long after"
    ),
}


#: Shorter flags some options also answer to (the option keeps its one name elsewhere).
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "sync_timeout_s": ("--sync-timeout",),
    "lease_ttl_s": ("--lease-ttl",),
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
        config = msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ValidationError(f"configuration: {exc}") from exc
    check(config)
    return config


# --- validation: every value is checked here, before anything is created ---------------

#: Lowest value of each numeric option without a bound in its type (msgspec
#: checks those). A zero where the code divides, batches or sizes by the
#: value would fail later, after the data directory exists, or hang.
MINIMUM: dict[str, float] = {
    "dek_cache_size": 0,
    "dek_max_uses": 1,
    "max_event_bytes": 1,
    "max_events_per_append": 1,
    "max_append_bytes": 1,
    "max_message_bytes": 1024,
    "idempotency_window_s": 0,
    "batch_max_commands": 1,
    "batch_max_bytes": 1,
    "shutdown_grace_s": 0,
    "shred_interval_s": 0,
    "max_subscribers": 1,
}
#: Options that must be above (not at) their bound.
ABOVE_ZERO: frozenset[str] = frozenset({"subscription_heartbeat_s"})


def check(config: Config) -> None:
    """Refuse a configuration that cannot work, naming the option, its value and the rule."""
    for name, minimum in MINIMUM.items():
        value = getattr(config, name)
        if value < minimum:
            raise ValidationError(f"configuration: {name} is {value}; it must be >= {minimum}")
    for name in ABOVE_ZERO:
        value = getattr(config, name)
        if not value > 0:
            raise ValidationError(f"configuration: {name} is {value}; it must be > 0")
    if not config.data:
        raise ValidationError("configuration: data is empty; name the data directory")
    _check_listen(config.listen)
    if config.subject_id_pattern:
        try:
            re.compile(config.subject_id_pattern)
        except re.error as exc:
            raise ValidationError(
                f"configuration: subject_id_pattern {config.subject_id_pattern!r} is not a "
                f"regular expression: {exc}"
            ) from None
    if config.ready_file and not Path(config.ready_file).resolve().parent.is_dir():
        raise ValidationError(
            f"configuration: ready_file {config.ready_file!r}: its directory does not exist"
        )
    _check_replication(config)


_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1", "0.0.0.0", "[::]", ""})


def _check_replication(config: Config) -> None:
    """The replication options: addresses, names and the TLS files of the follower link."""
    if config.node_id and not _NODE_ID.fullmatch(config.node_id):
        raise ValidationError(
            f"configuration: node_id is {config.node_id[:80]!r}; it must be 1-64 letters, "
            "digits, '.', '_' or '-'"
        )
    if config.advertise:
        _check_address("advertise", config.advertise)
    if bool(config.follow_tls_cert) != bool(config.follow_tls_key):
        raise ValidationError(
            "configuration: follow_tls_cert and follow_tls_key go together; give both or neither"
        )
    for name in ("follow_token_file", "follow_tls_ca", "follow_tls_cert", "follow_tls_key"):
        path = getattr(config, name)
        if path and not Path(path).is_file():
            raise ValidationError(f"configuration: {name} {path!r} is not a readable file")
    _check_cluster(config)
    if not config.follow:
        return
    _check_address("follow", config.follow)
    if _same_node(config.follow, config.listen) or _same_node(config.follow, config.advertise):
        raise ValidationError(
            f"configuration: follow is {config.follow!r}, this node's own address; name the "
            "leader's address (a node cannot follow itself)"
        )


_CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "[::]", ""})


def _check_cluster(config: Config) -> None:
    """The failover options: a cluster needs etcd and an address the others can dial."""
    if config.etcd and not config.cluster:
        raise ValidationError(
            "configuration: etcd is set without cluster; name the cluster this node joins "
            "(--cluster NAME)"
        )
    if config.replication_advertise and not config.cluster:
        raise ValidationError(
            "configuration: replication_advertise is set without cluster; only a cluster "
            "member publishes where it is replicated from (--cluster NAME)"
        )
    if not config.cluster:
        return
    if config.replication_advertise:
        _check_address("replication_advertise", config.replication_advertise)
    if not _CLUSTER_NAME.fullmatch(config.cluster):
        raise ValidationError(
            f"configuration: cluster is {config.cluster[:80]!r}; it must be 1-64 letters, "
            "digits, '.', '_' or '-'"
        )
    if not config.etcd:
        raise ValidationError(
            "configuration: cluster needs etcd, the coordinator that elects the leader "
            "(--etcd http://host:2379[,http://host2:2379])"
        )
    try:
        parse_endpoints(config.etcd)
    except ValueError as exc:
        raise ValidationError(f"configuration: etcd: {exc}") from None
    if config.follow:
        raise ValidationError(
            "configuration: cluster and follow exclude each other: a cluster member follows "
            "whichever node etcd elects; drop --follow"
        )
    if config.listen.startswith("unix:") and not config.advertise:
        raise ValidationError(
            "configuration: cluster needs a TCP address the other nodes can dial; give "
            "--advertise HOST:PORT"
        )
    host, _, port = config.listen.rpartition(":")
    if not config.advertise and (host in _WILDCARD_HOSTS or port == "0"):
        raise ValidationError(
            f"configuration: listen is {config.listen!r}, which the other nodes cannot dial; "
            "give --advertise HOST:PORT (the address clients and followers reach this node at)"
        )


def _check_address(name: str, address: str) -> None:
    """``host:port`` or ``[v6]:port`` with a port 1-65535 (an address to dial)."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValidationError(
            f"configuration: {name} is {address!r}; expected host:port (port 1-65535) or [v6]:port"
        )
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValidationError(
            f"configuration: {name} is {address!r}; write an IPv6 host in brackets: [::1]:50051"
        )


def _same_node(follow: str, own: str) -> bool:
    """Whether *follow* names *own* (the same host and port, or a local host and its port)."""
    if not own or own.startswith("unix:"):
        return False
    host, _, port = follow.rpartition(":")
    own_host, _, own_port = own.rpartition(":")
    if port != own_port:
        return False
    return host == own_host or (host in _LOCAL_HOSTS and own_host in _LOCAL_HOSTS)


def _check_listen(listen: str) -> None:
    """``host:port``, ``[v6]:port`` (port 0-65535), or ``unix:PATH``."""
    if listen.startswith("unix:"):
        if not listen.removeprefix("unix:").removeprefix("//"):
            raise ValidationError("configuration: listen is 'unix:' without a path")
        return
    host, colon, port = listen.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ValidationError(
            f"configuration: listen is {listen!r}; expected host:port (port 0-65535, "
            "0 picks a free one), [v6]:port or unix:/path"
        )
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValidationError(
            f"configuration: listen is {listen!r}; write an IPv6 host in brackets: [::1]:50051"
        )


#: Options whose values are secrets, printed masked. Every secret LetheDB
#: uses today is given as the path of a file (tls_key, tokens_file, keyring):
#: the path is printed, the file is never read for printing.
SECRET_OPTIONS: frozenset[str] = frozenset()
_TOKEN_LIKE = re.compile(r"lethedb_[A-Za-z0-9_-]{20,}")
MASK = "***"


def switches() -> frozenset[str]:
    """Options that are booleans (given as a bare flag: ``--insecure``)."""
    defaults = Config()
    return frozenset(n for n in field_names() if isinstance(getattr(defaults, n), bool))


def render(config: Config) -> str:
    """The effective configuration as TOML, secrets (and anything token-like) masked."""
    lines = []
    for name in field_names():
        value = getattr(config, name)
        if name in SECRET_OPTIONS or (isinstance(value, str) and _TOKEN_LIKE.search(value)):
            value = MASK
        text = str(value).lower() if isinstance(value, bool) else json.dumps(value)
        lines.append(f"{name} = {text}")
    return "\n".join(lines) + "\n"
