"""The LetheDB server: storage, keys, writer, gRPC services and CLI."""
