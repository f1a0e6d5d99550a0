"""The append-only event store, on SQLAlchemy Core, the same code for PostgreSQL and SQLite.

Every append, in one transaction (``Batch``: many appends may share one):
- takes the lock on the hash-chain head (``SELECT … FOR UPDATE``; SQLite serialises writers with
  ``BEGIN IMMEDIATE``), once per transaction, so appends are totally ordered, positions follow
  each other and the audit chain has no forks;
- checks the stream's expected version (``If-Match``) — the unique (stream_id, stream_version)
  constraint is the last word should two writers race anyway;
- inserts the events and one outbox row each (the transactional outbox: the relay publishes them),
  all of a batch's in one statement each, and moves the chain head once.

A batch may also be decided before the lock and stored once it is taken, after a check that the
streams it read are still at those versions (``Batch.deferred_on``): on PostgreSQL by one server
call (migration 0008), on SQLite in a write transaction of its own.

Nothing here updates or deletes an event.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.events import NewEvent, StoredEvent
from shared.store.tables import chain_head, events, events_appended, outbox, patient_heads
from shared.store.upsert import upsert_many

GENESIS = "0" * 64


class StoreError(Exception):
    """Base of the store's own errors."""


class WrongExpectedVersion(StoreError):
    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id} is at version {actual}, not {expected}")
        self.stream_id, self.expected, self.actual = stream_id, expected, actual


class DuplicateEvent(StoreError):
    """An event id or (stream, version) already stored: somebody else appended it first."""


class StaleRead(StoreError):
    """A batch decided without the lock found, once it held it, streams moved on since it read
    them: nothing was written; decide again with the lock taken first."""

    def __init__(self, stream_ids: Sequence[str]) -> None:
        super().__init__(f"streams appended to since this batch read them: {', '.join(stream_ids)}")
        self.stream_ids = list(stream_ids)


def utc(dt: datetime) -> datetime:
    """Times read back from SQLite are naive; everything is stored in UTC."""
    tz = dt.tzinfo
    if tz is UTC:  # most times, on every append and read: ``astimezone`` is not free
        return dt
    return dt.replace(tzinfo=UTC) if tz is None else dt.astimezone(UTC)


def now_utc() -> datetime:
    return datetime.now(UTC)


# The canonical JSON an event's hash covers is ``json.dumps(fields, sort_keys=True,
# separators=(",", ":"), default=str)`` of the envelope below (every stored chain was hashed over
# exactly that text). It is written out here in the sorted key order, each value by the encoder
# ``json.dumps`` would use for it, which is several times faster than sorting and encoding the
# envelope dict on every append and every verify. ASCII only (``ensure_ascii``): the server hashes
# the same text as these bytes.
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode
_STRING = json.encoder.encode_basestring_ascii


def _json(value: Any) -> str:
    if value is None:
        return "null"
    if type(value) is str:
        return _STRING(value)
    if type(value) is int:
        return int.__repr__(value)
    return _ENCODE(value)


def canonical_around_version(row: dict[str, Any]) -> tuple[str, str]:
    """An event's canonical JSON as the text before and after its stream version (which the
    server fills in once it holds the chain head): ``head + str(version) + tail``."""
    return ('{"causation_id":' + _json(row["causation_id"])
            + ',"correlation_id":' + _json(row["correlation_id"])
            + ',"data":' + _ENCODE(row["data"])
            + ',"event_id":' + _json(row["event_id"])
            + ',"occurred_at":' + _STRING(utc(row["occurred_at"]).isoformat())
            + ',"occurred_offset_s":' + _json(row["occurred_offset_s"])
            + ',"recorded_at":' + _STRING(utc(row["recorded_at"]).isoformat())
            + ',"recorded_by":' + _json(row["recorded_by"])
            + ',"schema_version":' + _json(row["schema_version"])
            + ',"stream_id":' + _json(row["stream_id"])
            + ',"stream_version":',
            ',"subject_id":' + _json(row["subject_id"]) + ',"type":' + _json(row["type"]) + "}")


