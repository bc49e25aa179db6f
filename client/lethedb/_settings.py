"""A client's checked configuration: target, credentials, channel options, deadline, retries.

Both clients build one :class:`ClientSettings` from their arguments before
opening anything, so a bad argument raises ValidationError and leaves nothing
to close; the transport then opens the channel from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from lethedb._checks import check_positive, type_name
from lethedb._cluster import Prefer, check_prefer
from lethedb._connection import Connection, PemSource, check_token_in_clear
from lethedb._connection import resolve as resolve_connection
from lethedb._exceptions import ValidationError
from lethedb._retry import (
    DEFAULT_INITIAL_BACKOFF,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_MAX_RETRIES,
    RetryPolicy,
)


class ClientSettings:
    """Configuration and argument checks common to :class:`Client` and :class:`AsyncClient`."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float,
        retry: RetryPolicy | None,
        max_retries: int,
        initial_backoff: float,
        max_backoff: float,
        channel_options: Sequence[tuple[str, Any]] | None,
        channel_credentials: grpc.ChannelCredentials | None,
        tls: bool | None,
        ca: PemSource | None,
        client_cert: PemSource | None,
        client_key: PemSource | None,
        token: str | None,
        coalesce_appends: bool,
        prefer: Prefer | None = None,
    ) -> None:
        # Connection strings, TLS files and tokens: see lethedb._connection.
        connection = resolve_connection(
            target,
            tls=tls,
            ca=ca,
            client_cert=client_cert,
            client_key=client_key,
            token=token,
            channel_credentials=channel_credentials,
        )
        check_positive("timeout", timeout)
        self.target = connection.target
        #: Every host of the connection string (a cluster when there are several).
        self.hosts = connection.hosts
        self.prefer = _prefer(prefer, connection.prefer)
        self._connection = connection
        self._explicit_credentials = channel_credentials
        self.timeout = float(timeout)
        self.retry = _retry_policy(retry, max_retries, initial_backoff, max_backoff)
        self.channel_options = tuple(channel_options or ()) + connection.options()
        self.channel_credentials = connection.credentials(channel_credentials)
        if not isinstance(coalesce_appends, bool):
            raise ValidationError(
                f"coalesce_appends is {coalesce_appends!r}; expected True or False"
            )
        self.coalesce_appends = coalesce_appends

    def credentials_for(self, address: str) -> grpc.ChannelCredentials | None:
        """The channel credentials for one node: the same TLS settings and token as the first.

        A token is never sent in clear to a node that is not on loopback, even
        one a server named as its leader.
        """
        if address == self.target:
            return self.channel_credentials
        connection: Connection = self._connection.for_host(address)
        in_clear = not connection.tls and self._explicit_credentials is None
        if connection.token is not None and in_clear:
            check_token_in_clear(address)
        return connection.credentials(self._explicit_credentials)

    def deadline(self, timeout: float | None) -> float:
        """The per-attempt deadline: a retry gets a fresh one, as a new attempt needs it."""
        if timeout is None:
            return self.timeout
        check_positive("timeout", timeout)
        return float(timeout)


def _prefer(argument: Prefer | None, from_string: str | None) -> Prefer:
    """The client's read preference: argument or connection string (not both, differently)."""
    if argument is not None and from_string is not None and argument != from_string:
        raise ValidationError(
            "prefer is given both in the connection string and as an argument, differently"
        )
    chosen = argument if argument is not None else from_string
    return "leader" if chosen is None else check_prefer(chosen)


def _retry_policy(
    retry: RetryPolicy | None, max_retries: int, initial_backoff: float, max_backoff: float
) -> RetryPolicy:
    """``retry=`` as given, or the policy the separate keywords describe (never both)."""
    if retry is None:
        return RetryPolicy(
            max_retries=max_retries, initial_backoff=initial_backoff, max_backoff=max_backoff
        )
    if not isinstance(retry, RetryPolicy):
        raise ValidationError(f"retry is {type_name(retry)}; expected lethedb.RetryPolicy or None")
    given = (max_retries, initial_backoff, max_backoff)
    if given != (DEFAULT_MAX_RETRIES, DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_BACKOFF):
        raise ValidationError(
            "retry and max_retries/initial_backoff/max_backoff are both given; "
            "put those values in the RetryPolicy"
        )
    return retry
