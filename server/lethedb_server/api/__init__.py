"""The gRPC surface: services, request validation and conversion, status mapping, auth, TLS
and per-client limits. The only layer besides ``ops`` that imports grpc or ``lethedb.v1``."""
