"""The append-only event store, on SQLAlchemy Core, the same code for PostgreSQL and SQLite.

Every append, in one transaction:
- takes the lock on the hash-chain head (``SELECT … FOR UPDATE``; SQLite serialises writers with
  ``BEGIN IMMEDIATE``), so appends are totally ordered and the audit chain has no forks;
- checks the stream's expected version (``If-Match``) — the unique (stream_id, stream_version)
  constraint is the last word should two writers race anyway;
- inserts the events and one outbox row each (the transactional outbox: the relay publishes them).

Nothing here updates or deletes an event.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Row, and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.events import NewEvent, StoredEvent
from shared.store.tables import chain_head, events, events_appended, outbox

GENESIS = "0" * 64


class StoreError(Exception):
    """Base of the store's own errors."""


class WrongExpectedVersion(StoreError):
    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id} is at version {actual}, not {expected}")
        self.stream_id, self.expected, self.actual = stream_id, expected, actual


class DuplicateEvent(StoreError):
    """An event id or (stream, version) already stored: somebody else appended it first."""


def utc(dt: datetime) -> datetime:
    """Times read back from SQLite are naive; everything is stored in UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def now_utc() -> datetime:
    return datetime.now(UTC)


def _canonical(row: dict[str, Any]) -> bytes:
    fields = {
        "event_id": row["event_id"],
        "stream_id": row["stream_id"],
        "stream_version": row["stream_version"],
        "type": row["type"],
        "schema_version": row["schema_version"],
        "subject_id": row["subject_id"],
        "occurred_at": utc(row["occurred_at"]).isoformat(),
        "occurred_offset_s": row["occurred_offset_s"],
        "recorded_at": utc(row["recorded_at"]).isoformat(),
        "recorded_by": row["recorded_by"],
        "data": row["data"],
        "correlation_id": row["correlation_id"],
        "causation_id": row["causation_id"],
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + _canonical(row)).hexdigest()


def to_stored(row: Row[Any] | dict[str, Any]) -> StoredEvent:
    m = row._mapping if isinstance(row, Row) else row
    return StoredEvent(
        position=m["position"],
        event_id=uuid.UUID(m["event_id"]),
        stream_id=m["stream_id"],
        stream_version=m["stream_version"],
        type=m["type"],
        schema_version=m["schema_version"],
        subject_id=m["subject_id"],
        occurred_at=utc(m["occurred_at"]).astimezone(timezone(timedelta(seconds=m["occurred_offset_s"]))),
        recorded_at=utc(m["recorded_at"]),
        recorded_by=m["recorded_by"],
        data=m["data"],
        correlation_id=uuid.UUID(m["correlation_id"]) if m["correlation_id"] else None,
        causation_id=uuid.UUID(m["causation_id"]) if m["causation_id"] else None,
    )


async def _lock_head(conn: AsyncConnection) -> tuple[int, str]:
    head = (await conn.execute(select(chain_head).where(chain_head.c.id == 1).with_for_update())).first()
    if head is None:
        try:
            async with conn.begin_nested():
                await conn.execute(insert(chain_head).values(id=1, position=0, hash=GENESIS))
        except IntegrityError:
            pass
        head = (await conn.execute(select(chain_head).where(chain_head.c.id == 1).with_for_update())).one()
    return head.position, head.hash


async def stream_version(conn: AsyncConnection, stream_id: str) -> int:
    current = await conn.scalar(
        select(func.max(events.c.stream_version)).where(events.c.stream_id == stream_id)
    )
    return int(current or 0)


async def append(
    conn: AsyncConnection,
    stream_id: str,
    new_events: Sequence[NewEvent],
    *,
    expected_version: int | None = None,
    recorded_at: datetime | None = None,
) -> list[StoredEvent]:
    """Append to a stream inside the caller's transaction.

    ``expected_version`` None appends after whatever is there; an int must equal the stream's
    current version (0: the stream must not exist yet) or ``WrongExpectedVersion`` is raised and
    nothing is written.
    """
    _, prev_hash = await _lock_head(conn)
    version = await stream_version(conn, stream_id)
    if expected_version is not None and expected_version != version:
        raise WrongExpectedVersion(stream_id, expected_version, version)
    when = recorded_at or now_utc()
    stored: list[StoredEvent] = []
    try:
        for offset, event in enumerate(new_events, start=1):
            row = {
                "event_id": str(event.event_id),
                "stream_id": stream_id,
                "stream_version": version + offset,
                "type": event.type,
                "schema_version": event.schema_version,
                "subject_id": event.subject_id,
                "occurred_at": event.occurred_at.astimezone(UTC),
                "occurred_offset_s": int(event.occurred_at.utcoffset().total_seconds()),  # type: ignore[union-attr]
                "recorded_at": when,
                "recorded_by": event.recorded_by,
                "data": event.data,
                "correlation_id": str(event.correlation_id) if event.correlation_id else None,
                "causation_id": str(event.causation_id) if event.causation_id else None,
            }
            row["prev_hash"] = prev_hash
            row["hash"] = prev_hash = chain_hash(prev_hash, row)
            async with conn.begin_nested():
                position = (await conn.execute(insert(events).values(**row).returning(events.c.position))).scalar_one()
                await conn.execute(
                    insert(outbox).values(position=position, event_id=row["event_id"], attempts=0, created_at=when)
                )
            stored.append(to_stored({**row, "position": position}))
    except IntegrityError as exc:
        raise DuplicateEvent(f"stream {stream_id}: {exc.orig}") from exc
    if stored:
        await conn.execute(
            update(chain_head).where(chain_head.c.id == 1).values(position=stored[-1].position, hash=prev_hash)
        )
    return stored


async def read_stream(
    conn: AsyncConnection, stream_id: str, *, as_of: datetime | None = None
) -> list[StoredEvent]:
    query = select(events).where(events.c.stream_id == stream_id)
    if as_of is not None:
        query = query.where(events.c.recorded_at <= as_of.astimezone(UTC))
    rows = await conn.execute(query.order_by(events.c.position))
    return [to_stored(r) for r in rows]


async def read_types(
    conn: AsyncConnection,
    types: Iterable[str],
    *,
    subject_id: str | None = None,
    as_of: datetime | None = None,
) -> list[StoredEvent]:
    conditions = [events.c.type.in_(list(types))]
    if subject_id is not None:
        conditions.append(events.c.subject_id == subject_id)
    if as_of is not None:
        conditions.append(events.c.recorded_at <= as_of.astimezone(UTC))
    rows = await conn.execute(select(events).where(and_(*conditions)).order_by(events.c.position))
    return [to_stored(r) for r in rows]


async def get_event(conn: AsyncConnection, event_id: uuid.UUID | str) -> StoredEvent | None:
    row = (await conn.execute(select(events).where(events.c.event_id == str(event_id)))).first()
    return to_stored(row) if row else None


async def read_all(conn: AsyncConnection, *, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
    rows = await conn.execute(
        select(events).where(events.c.position > after).order_by(events.c.position).limit(limit)
    )
    return [to_stored(r) for r in rows]


Anchor = tuple[int, str]  # (position, hash) of the audit chain, e.g. from a DSMB summary


async def anchor_at(conn: AsyncConnection, as_of: datetime) -> Anchor:
    """The chain's (position, hash) at the last event recorded by ``as_of``; (0, GENESIS) before any."""
    row = (await conn.execute(
        select(events.c.position, events.c.hash).where(events.c.recorded_at <= as_of.astimezone(UTC))
        .order_by(events.c.position.desc()).limit(1)
    )).first()
    return (row.position, row.hash) if row is not None else (0, GENESIS)


