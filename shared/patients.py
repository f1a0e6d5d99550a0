"""Loading folded patients from the event store (safety, ingest and notify all read them)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from shared.clinical.patient import PatientState, fold_patient
from shared.events import CLINICAL_TYPES, PATIENT_ENROLLED, StoredEvent
from shared.protocol import Protocol
from shared.store import eventstore

PATIENT_TYPES = CLINICAL_TYPES | {PATIENT_ENROLLED}


async def load_patient_states(
    conn: AsyncConnection, protocol: Protocol, *, now: datetime, as_of: datetime | None = None
) -> list[PatientState]:
    """Every enrolled patient folded at ``now`` from what was recorded by ``as_of`` (default: all)."""
    by_subject: dict[str, list[StoredEvent]] = defaultdict(list)
    for event in await eventstore.read_types(conn, PATIENT_TYPES, as_of=as_of):
        if event.subject_id is not None:
            by_subject[event.subject_id].append(event)
    return [
        fold_patient(history, protocol, now=now)
        for history in by_subject.values()
        if any(e.type == PATIENT_ENROLLED for e in history)
    ]
