"""Which errors are the store's (or concurrency's) and which are a record's.

A consumer retries a whole batch after an outage and takes a batch apart, message by message or
patient by patient, after any other error: that one is somebody's data.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from shared.store.eventstore import StoreError

# PostgreSQL error classes that are the server's state, not the data: connection (08), a
# transaction rolled back by a deadlock or a serialisation failure (40), resources (53), operator
# intervention (57), system (58); and a lock not available (55P03).
OUTAGE_CLASSES = ("08", "40", "53", "57", "58")


def is_outage(exc: BaseException) -> bool:
    """An error of the store or of concurrency, not of the patient's record: retry the batch.

    A lost or refused connection, a busy SQLite file, a timeout, a deadlock the server broke, and
    another worker that appended the same alert first (the retry then finds it) are nobody's
    data; everything else raised while evaluating one patient is that patient's, and sets it aside.
    """
    if isinstance(exc, OperationalError | InterfaceError | TimeoutError | ConnectionError | StoreError):
        return True
    if isinstance(exc, DBAPIError):
        state = str(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None) or "")
        return bool(exc.connection_invalidated) or state[:2] in OUTAGE_CLASSES or state == "55P03"
    return False
