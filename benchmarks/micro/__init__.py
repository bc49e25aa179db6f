"""Micro benchmarks of the server's hot paths, run with ``make bench-micro``."""