def canonical(row: dict[str, Any]) -> str:
    """The canonical JSON of an event's row (ASCII: its bytes are its characters)."""
    head, tail = canonical_around_version(row)
    return head + _json(row["stream_version"]) + tail


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256((prev_hash + canonical(row)).encode()).hexdigest()


@functools.cache
def zone(offset_s: int) -> timezone:
    """The fixed zone of an offset in seconds, made once per offset (every row read names one)."""
    return timezone(timedelta(seconds=offset_s))


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
        occurred_at=utc(m["occurred_at"]).astimezone(zone(m["occurred_offset_s"])),
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


async def stream_versions(conn: AsyncConnection, stream_ids: Iterable[str]) -> dict[str, int]:
    """Each stream's version, of those that have events (one query)."""
    wanted = sorted(set(stream_ids))
    if not wanted:
        return {}
    rows = await conn.execute(select(events.c.stream_id, func.max(events.c.stream_version))
                              .where(events.c.stream_id.in_(wanted)).group_by(events.c.stream_id))
    return {stream: int(version) for stream, version in rows}


async def stream_version(conn: AsyncConnection, stream_id: str) -> int:
    current = await conn.scalar(
        select(func.max(events.c.stream_version)).where(events.c.stream_id == stream_id)
    )
    return int(current or 0)


