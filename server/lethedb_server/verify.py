"""Walking the log to prove it is intact: hash chain and authentication tags.

Every record's chain hash is recomputed from the genesis hash and compared
with the stored one, and every payload is decrypted so its AES-GCM tag is
checked. Events of forgotten subjects cannot be decrypted any more; they are
still covered by the chain (which hashes ciphertext) and are counted apart.
The walk reads one page per read transaction, so it never pins old pages and
can run beside a live writer.
"""

from __future__ import annotations

from dataclasses import dataclass

from lethedb_server import codec
from lethedb_server.errors import DataLoss
from lethedb_server.reader import DEFAULT_PAGE, EventReader
from lethedb_server.storage import LogStore


@dataclass
class Verifier:
    """An incremental walk: call :meth:`step` until it returns False."""

    log: LogStore
    reader: EventReader
    checked: int = 0
    redacted: int = 0
    last_position: int = 0
    first_bad_position: int = 0
    problem: str = ""
    _chain: bytes = codec.GENESIS_HASH
    _head: int = 0

    def __post_init__(self) -> None:
        self._head = self.log.head

    @property
    def head(self) -> int:
        """The last position the walk will check (the head when it started)."""
        return self._head

    @property
    def ok(self) -> bool:
        return not self.problem

    def step(self, limit: int = DEFAULT_PAGE) -> bool:
        """Check the next page; return whether there is more to check."""
        if self.problem or self.last_position >= self._head:
            return False
        page = self.log.read_all_page(self.last_position + 1, backwards=False, limit=limit)
        for position, value in page:
            if position > self._head:
                return False
            if not self._check(position, value):
                return False
        if not page and self.last_position < self._head:
            self._fail(self.last_position + 1, "the log ends before its recorded head position")
            return False
        return self.last_position < self._head

    def _check(self, position: int, value: bytes) -> bool:
        if position != self.last_position + 1:
            return self._fail(self.last_position + 1, "a position is missing from the log")
        body, stored = codec.split_record(value)
        expected = codec.chain_hash(self._chain, body)
        if expected != stored:
            return self._fail(position, "the chain hash does not match the record")
        try:
            event = self.reader.open(position, value)
        except DataLoss as exc:
            return self._fail(position, str(exc))
        self._chain = stored
        self.redacted += event.redacted
        self.checked += 1
        self.last_position = position
        return True

    def _fail(self, position: int, problem: str) -> bool:
        self.first_bad_position = position
        self.problem = problem
        return False

    def finish(self) -> None:
        """After the last step: the walk must end on the head's recorded chain hash."""
        meta = self.log.meta
        moved_on = meta.last_position != self._head  # appends since the walk began
        if self.ok and not moved_on and self._chain != meta.chain_head:
            self._fail(self._head, "the chain head recorded in the log meta does not match")
