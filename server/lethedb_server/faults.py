"""Fault-injection points for crash tests.

A fault point does nothing unless the environment variable
``LETHEDB_FAULT_POINT`` names it when the process starts; then reaching it
kills the process on the spot (``os._exit``, no cleanup, like SIGKILL). Tests
set the variable on a server process to prove that every step of forget and
of a shred epoch is crash-safe. Production never sets it.
"""

from __future__ import annotations

import os
import sys
from typing import Final

ENV_VAR: Final = "LETHEDB_FAULT_POINT"
#: Exit status of a process killed by a fault point (128 + SIGKILL).
EXIT_CODE: Final = 137

_ARMED: Final = os.environ.get(ENV_VAR, "")


def fault_point(name: str) -> None:
    """Die here if this point is armed."""
    if _ARMED and name == _ARMED:
        sys.stderr.write(f"fault point {name} reached: exiting\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
