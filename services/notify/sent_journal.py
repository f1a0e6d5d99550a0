"""The Message-IDs the SMTP server accepted, written down the moment it did.

The delivery row's "sent" commits in the store, and the store can make it wait (on SQLite the
write lock is the ingest's as often as not). A notifier killed between the server's "250 OK" and
that commit leaves the row "sending", and once its lease runs out the mail goes out again: the one
gap no SMTP client closes, and the fault matrix hit it about once in three runs on SQLite.

So the sender appends the Message-ID to a file of its data directory, flushed to disk, as soon as
the server has the mail — microseconds, not a lock wait — and before sending a mail whose earlier
claim ran out it looks the Message-ID up here. What stays open: the instant between the server's
answer and the line reaching the disk, and notifier replicas on different machines (each has its
own file; the store's row still keeps them from sending the same row at once).
"""

from __future__ import annotations

import os
from pathlib import Path


class SentJournal:
    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: no journal (a caller without a data directory)

    def record(self, message_id: str) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="ascii", errors="replace") as journal:
            journal.write(message_id + "\n")
            journal.flush()
            os.fsync(journal.fileno())

    def has(self, message_id: str) -> bool:
        if self.path is None or not self.path.exists():
            return False
        with self.path.open(encoding="ascii", errors="replace") as journal:
            return any(line.rstrip("\n") == message_id for line in journal)
