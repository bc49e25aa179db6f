"""Where and how a client connects: connection strings, TLS material, bearer tokens.

Both clients accept a plain ``host:port`` or a connection string::

    lethedb://db.example.com:50051?tls=true&ca=/etc/lethedb/ca.pem
    lethedb://127.0.0.1?token=lethedb_...                  (port 50051)
    lethedb://db:50051?ca=ca.pem&cert=client.pem&key=client.key   (mTLS)
    lethedb://db1:50051,db2:50051,db3:50051?tls=true&prefer=follower  (a cluster)

Several hosts, separated by commas, are the nodes of one cluster: the client
sends writes to the leader (it follows a follower's NotLeader to it) and
moves to the next host when one is unavailable (see :mod:`lethedb._cluster`).
Every host gets the same TLS settings and token.

Query parameters: ``tls`` (true/false), ``ca`` (PEM bundle to trust instead
of the system roots), ``cert`` and ``key`` (client certificate and key, for
mTLS), ``token`` (bearer token), ``server_name`` (the name to verify in the
server's certificate, when it differs from the host), ``prefer`` (where reads
go: leader, follower or any; default leader). The same settings can
be given as keyword arguments (``tls=``, ``ca=``, ``client_cert=``,
``client_key=``, ``token=``); giving one both ways with different values is
an error rather than a silent choice. File settings take a path or the PEM
bytes themselves. ``ca``, ``cert`` or ``key`` imply TLS.

A token is sent as ``authorization: Bearer <token>`` on every call. It is only
ever sent over TLS or to a loopback address (gRPC local credentials): sending
it in clear across a network would hand it to anyone on the path, so that is
refused here, before anything is sent. A token in a connection string ends up
wherever the string is logged; prefer the ``token=`` argument (from an
environment variable or a secret store). No client ``repr`` shows a token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Final, TypeVar
from urllib.parse import parse_qsl, urlsplit

import grpc

from lethedb._exceptions import ValidationError
from lethedb_contract import is_loopback_address

SCHEME: Final = "lethedb"
DEFAULT_PORT: Final = 50051
_PARAMETERS: Final = ("tls", "ca", "cert", "key", "token", "server_name", "prefer")
_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})

_T = TypeVar("_T")

#: A PEM file: its path, or its contents.
PemSource = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class Connection:
    """A resolved connection: the gRPC target(s) and what to secure them with.

    ``target`` is the first host; ``hosts`` all of them, in the order given.
    """

    target: str
    hosts: tuple[str, ...] = ()
    tls: bool = False
    ca: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    token: str | None = None
    server_name: str | None = None
    prefer: str | None = None

    def __post_init__(self) -> None:
        if not self.hosts:
            object.__setattr__(self, "hosts", (self.target,))

    def for_host(self, address: str) -> Connection:
        """The same settings for another node of the cluster (a leader a server named)."""
        return replace(self, target=address, hosts=(address,))

    def __repr__(self) -> str:  # never show the token
        token = "***" if self.token else None
        return f"Connection(target={self.target!r}, tls={self.tls}, token={token})"

    def credentials(
        self, channel_credentials: grpc.ChannelCredentials | None = None
    ) -> grpc.ChannelCredentials | None:
        """The channel credentials, or None for a plaintext channel."""
        base = channel_credentials
        if base is None and self.tls:
            base = grpc.ssl_channel_credentials(
                root_certificates=self.ca,
                private_key=self.client_key,
                certificate_chain=self.client_cert,
            )
        if self.token is None:
            return base
        if base is None:
            # No TLS: gRPC attaches call credentials only to a channel it
            # considers secure; local credentials are that for loopback.
            kind = (
                grpc.LocalConnectionType.UDS
                if self.target.startswith("unix")
                else grpc.LocalConnectionType.LOCAL_TCP
            )
            base = grpc.local_channel_credentials(kind)
        return grpc.composite_channel_credentials(
            base, grpc.access_token_call_credentials(self.token)
        )

    def options(self) -> tuple[tuple[str, str], ...]:
        if self.server_name:
            return (("grpc.ssl_target_name_override", self.server_name),)
        return ()


def resolve(
    target: str,
    *,
    tls: bool | None = None,
    ca: PemSource | None = None,
    client_cert: PemSource | None = None,
    client_key: PemSource | None = None,
    token: str | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
) -> Connection:
    """Merge the connection string and the keyword arguments; check them; read the files."""
    if not isinstance(target, str) or not target:
        raise ValidationError(
            f"target is {target!r}; it must be a host:port or lethedb://host:port string"
        )
    if tls is not None and not isinstance(tls, bool):
        raise ValidationError(f"tls is {tls!r}; expected True, False or None")
    hosts, params = _split(target)
    string_tls = _bool_param(params.get("tls"))
    if tls is not None and string_tls is not None and tls != string_tls:
        raise ValidationError("tls is given both in the connection string and as an argument")
    tls = string_tls if tls is None else tls
    ca_source = _merge("ca", ca, params.get("ca"))
    cert_source = _merge("client_cert (cert)", client_cert, params.get("cert"))
    key_source = _merge("client_key (key)", client_key, params.get("key"))
    token = _check_token(_merge("token", token, params.get("token")))
    server_name = params.get("server_name")

    files_given = any(s is not None for s in (ca_source, cert_source, key_source))
    if tls is False and files_given:
        raise ValidationError("tls is false but ca, client_cert or client_key is given")
    if (cert_source is None) != (key_source is None):
        raise ValidationError("client_cert and client_key must be given together (mTLS)")
    use_tls = bool(tls) or files_given
    if channel_credentials is not None and (use_tls or server_name):
        raise ValidationError(
            "give either channel_credentials or tls/ca/client_cert/client_key/server_name, not both"
        )
    in_clear = not use_tls and channel_credentials is None
    if token is not None and in_clear:
        for address in hosts:
            check_token_in_clear(address)
    return Connection(
        target=hosts[0],
        hosts=hosts,
        prefer=params.get("prefer"),
        tls=use_tls,
        ca=_pem("ca", ca_source),
        client_cert=_pem("client_cert", cert_source),
        client_key=_pem("client_key", key_source),
        token=token,
        server_name=server_name,
    )


def check_token_in_clear(address: str) -> None:
    """Refuse to send a token without TLS to anything but a loopback address."""
    if not is_loopback_address(address):
        raise ValidationError(
            f"refusing to send a token in clear to {address}: use tls=True (or "
            "lethedb://...?tls=true), or connect to a loopback address"
        )


def _split(target: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """(each host:port, query parameters) of a connection string.

    Anything else (``host:port``, or a gRPC target such as ``unix:///path`` or
    ``dns:///host:port``) passes through unchanged, as the only host.
    """
    if not target.startswith(SCHEME + "://"):
        return (target,), {}
    netloc, _, rest = target[len(SCHEME + "://") :].partition("?")
    netloc, slash, path = netloc.partition("/")
    if (slash and path) or "#" in rest or "#" in netloc or "@" in netloc:
        raise ValidationError(
            "a connection string is lethedb://host[:port][,host[:port]...][?param=value&...]; "
            "it has no path, user, password or fragment"
        )
    hosts = tuple(_host(part) for part in netloc.split(","))
    if len(set(hosts)) != len(hosts):
        raise ValidationError(f"connection string names a host twice: {netloc}")
    parts = urlsplit(f"{SCHEME}://{hosts[0]}?{rest}")
    params: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name not in _PARAMETERS:
            raise ValidationError(
                f"connection string parameter {name!r} is unknown; "
                f"expected one of {', '.join(_PARAMETERS)}"
            )
        if name in params:
            raise ValidationError(f"connection string parameter {name!r} is given twice")
        params[name] = value
    return hosts, params


def _host(part: str) -> str:
    """One ``host[:port]`` of a connection string, as a gRPC target (port 50051 if absent)."""
    if not part:
        raise ValidationError("connection string has no host (lethedb://host:port)")
    parts = urlsplit(f"{SCHEME}://{part}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ValidationError(f"connection string port: {exc}") from None
    host = parts.hostname
    if not host:
        raise ValidationError("connection string has no host (lethedb://host:port)")
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{host}:{port}"


def _bool_param(value: str | None) -> bool | None:
    if value is None:
        return None
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValidationError(f"connection string parameter tls is {value!r}; expected true or false")


def _merge(name: str, argument: _T | None, from_string: _T | str | None) -> _T | str | None:
    if argument is not None and from_string is not None and argument != from_string:
        raise ValidationError(
            f"{name} is given both in the connection string and as an argument, differently"
        )
    return argument if argument is not None else from_string


def _pem(name: str, source: object) -> bytes | None:
    if source is None:
        return None
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str | os.PathLike):
        try:
            with open(source, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise ValidationError(f"{name}: cannot read {os.fspath(source)}: {exc}") from None
    else:
        raise ValidationError(f"{name} is a {type(source).__name__}; expected a path or PEM bytes")
    if b"-----BEGIN" not in data:
        raise ValidationError(f"{name} does not hold PEM data (no -----BEGIN line)")
    return data


def _check_token(token: object) -> str | None:
    if token is None:
        return None
    if not isinstance(token, str) or not token:
        raise ValidationError("token must be a non-empty str")
    if any(c.isspace() or not c.isprintable() for c in token):
        # Never echo the token, even in an error.
        raise ValidationError("token contains white space or control characters")
    return token
