"""Generated protobuf and gRPC modules for the lethedb.v1 API (see proto/)."""
