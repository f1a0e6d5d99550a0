"""The patients' streams as one batch of writes sees them.

A ``Ledger`` lives for one transaction of the group commit (``unit_of_work.py``): the chain head is
locked, so what it reads cannot change under it, and every append of the batch so far is included
though none is flushed yet. What a write needs to know about a patient (site, stream version, the
recorded death) comes from the small ``patient_heads`` row, kept in the same transaction as each
append; the stream itself is read only for corrections and retractions (what they may target),
for a death's bookkeeping, and to build a head the table does not have yet.

On PostgreSQL the lock may instead be left to the flush (``lock_first=False``): then what the
ledger read may have moved on by the time the batch is stored, and the flush checks that every
stream it wrote or whose head it built is still at the version it read (``StaleRead`` if not;
nothing is written and the batch is decided again with the lock taken first). The whole flush,
events and heads, is then one statement.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncConnection

from services.ingest.domain.death import DEATH_CHANGING_TYPES, RecordedDeath, recorded_death
from shared.events import PATIENT_ENROLLED, NewEvent, StoredEvent, patient_stream
from shared.store import eventstore
from shared.store.eventstore import Batch, PatientHead


class Ledger:
    def __init__(self, conn: AsyncConnection, batch: Batch, tz: ZoneInfo, now: datetime) -> None:
        self.conn, self.batch, self.tz, self.now = conn, batch, tz, now
        self._heads: dict[str, PatientHead | None] = {}
        self._pending: dict[str, list[StoredEvent]] = {}
        self._changed: set[str] = set()
        self.appended = 0

    @classmethod
    async def begin(cls, conn: AsyncConnection, tz: ZoneInfo, now: datetime, *, lock_first: bool = True) -> Ledger:
        """``lock_first=False``: the chain head is locked by the flush, not now (on SQLite ``conn``
        only reads, and the flush is given the write transaction's connection)."""
        if lock_first:
            return cls(conn, await Batch.begin(conn), tz, now)
        return cls(conn, Batch.deferred_on(conn), tz, now)

    async def prefetch(self, subject_ids: Iterable[str]) -> None:
        """Read many patients' heads at once (a bulk import), rather than one query each."""
        wanted = {patient_stream(s) for s in subject_ids} - self._heads.keys()
        found: dict[str, PatientHead | None] = dict(await eventstore.read_patient_heads(self.conn, wanted))
        missing = wanted - found.keys()
        for stream in await eventstore.existing_streams(self.conn, missing):
            found[stream] = await self._build(stream)
        for stream in wanted:
            self._heads[stream] = found.get(stream)

    async def head(self, subject_id: str) -> PatientHead | None:
        """The patient's head, None for a subject never enrolled."""
        stream = patient_stream(subject_id)
        if stream not in self._heads:
            head = (await eventstore.read_patient_heads(self.conn, [stream])).get(stream)
            self._heads[stream] = head or await self._build(stream)
        return self._heads[stream]

    async def _build(self, stream: str) -> PatientHead | None:
        """A head from the stream itself: for patients enrolled before the table existed, or whose
        stream someone appended to without keeping it."""
        history = await eventstore.read_stream(self.conn, stream)
        enrolment = next((e for e in history if e.type == PATIENT_ENROLLED), None)
        if enrolment is None:
            return None
        head = PatientHead(stream, str(enrolment.subject_id), str(enrolment.data["site_id"]),
                           str(enrolment.data.get("arm") or "blinatumomab_dli"), history[-1].stream_version)
        self._set_death(head, recorded_death(history, self.tz))
        self._changed.add(stream)
        return head

    async def history(self, subject_id: str) -> list[StoredEvent]:
        """The patient's whole stream, this batch's appends included."""
        stream = patient_stream(subject_id)
        return await eventstore.read_stream(self.conn, stream) + self._pending.get(stream, [])

    def death(self, head: PatientHead) -> RecordedDeath | None:
        if head.death_event_id is None or head.death_occurred_at is None:
            return None
        return RecordedDeath(uuid.UUID(head.death_event_id), head.death_occurred_at)

    @staticmethod
    def _set_death(head: PatientHead, death: RecordedDeath | None) -> None:
        head.death_event_id = str(death.event_id) if death else None
        head.death_occurred_at = death.occurred_at if death else None

    async def enrol(self, event: NewEvent, *, site_id: str, arm: str) -> StoredEvent:
        """The first event of a new patient's stream (the caller has seen ``head`` is None)."""
        assert event.subject_id is not None
        stream = patient_stream(event.subject_id)
        [stored] = await self.batch.add(stream, [event], expected_version=0, recorded_at=self.now, known_version=0)
        self._heads[stream] = PatientHead(stream, event.subject_id, site_id, arm, stored.stream_version)
        self._kept(stream, stored)
        return stored

    async def append(self, head: PatientHead, event: NewEvent) -> StoredEvent:
        """The next event of an enrolled patient's stream, decided against ``head``."""
        [stored] = await self.batch.add(head.stream_id, [event], expected_version=head.stream_version,
                                        recorded_at=self.now, known_version=head.stream_version)
        head.stream_version = stored.stream_version
        self._kept(head.stream_id, stored)
        if event.type in DEATH_CHANGING_TYPES:
            self._set_death(head, recorded_death(await self.history(head.subject_id), self.tz))
        return stored

    def _kept(self, stream: str, stored: StoredEvent) -> None:
        self._pending.setdefault(stream, []).append(stored)
        self._changed.add(stream)
        self.appended += 1

    async def flush(self, *, on: AsyncConnection | None = None) -> None:
        """Store the batch (``on``: the write transaction's connection, when this ledger read on another)."""
        heads = [h for s in sorted(self._changed) if (h := self._heads.get(s)) is not None]
        if self.batch.deferred:
            await self.batch.flush(heads, on=on)
        else:
            await self.batch.flush()
            await eventstore.save_patient_heads(self.conn, heads)
        self._changed.clear()
        self._pending.clear()
