"""``python -m benchmarks.peers``: see :mod:`benchmarks.peers.run` and benchmarks/README.md."""

from benchmarks.peers.run import main

raise SystemExit(main())
