"""Whether an owner ended, as Postgres says, asked once per owner and Redis server.

Redis can go back in time (a failover to a replica that missed writes, a restart that lost
the AOF's last second) and forget that a workflow run or a conversation ended: its marker
then says ``open`` again, and an entry would resume a session of an ended owner. Postgres
keeps the end (``agent_session_owners``). Asking it on every entry would cost a Postgres
round trip per loop iteration; asking it once per owner is enough as long as this process
talks to the same Redis servers, since only a new server (``cache.client.SERVER_EPOCH``)
can have lost an end. So the first entry of each owner in each epoch asks Postgres, and the
answer "not ended" is remembered (bounded: the oldest answers are forgotten first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Final

from cache.client import SERVER_EPOCH
from cache.records import Owner

REMEMBERED: Final = 100_000
"""Owners whose "not ended" answer is kept (about 100 bytes each)."""


class OpenOwners:
    """The owners Postgres said were not ended, in the current server epoch."""

    def __init__(self, limit: int = REMEMBERED) -> None:
        self._open: OrderedDict[Owner, int] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def known_open(self, owner: Owner) -> bool:
        """Whether Postgres said ``owner`` had not ended, since the last new Redis server."""
        with self._lock:
            return self._open.get(owner) == SERVER_EPOCH.value

    def note_open(self, owner: Owner, epoch: int) -> None:
        """Postgres said ``owner`` had not ended, when the epoch was ``epoch``."""
        with self._lock:
            self._open[owner] = epoch
            self._open.move_to_end(owner)
            while len(self._open) > self._limit:
                self._open.popitem(last=False)

    def forget(self, owner: Owner) -> None:
        with self._lock:
            self._open.pop(owner, None)