async def verify_chain(
    conn: AsyncConnection, *, batch: int = 1000, anchor: Anchor | None = None
) -> tuple[int, StoredEvent | None, str]:
    """Walk the chain from the start, then check that it ends where the chain head says and holds
    as many events as were ever appended.

    Returns (events checked, first bad event or None, why); ``why`` is empty when the chain is
    intact. Events deleted from the end leave every remaining link sound: the head (written with
    each append) tells, and so does ``events_appended`` (kept by a trigger, never rewound with the
    head). With ``anchor`` (a position and hash kept outside the database) the chain must also pass
    through it: a history rewritten *and* re-hashed up to the head passes every other check.
    """
    prev, checked, after = GENESIS, 0, 0
    if anchor == (0, GENESIS):
        anchor = None  # the empty chain's anchor: every chain passes through it
    while True:
        rows = (
            await conn.execute(select(events).where(events.c.position > after).order_by(events.c.position).limit(batch))
        ).all()
        if not rows:
            return checked, None, await _check_end(conn, checked, after, prev, anchor)
        for row in rows:
            m = dict(row._mapping)
            if anchor is not None and after < anchor[0] < m["position"]:
                return checked, None, (f"no event at the anchor's position {anchor[0]} (the chain goes from "
                                       f"{after} to {m['position']}): it was deleted")
            if m["prev_hash"] != prev:
                return checked, to_stored(m), "its prev_hash does not match the hash of the event before it"
            if chain_hash(prev, m) != m["hash"]:
                return checked, to_stored(m), "its content does not match its stored hash"
            if anchor is not None and m["position"] == anchor[0] and m["hash"] != anchor[1]:
                return checked, to_stored(m), (
                    f"the anchor says its hash is {anchor[1]}, the chain now says {m['hash']}: the history "
                    "up to it was rewritten and re-hashed since the anchor was taken")
            prev, after, checked = m["hash"], m["position"], checked + 1


async def _check_end(conn: AsyncConnection, checked: int, last: int, last_hash: str, anchor: Anchor | None) -> str:
    """Why the end of a sound chain is wrong, or '' (``verify_chain``)."""
    if anchor is not None and anchor[0] > last:
        return f"the chain ends at position {last}, before the anchor's position {anchor[0]}: events were deleted"
    head = (await conn.execute(select(chain_head).where(chain_head.c.id == 1))).first()
    if head is not None and (head.position, head.hash) != (last, last_hash):
        return (f"the chain head records its last event at position {head.position}, but the last "
                f"event stored is at position {last}: events were deleted from the end")
    appended = (await conn.execute(select(events_appended).where(events_appended.c.id == 1))).first()
    if appended is None:
        return "the count of appended events (table events_appended) is missing: it was deleted"
    if appended.count != checked or appended.last_position > last:
        return (f"{appended.count} events were appended (the last at position {appended.last_position}), but "
                f"{checked} are stored, the last at position {last}: events were deleted")
    return ""
