"""The infrastructure factory: a LetheDB client configured from the environment."""

from __future__ import annotations

from eventsourcing.domain import TAggregateID
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    InfrastructureFactory,
    Mapper,
    ProcessRecorder,
    Transcoder,
)
from eventsourcing.utils import Environment, EnvType, resolve_topic, strtobool

from lethedb import Client
from lethedb.eventsourcing._erasure import SubjectMapper
from lethedb.eventsourcing._recorders import (
    LetheDBAggregateRecorder,
    LetheDBApplicationRecorder,
    LetheDBProcessRecorder,
    LetheDBTrackingRecorder,
)

__all__ = ["LetheDBFactory"]


class LetheDBFactory(InfrastructureFactory[LetheDBTrackingRecorder]):
    """Builds LetheDB recorders for an application, from environment variables.

    Like every setting of the library, each can be given per application by
    prefixing it with the application's name in upper case
    (``BANKACCOUNTS_LETHEDB_URI``).
    """

    LETHEDB_URI = "LETHEDB_URI"
    """``host:port`` or a connection string ``lethedb://host:port?tls=true&ca=...``."""
    LETHEDB_TOKEN = "LETHEDB_TOKEN"
    """Bearer token (sent only over TLS or to loopback)."""
    LETHEDB_TLS = "LETHEDB_TLS"
    """``y``/``n``: force TLS on or off (default: as the URI says)."""
    LETHEDB_CA = "LETHEDB_CA"
    """Path of the CA certificate (PEM) that signed the server's certificate."""
    LETHEDB_CLIENT_CERT = "LETHEDB_CLIENT_CERT"
    """Path of the client certificate (PEM), for mutual TLS."""
    LETHEDB_CLIENT_KEY = "LETHEDB_CLIENT_KEY"
    """Path of the client certificate's private key (PEM)."""
    LETHEDB_TIMEOUT = "LETHEDB_TIMEOUT"
    """Seconds each call may take before it is retried (default 10)."""
    LETHEDB_NAMESPACE = "LETHEDB_NAMESPACE"
    """First segment of every stream id (default: the application name in lower case)."""

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        self.client = self._connect()

    def _connect(self) -> Client:
        tls = self.env.get(self.LETHEDB_TLS)
        timeout = self.env.get(self.LETHEDB_TIMEOUT)
        return Client(
            self.env.get(self.LETHEDB_URI, "localhost:50051"),
            token=self.env.get(self.LETHEDB_TOKEN) or None,
            tls=None if not tls else strtobool(tls),
            ca=self.env.get(self.LETHEDB_CA) or None,
            client_cert=self.env.get(self.LETHEDB_CLIENT_CERT) or None,
            client_key=self.env.get(self.LETHEDB_CLIENT_KEY) or None,
            timeout=float(timeout) if timeout else 10.0,
        )

    @property
    def namespace(self) -> str:
        """Where this application's streams live: ``<namespace>/...``."""
        return self.env.get(self.LETHEDB_NAMESPACE) or self.env.name.lower() or "eventsourcing"

    def mapper(
        self,
        transcoder: Transcoder | None = None,
        mapper_class: type[Mapper[TAggregateID]] | None = None,
    ) -> Mapper[TAggregateID]:
        """The library's mapper, by default :class:`SubjectMapper` so that each event
        is encrypted under its data subject's key (``MAPPER_TOPIC`` overrides it)."""
        if mapper_class is None and not self.env.get(self.MAPPER_TOPIC):
            mapper_class = SubjectMapper[TAggregateID]
        return super().mapper(transcoder=transcoder, mapper_class=mapper_class)

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        return LetheDBAggregateRecorder(self.client, self.namespace, purpose)

    def application_recorder(self) -> ApplicationRecorder:
        topic = self.env.get(self.APPLICATION_RECORDER_TOPIC)
        cls: type[LetheDBApplicationRecorder] = (
            resolve_topic(topic) if topic else LetheDBApplicationRecorder
        )
        return cls(self.client, self.namespace)

    def tracking_recorder(
        self, tracking_recorder_class: type[LetheDBTrackingRecorder] | None = None
    ) -> LetheDBTrackingRecorder:
        if tracking_recorder_class is None:
            topic = self.env.get(self.TRACKING_RECORDER_TOPIC)
            tracking_recorder_class = resolve_topic(topic) if topic else LetheDBTrackingRecorder
        assert tracking_recorder_class is not None
        if not issubclass(tracking_recorder_class, LetheDBTrackingRecorder):
            raise TypeError(
                f"{tracking_recorder_class.__name__} is not a LetheDBTrackingRecorder: "
                "a view kept by this factory must subclass it"
            )
        return tracking_recorder_class(self.client, self.namespace)

    def process_recorder(self) -> ProcessRecorder:
        topic = self.env.get(self.PROCESS_RECORDER_TOPIC)
        cls: type[LetheDBProcessRecorder] = (
            resolve_topic(topic) if topic else LetheDBProcessRecorder
        )
        return cls(self.client, self.namespace)

    def close(self) -> None:
        """Close the client's channel; calls in flight are cancelled."""
        self.client.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(namespace={self.namespace!r})"