class Batch:
    """Appends under one lock of the chain head, stored together by ``flush``.

    ``Batch.begin`` takes the head's lock (once, however many appends follow); ``add`` numbers and
    hash-chains events in memory, each at the position after the last (the lock makes them the next
    ones: every append goes through here); ``flush`` inserts every event and outbox row with one
    statement each and moves the head once. Nothing reaches the database before ``flush``, so a
    caller that decides against an event simply does not ``add`` it. After a failed ``flush`` the
    transaction must be rolled back.

    A stream's version comes from the caller when it keeps one (``known_version``: the ingest's
    ``patient_heads``), else from ``max(stream_version)`` once per stream and batch. Streams
    appended without a known version lose their ``patient_heads`` row at ``flush`` (whoever keeps
    it builds it again from the stream).

    A batch may also be decided before the lock is taken (``Batch.deferred``): ``add`` numbers the
    stream versions only, and ``flush`` takes the lock, checks that every stream is still at the
    version this batch read (``StaleRead`` if not: nothing written), numbers and hash-chains the
    events after the chain head, and stores them with the patient heads given; on PostgreSQL that
    is one call of ``eventstore_append_batch`` (migration 0008), on SQLite the same steps in the
    write transaction ``flush`` is given. The events ``add`` answered get their positions then.
    """

    def __init__(self, conn: AsyncConnection, position: int, prev_hash: str, *, deferred: bool = False) -> None:
        self.conn, self.position, self.hash, self.deferred = conn, position, prev_hash, deferred
        self.rows: list[dict[str, Any]] = []
        self.versions: dict[str, int] = {}
        self.read: dict[str, int] = {}  # each stream's version as this batch first saw it
        self._unkept: set[str] = set()
        self._unnumbered: list[StoredEvent] = []

    @classmethod
    async def begin(cls, conn: AsyncConnection) -> Batch:
        return cls(conn, *await _lock_head(conn))

    @classmethod
    def deferred_on(cls, conn: AsyncConnection) -> Batch:
        """A batch whose lock is taken by its ``flush``: decided on what ``conn`` reads (on SQLite a
        read snapshot, which waits for no writer), stored by ``flush`` once it holds the lock."""
        return cls(conn, 0, GENESIS, deferred=True)

    async def version(self, stream_id: str, known: int | None = None) -> int:
        if stream_id not in self.versions:
            self.versions[stream_id] = known if known is not None else await stream_version(self.conn, stream_id)
            self.read[stream_id] = self.versions[stream_id]
        return self.versions[stream_id]

    async def add(self, stream_id: str, new_events: Sequence[NewEvent], *, expected_version: int | None = None,
                  recorded_at: datetime, known_version: int | None = None) -> list[StoredEvent]:
        version = await self.version(stream_id, known_version)
        if expected_version is not None and expected_version != version:
            raise WrongExpectedVersion(stream_id, expected_version, version)
        if known_version is None:
            self._unkept.add(stream_id)
        stored = []
        for event in new_events:
            version += 1
            row = _event_row(stream_id, event, recorded_at)
            if self.deferred:
                row.update(position=0, stream_version=version)  # the position comes with ``flush``
                row["canonical"] = canonical(row)
            else:
                self.position += 1
                row.update(position=self.position, stream_version=version, prev_hash=self.hash)
                row["hash"] = self.hash = chain_hash(self.hash, row)
            self.rows.append(row)
            stored.append(_stored(row, event))
        if self.deferred:
            self._unnumbered += stored
        self.versions[stream_id] = version
        return stored

    async def flush(self, heads: Sequence[PatientHead] = (), *, on: AsyncConnection | None = None) -> None:
        """Store what was added. ``heads``: patient heads to write with it, which only a deferred
        batch takes (a locked one's caller saves them with ``save_patient_heads``). ``on``: the
        connection a deferred batch on SQLite is stored through (its write transaction; the batch
        was decided on another, which only read)."""
        if self.deferred:
            if self.conn.dialect.name == "postgresql":
                await self._flush_deferred(heads)
            else:
                await self._flush_deferred_here(on or self.conn, heads)
            return
        assert not heads
        if not self.rows:
            return
        rows, self.rows = self.rows, []
        unkept, self._unkept = sorted(self._unkept), set()
        try:
            if self.conn.dialect.name == "postgresql":
                await self.conn.execute(_PG_FLUSH, _pg_arrays(rows) | {
                    "unkept": unkept, "head_position": self.position, "head_hash": self.hash})
                return
            await self.conn.execute(insert(events), rows)
        except IntegrityError as exc:
            raise DuplicateEvent(f"event id or stream version taken: {exc.orig}") from exc
        await self.conn.execute(insert(outbox), [
            {"position": r["position"], "event_id": r["event_id"], "attempts": 0, "created_at": r["recorded_at"]}
            for r in rows])
        await self.conn.execute(
            update(chain_head).where(chain_head.c.id == 1).values(position=self.position, hash=self.hash))
        if unkept:
            await self.conn.execute(delete(patient_heads).where(patient_heads.c.stream_id.in_(unkept)))


    async def _flush_deferred_here(self, conn: AsyncConnection, heads: Sequence[PatientHead]) -> None:
        """``eventstore_append_batch`` in Python, for SQLite: in ``conn``'s write transaction (which
        holds SQLite's one write lock from its BEGIN) check that every stream is still at the
        version this batch read (``StaleRead`` if not: nothing written), then number and
        hash-chain the events after the chain head and store them with their outbox rows and the
        patient heads given."""
        checks = dict(self.read)  # a head written without an append was read at its version
        checks.update((h.stream_id, h.stream_version) for h in heads if h.stream_id not in checks)
        if not self.rows and not heads:
            return
        now_at = await stream_versions(conn, checks)
        stale = sorted(s for s, version in checks.items() if now_at.get(s, 0) != version)
        if stale:
            raise StaleRead(stale)
        rows, self.rows = self.rows, []
        unkept, self._unkept = sorted(self._unkept), set()
        unnumbered, self._unnumbered = self._unnumbered, []
        position, prev_hash = await _lock_head(conn)
        for row, event in zip(rows, unnumbered, strict=True):
            position += 1
            row.update(position=position, prev_hash=prev_hash)  # the canonical JSON is ASCII: as chain_hash
            row["hash"] = prev_hash = hashlib.sha256((prev_hash + row.pop("canonical")).encode()).hexdigest()
            event.__dict__["position"] = position  # built by ``_trusted``: its values are its __dict__
        if rows:
            try:
                await conn.execute(insert(events), rows)
            except IntegrityError as exc:
                raise DuplicateEvent(f"event id or stream version taken: {exc.orig}") from exc
            await conn.execute(insert(outbox), [
                {"position": r["position"], "event_id": r["event_id"], "attempts": 0, "created_at": r["recorded_at"]}
                for r in rows])
            await conn.execute(
                update(chain_head).where(chain_head.c.id == 1).values(position=position, hash=prev_hash))
        if unkept:
            await conn.execute(delete(patient_heads).where(patient_heads.c.stream_id.in_(unkept)))
        await save_patient_heads(conn, heads)
        self.versions.clear()
        self.read.clear()

    async def _flush_deferred(self, heads: Sequence[PatientHead]) -> None:
        checks = dict(self.read)  # a head written without an append was read at its version
        checks.update((h.stream_id, h.stream_version) for h in heads if h.stream_id not in checks)
        if not self.rows and not heads:
            return
        rows, self.rows = self.rows, []
        unkept, self._unkept = sorted(self._unkept), set()
        unnumbered, self._unnumbered = self._unnumbered, []
        head_rows = [h.row() for h in heads]
        params = (list(checks), list(checks.values()),
                  *([json.dumps(r["data"]) for r in rows] if c == "data" else [r[c] for r in rows]
                    for c in _BATCH_COLUMNS),
                  unkept, *([h[c] for h in head_rows] for c in _HEAD_COLUMNS))
        try:
            answer = (await self.conn.exec_driver_sql(_PG_APPEND_BATCH, params)).one()
        except IntegrityError as exc:
            raise DuplicateEvent(f"event id or stream version taken: {exc.orig}") from exc
        after, stale = tuple(answer)
        if after is None:
            raise StaleRead(sorted(stale))
        for k, event in enumerate(unnumbered, start=1):
            event.__dict__["position"] = after + k  # built by ``_trusted``: its values are its __dict__
        self.versions.clear()
        self.read.clear()


