"""The event store itself: the ``Store`` façade, writer, reader, subscriptions, erasure,
custody, verification and audit, with the domain model. Knows nothing of gRPC."""
