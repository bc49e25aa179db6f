"""LetheDB benchmarks: a pytest-benchmark micro suite and an end-to-end load tool.

Nothing here is imported by the server or the SDK, and nothing here is collected
by the normal test run. See benchmarks/README.md.
"""
