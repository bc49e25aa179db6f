"""What the configuration needs to know of etcd, without loading gRPC.

The CLI reads and checks its configuration before it sets gRPC's logging up,
and gRPC reads that setting once, when it is first imported: so the config
module must not import the etcd client (:mod:`.etcd`, which imports grpc).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

#: The leader lease's time to live, in seconds, unless configured.
DEFAULT_TTL_S: Final = 5


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """``http://h1:2379,h2:2379`` or a list of them -> ["h1:2379", "h2:2379"].

    An ``https://`` endpoint needs :class:`~lethedb_server.coord.etcd.EtcdTls`;
    the scheme itself only documents it (TLS is on for every member or for none).
    """
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    addresses = []
    for item in (raw.strip() for raw in items):
        if not item:
            continue
        address = item.split("://", 1)[1] if "://" in item else item
        host, sep, port = address.rstrip("/").rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {item!r} is not [http[s]://]host:port")
        addresses.append(f"{host}:{port}")
    if not addresses:
        raise ValueError("no etcd endpoint given")
    return addresses
