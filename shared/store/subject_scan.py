"""The whole log, one subject at a time (``trialwatch replay``).

The events of the given types are read once, in (subject, position) order, so a caller can
evaluate each patient as soon as its last event is read instead of holding the whole log first.
Rows come as the driver gives them and are decoded per subject by ``decode`` (the caller does
that behind its own bulkhead: a row that does not decode is one subject's problem).

- PostgreSQL: one server-side cursor on a connection of its own, read through the driver
  (asyncpg) without SQLAlchemy's per-row processing; the next page is asked for before the
  caller gets this one, so the server reads and sends it while the caller works.
- SQLite: every row is read first, then handed out (a SQLite transaction here takes the write
  lock, so the reader must be done before the caller writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.events import StoredEvent
from shared.store.eventstore import utc, zone
from shared.store.tables import events

# The columns of a StoredEvent, in this order (``decode`` reads them by index).
COLUMNS = ("position", "event_id", "stream_id", "stream_version", "type", "schema_version", "subject_id",
           "occurred_at", "occurred_offset_s", "recorded_at", "recorded_by", "data", "correlation_id",
           "causation_id")
PAGE = 5000

Rows = list[Sequence[Any]]


async def by_subject(engine: AsyncEngine, types: Iterable[str], *, page: int = PAGE,
                     subjects: tuple[str | None, str | None] = (None, None),
                     ) -> AsyncGenerator[tuple[str, Rows], None]:
    """``(subject_id, rows)`` for every subject with events of ``types``, rows in position order;
    ``subjects``: only those from the first id (included) to the second (excluded), None: no bound."""
    subject: str | None = None
    rows: Rows = []
    async for batch in _pages(engine, _query(sorted(types), subjects), page):
        for row in batch:
            if row[6] != subject:
                if subject is not None:
                    yield subject, rows
                subject, rows = row[6], []
            rows.append(row)
    if subject is not None:
        yield subject, rows


def _query(types: list[str], subjects: tuple[str | None, str | None]) -> Any:
    query = select(*(events.c[c] for c in COLUMNS)).where(events.c.type.in_(types), events.c.subject_id.is_not(None))
    low, high = subjects
    if low is not None:
        query = query.where(events.c.subject_id >= low)
    if high is not None:
        query = query.where(events.c.subject_id < high)
    return query.order_by(events.c.subject_id, events.c.position)


async def _pages(engine: AsyncEngine, query: Any, page: int) -> AsyncIterator[Rows]:
    if engine.dialect.name != "postgresql":
        async with engine.connect() as conn:
            rows: Rows = list((await conn.execute(query)).all())
        for begin in range(0, len(rows), page):
            yield rows[begin:begin + page]
        return
    sql = str(query.compile(engine.sync_engine, compile_kwargs={"literal_binds": True}))
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        async with driver.transaction(readonly=True):
            cursor = await driver.cursor(sql)
            ahead = asyncio.ensure_future(cursor.fetch(page))
            try:
                while batch := await ahead:
                    ahead = asyncio.ensure_future(cursor.fetch(page))
                    yield batch
            finally:
                if not ahead.done():
                    ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead


def decode(row: Sequence[Any]) -> StoredEvent:
    """A row of ``COLUMNS`` as the store answers it (``eventstore.to_stored``), checked by the model."""
    return StoredEvent(
        position=row[0], event_id=row[1], stream_id=row[2], stream_version=row[3], type=row[4],
        schema_version=row[5], subject_id=row[6],
        occurred_at=utc(row[7]).astimezone(zone(row[8])), recorded_at=utc(row[9]),
        recorded_by=row[10], data=row[11],
        correlation_id=uuid.UUID(row[12]) if row[12] else None,
        causation_id=uuid.UUID(row[13]) if row[13] else None,
    )
