"""``python -m lethedb_server``: the ``lethedb`` command, as the console script runs it."""

import sys

from lethedb_server._entry import main

if __name__ == "__main__":
    sys.exit(main())
