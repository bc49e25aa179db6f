"""Running the server: the ``lethedb`` CLI, configuration, server wiring, metrics, logs and
progress output. The top layer: it may import every other one."""
