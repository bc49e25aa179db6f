"""The peer benchmark: LetheDB against Redis Streams, PostgreSQL and NATS JetStream.

``python -m benchmarks.peers`` (``make bench-peers``) starts every system on
loopback in a temporary directory, runs the same workloads against each
through its standard Python client, and writes a Markdown report with PNG
charts to ``benchmarks/results/peers-<date>.md``. See benchmarks/README.md.

Modules: :mod:`.servers` starts and stops the systems, :mod:`.clients` holds
one adapter per system (append, subscribe, catch-up, bulk fill),
:mod:`.worker` runs the workloads in spawned load processes, :mod:`.run`
orchestrates a whole run and :mod:`.report` writes the report.
"""
