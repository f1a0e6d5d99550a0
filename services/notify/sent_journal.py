"""What the sender knows went to the SMTP server, written down the moment it knows it.

The delivery row's "sent" commits in the store, and the store can make it wait (on SQLite the
write lock is the ingest's as often as not). A notifier killed before that commit leaves the row
"sending", and once its lease runs out the mail would go out again. So the sender writes here,
first, and the notifier that takes such a row over looks here before sending:

- ``<message-id> handed <lease>``: the whole message, its closing ``.`` included, was in the
  kernel's socket buffer on the attempt whose lease ends at ``<lease>``. Written in the same step
  of the event loop as that write, before the server can have answered. A SIGKILL from then on
  cannot take the bytes back (the kernel sends what a dead process wrote, then closes), so the
  server gets the whole message, takes it and answers "250" to nobody.
- ``<message-id>``: the server answered the DATA with "250". The only line where ``handed`` is
  not written (over TLS, or when the message did not fit the socket buffer at once).
- ``<message-id> failed <lease>``: that attempt ended in an error, a refusal or no answer; the
  row goes back to pending and the mail is sent again, so a ``handed`` line of the same attempt
  no longer counts.

Each line is in the kernel's page cache once its ``write`` returns, which is all a killed process
needs; ``sync`` flushes them to disk (a power cut) and is called from a thread, off the event loop:
an fsync of a few milliseconds in the loop held up every other lane's mail, and widened its gap.

What stays open: a kill in the microseconds between the socket write and the ``handed`` line
(the mail goes out again); a server that refuses the message after its end, or a network lost in
the same instant, with the sender killed before it writes ``failed`` (the mail is counted as sent
and is not); and replicas on different machines (each has its own file; the store's row still
keeps them from sending the same row at once).
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path

from shared.store.eventstore import utc

log = logging.getLogger(__name__)


def _lease(lease: datetime) -> str:
    return f"{utc(lease):%Y-%m-%dT%H:%M:%S.%fZ}"


class SentJournal:
    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: no journal (a caller without a data directory)
        self._fd: int | None = None

    def accepted(self, message_id: str) -> None:
        self._record(message_id)

    def handed(self, message_id: str, lease: datetime) -> None:
        self._record(f"{message_id} handed {_lease(lease)}")

    def failed(self, message_id: str, lease: datetime) -> None:
        self._record(f"{message_id} failed {_lease(lease)}")

    def _record(self, line: str) -> None:
        """Append one line with one ``write`` (O_APPEND: whole, even beside another writer).

        A journal that cannot be written (a full disk) is logged, never raised: raised from inside
        the mailer, it made a mail the server had taken look failed, and sent it again each retry.
        """
        if self.path is None:
            return
        try:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._fd, (line + "\n").encode("ascii", errors="replace"))
        except OSError as exc:
            log.error("the sent journal %s could not be written (%s): a notifier killed now may send %r twice",
                      self.path, exc, line.split(" ")[0])

    def sync(self) -> None:
        """Flush the lines written so far to disk (blocking: call it from a thread)."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                log.error("the sent journal %s could not be flushed to disk: %s", self.path, exc)

    def sent_before(self, message_id: str, lease: datetime) -> bool:
        """Did the attempt whose lease ends at ``lease`` (or any attempt the server answered) get
        the mail to the server?"""
        if self.path is None or not self.path.exists():
            return False
        handed, failed = f"{message_id} handed {_lease(lease)}", f"{message_id} failed {_lease(lease)}"
        seen: set[str] = set()
        with self.path.open(encoding="ascii", errors="replace") as journal:
            for line in journal:
                line = line.rstrip("\n")
                if line == message_id:
                    return True
                if line in (handed, failed):
                    seen.add(line)
        return handed in seen and failed not in seen