# A deferred batch's one statement (migration 0008), the arguments in the function's order; run as
# the driver's SQL, so nothing is compiled per batch.
_BATCH_COLUMNS = {
    "event_id": "varchar", "stream_id": "varchar", "stream_version": "integer", "type": "varchar",
    "schema_version": "integer", "subject_id": "varchar", "occurred_at": "timestamptz",
    "occurred_offset_s": "integer", "recorded_at": "timestamptz", "recorded_by": "varchar", "data": "json",
    "correlation_id": "varchar", "causation_id": "varchar", "canonical": "text",
}
_HEAD_COLUMNS = {
    "stream_id": "varchar", "subject_id": "varchar", "site_id": "varchar", "arm": "varchar",
    "stream_version": "integer", "death_event_id": "varchar", "death_occurred_at": "timestamptz",
    "death_offset_s": "integer",
}
_BATCH_TYPES = ["varchar", "integer", *_BATCH_COLUMNS.values(), "varchar", *_HEAD_COLUMNS.values()]
_PG_APPEND_BATCH = ("SELECT after_position, stale FROM eventstore_append_batch("
                    + ", ".join(f"${k}::{t}[]" for k, t in enumerate(_BATCH_TYPES, start=1)) + ")")


# On PostgreSQL a batch is one statement, one round trip: the events from arrays, their outbox
# rows from what was inserted, stale patient heads dropped, the chain head moved, and the position
# sequence kept in step with the numbers given here (so an insert that leaves the position to the
# database, should any code still do that, gets a fresh one).
_PG_COLUMNS = {
    "position": "bigint", "event_id": "varchar", "stream_id": "varchar", "stream_version": "integer",
    "type": "varchar", "schema_version": "integer", "subject_id": "varchar", "occurred_at": "timestamptz",
    "occurred_offset_s": "integer", "recorded_at": "timestamptz", "recorded_by": "varchar", "data": "json",
    "correlation_id": "varchar", "causation_id": "varchar", "prev_hash": "varchar", "hash": "varchar",
}
_PG_FLUSH = text(f"""
WITH new_events AS (
    INSERT INTO events ({", ".join(_PG_COLUMNS)})
    SELECT * FROM unnest({", ".join(f"CAST(:{c} AS {t}[])" for c, t in _PG_COLUMNS.items())})
    RETURNING position, event_id, recorded_at
), queued AS (
    INSERT INTO outbox (position, event_id, attempts, created_at)
    SELECT position, event_id, 0, recorded_at FROM new_events
), unkept AS (
    DELETE FROM patient_heads WHERE stream_id = ANY(CAST(:unkept AS varchar[]))
)
UPDATE chain_head SET position = :head_position, hash = :head_hash
FROM (SELECT setval(pg_get_serial_sequence('events', 'position'), :head_position)) AS in_step
WHERE id = 1
""")


