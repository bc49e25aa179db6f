"""The LetheDB server, in layers that import only downwards.

``ops`` (CLI, configuration, server wiring, metrics) uses ``api`` (the gRPC
services), which uses ``engine`` (the store and its parts), which uses
``storage`` (LMDB tables and the record codec), which uses ``crypto`` (AEAD
and the keyring). The modules at this root (``errors``, ``files``,
``faults``) are shared by every layer and import none of them; ``_entry``
and ``__main__`` start the CLI. Only ``api`` and ``ops`` may import grpc,
the SDK or the generated protobuf modules. ``tests/unit/server/test_layering.py``
enforces both rules.
"""