def _pg_arrays(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    arrays: dict[str, list[Any]] = {c: [r[c] for r in rows] for c in _PG_COLUMNS}
    arrays["data"] = [json.dumps(d) for d in arrays["data"]]
    return arrays


def _event_row(stream_id: str, event: NewEvent, recorded_at: datetime) -> dict[str, Any]:
    """An event's row, but for its position, stream version and hashes."""
    occurred_at = event.occurred_at.astimezone(UTC)
    return {
        "event_id": str(event.event_id),
        "stream_id": stream_id,
        "type": event.type,
        "schema_version": event.schema_version,
        "subject_id": event.subject_id,
        "occurred_at": occurred_at,
        "occurred_offset_s": int(event.occurred_at.utcoffset().total_seconds()),  # type: ignore[union-attr]
        "recorded_at": recorded_at,
        "recorded_by": event.recorded_by,
        "data": event.data,
        "correlation_id": str(event.correlation_id) if event.correlation_id else None,
        "causation_id": str(event.causation_id) if event.causation_id else None,
    }


def _stored(row: dict[str, Any], event: NewEvent) -> StoredEvent:
    return _trusted({  # the values are the checked ones of ``event``
        "position": row["position"], "event_id": event.event_id, "stream_id": row["stream_id"],
        "stream_version": row["stream_version"], "type": event.type, "schema_version": event.schema_version,
        "subject_id": event.subject_id,
        "occurred_at": row["occurred_at"].astimezone(zone(row["occurred_offset_s"])),
        "recorded_at": utc(row["recorded_at"]), "recorded_by": event.recorded_by, "data": event.data,
        "correlation_id": event.correlation_id, "causation_id": event.causation_id})


_STORED_FIELDS = frozenset(StoredEvent.model_fields)


def _trusted(values: dict[str, Any]) -> StoredEvent:
    """What ``StoredEvent.model_construct(**values)`` builds when every field is given, without its
    per-field look-ups for aliases and defaults (a third of an append's Python time)."""
    stored = StoredEvent.__new__(StoredEvent)
    object.__setattr__(stored, "__dict__", values)
    object.__setattr__(stored, "__pydantic_fields_set__", set(_STORED_FIELDS))
    object.__setattr__(stored, "__pydantic_extra__", None)
    object.__setattr__(stored, "__pydantic_private__", None)
    return stored


async def append(
    conn: AsyncConnection,
    stream_id: str,
    new_events: Sequence[NewEvent],
    *,
    expected_version: int | None = None,
    recorded_at: datetime | None = None,
) -> list[StoredEvent]:
    """Append to a stream inside the caller's transaction (a batch of one append).

    ``expected_version`` None appends after whatever is there; an int must equal the stream's
    current version (0: the stream must not exist yet) or ``WrongExpectedVersion`` is raised and
    nothing is written. On PostgreSQL it is one statement (``_append_on_server``).
    """
    recorded_at = recorded_at or now_utc()
    if conn.dialect.name == "postgresql":
        return await _append_on_server(conn, stream_id, new_events, expected_version, recorded_at)
    batch = await Batch.begin(conn)
    stored = await batch.add(stream_id, new_events, expected_version=expected_version, recorded_at=recorded_at)
    await batch.flush()
    return stored


# The same append as ``Batch`` makes, in one round trip: the function (migration 0007) locks the
# chain head, reads the stream's version, checks the expected one, chains the hashes over the
# canonical JSON given in pieces around the version, inserts the events and their outbox rows,
# drops the stream's patient head and moves the chain head. It answers the stream's version
# before the append, and the position before it (NULL when the expected version was wrong).
_SERVER_COLUMNS = {  # in the order of the function's arguments
    "event_id": "varchar", "type": "varchar", "schema_version": "integer", "subject_id": "varchar",
    "occurred_at": "timestamptz", "occurred_offset_s": "integer", "recorded_by": "varchar", "data": "json",
    "correlation_id": "varchar", "causation_id": "varchar",
}
_PG_APPEND = (  # run as the driver's SQL: the one statement of an append, with no compiling per call
    "SELECT version, after_position FROM eventstore_append($1::varchar, $2::integer, $3::timestamptz, "
    + "".join(f"${k}::{t}[], " for k, t in enumerate(_SERVER_COLUMNS.values(), start=4))
    + f"${len(_SERVER_COLUMNS) + 4}::text[], ${len(_SERVER_COLUMNS) + 5}::text[])")


async def _append_on_server(conn: AsyncConnection, stream_id: str, new_events: Sequence[NewEvent],
                            expected_version: int | None, recorded_at: datetime) -> list[StoredEvent]:
    rows = [_event_row(stream_id, e, recorded_at) for e in new_events]
    pieces = [canonical_around_version(r) for r in rows]
    columns = [[json.dumps(r[c]) if c == "data" else r[c] for r in rows] for c in _SERVER_COLUMNS]
    params = (stream_id, expected_version, recorded_at, *columns, [h for h, _ in pieces], [t for _, t in pieces])
    try:
        answer = (await conn.exec_driver_sql(_PG_APPEND, params)).one()
    except IntegrityError as exc:
        raise DuplicateEvent(f"event id or stream version taken: {exc.orig}") from exc
    version, after = tuple(answer)
    if after is None:
        assert expected_version is not None  # the only reason the function writes nothing
        raise WrongExpectedVersion(stream_id, expected_version, version)
    for k, row in enumerate(rows, start=1):
        row.update(position=after + k, stream_version=version + k)
    return [_stored(row, event) for row, event in zip(rows, new_events, strict=True)]


# --- patient heads: what a write needs to know about a patient, kept beside its stream -------

@dataclass
class PatientHead:
    stream_id: str
    subject_id: str
    site_id: str
    arm: str
    stream_version: int
    death_event_id: str | None = None
    death_occurred_at: datetime | None = None  # in the offset it was entered in

    def row(self) -> dict[str, Any]:
        at = self.death_occurred_at
        return {"stream_id": self.stream_id, "subject_id": self.subject_id, "site_id": self.site_id,
                "arm": self.arm, "stream_version": self.stream_version, "death_event_id": self.death_event_id,
                "death_occurred_at": at.astimezone(UTC) if at else None,
                "death_offset_s": int(at.utcoffset().total_seconds()) if at else None}  # type: ignore[union-attr]


def _head(row: Row[Any]) -> PatientHead:
    m = row._mapping
    at = m["death_occurred_at"]
    if at is not None:
        at = utc(at).astimezone(zone(m["death_offset_s"] or 0))
    return PatientHead(m["stream_id"], m["subject_id"], m["site_id"], m["arm"], m["stream_version"],
                       m["death_event_id"], at)


# Every write of the ingest reads its patients' heads first: on PostgreSQL one statement of the
# driver's SQL with the streams as one array (a compiled ``IN`` of as many parameters as streams
# costs twice the CPU of the query itself).
_PG_READ_HEADS = "SELECT * FROM patient_heads WHERE stream_id = ANY($1::varchar[])"


async def read_patient_heads(conn: AsyncConnection, stream_ids: Iterable[str]) -> dict[str, PatientHead]:
    wanted = sorted(set(stream_ids))
    found: dict[str, PatientHead] = {}
    if conn.dialect.name == "postgresql":
        rows = await conn.exec_driver_sql(_PG_READ_HEADS, (wanted,))
        return {r.stream_id: _head(r) for r in rows}
    for start in range(0, len(wanted), 1000):
        rows = await conn.execute(select(patient_heads).where(patient_heads.c.stream_id.in_(wanted[start:start + 1000])))
        found.update((r.stream_id, _head(r)) for r in rows)
    return found


async def existing_streams(conn: AsyncConnection, stream_ids: Iterable[str]) -> set[str]:
    wanted = sorted(set(stream_ids))
    found: set[str] = set()
    for start in range(0, len(wanted), 1000):
        rows = await conn.execute(select(events.c.stream_id).where(
            events.c.stream_id.in_(wanted[start:start + 1000])).group_by(events.c.stream_id))
        found.update(rows.scalars())
    return found


async def save_patient_heads(conn: AsyncConnection, heads: Iterable[PatientHead]) -> None:
    await upsert_many(conn, patient_heads, [h.row() for h in heads], ["stream_id"])


async def read_stream(
    conn: AsyncConnection, stream_id: str, *, as_of: datetime | None = None
) -> list[StoredEvent]:
    query = select(events).where(events.c.stream_id == stream_id)
    if as_of is not None:
        query = query.where(events.c.recorded_at <= as_of.astimezone(UTC))
    rows = await conn.execute(query.order_by(events.c.position))
    return [to_stored(r) for r in rows]


async def read_streams(conn: AsyncConnection, stream_ids: Iterable[str]) -> dict[str, list[StoredEvent]]:
    """Several streams at once (``read_stream`` of each, in one query per thousand streams)."""
    wanted = sorted(set(stream_ids))
    found: dict[str, list[StoredEvent]] = {s: [] for s in wanted}
    for start in range(0, len(wanted), 1000):
        rows = await conn.execute(select(events).where(events.c.stream_id.in_(wanted[start:start + 1000]))
                                  .order_by(events.c.position))
        for row in rows:
            found[row.stream_id].append(to_stored(row))
    return found


async def read_types_of(conn: AsyncConnection, types: Iterable[str],
                        subject_ids: Iterable[str]) -> dict[str, list[StoredEvent]]:
    """``read_types(types, subject_id=s)`` of several subjects at once."""
    wanted, kinds = sorted(set(subject_ids)), list(types)
    found: dict[str, list[StoredEvent]] = {s: [] for s in wanted}
    for start in range(0, len(wanted), 1000):
        rows = await conn.execute(select(events).where(events.c.type.in_(kinds),
                                                       events.c.subject_id.in_(wanted[start:start + 1000]))
                                  .order_by(events.c.position))
        for row in rows:
            found[row.subject_id].append(to_stored(row))
    return found


async def read_types(
    conn: AsyncConnection,
    types: Iterable[str],
    *,
    subject_id: str | None = None,
    as_of: datetime | None = None,
) -> list[StoredEvent]:
    conditions: list[ColumnElement[bool]] = [events.c.type.in_(list(types))]
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
    count = appended._mapping["count"]  # not ``appended.count``: to mypy that is the Sequence method
    if count != checked or appended.last_position > last:
        return (f"{count} events were appended (the last at position {appended.last_position}), but "
                f"{checked} are stored, the last at position {last}: events were deleted")
    return ""
