"""Loading patients from the store: folds of the log (``as_of`` questions, the DSMB summary) and
the safety service's read models of them (the stopping rules' inputs, the patients set aside)."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.clinical.patient import PatientState, fold_patient
from shared.clinical.stopping import RuleInput
from shared.events import CLINICAL_TYPES, PATIENT_ENROLLED, StoredEvent
from shared.protocol import Protocol
from shared.store import eventstore
from shared.store.eventstore import utc
from shared.store.tables import patient_failures, rule_inputs

log = logging.getLogger(__name__)

PATIENT_TYPES = CLINICAL_TYPES | {PATIENT_ENROLLED}


@dataclass(frozen=True)
class Folded:
    """Every enrolled patient's state, and those whose records could not be folded (subject -> why):
    one such record must not take every other patient's figures with it."""

    states: list[PatientState]
    failed: dict[str, str] = field(default_factory=dict)


async def fold_patients(
    conn: AsyncConnection, protocol: Protocol, *, now: datetime, as_of: datetime | None = None
) -> Folded:
    """Every enrolled patient folded at ``now`` from what was recorded by ``as_of`` (default: all)."""
    by_subject: dict[str, list[StoredEvent]] = defaultdict(list)
    for event in await eventstore.read_types(conn, PATIENT_TYPES, as_of=as_of):
        if event.subject_id is not None:
            by_subject[event.subject_id].append(event)
    folded = Folded([])
    for subject_id, history in by_subject.items():
        if not any(e.type == PATIENT_ENROLLED for e in history):
            continue
        try:
            folded.states.append(fold_patient(history, protocol, now=now))
        except Exception as exc:
            log.exception("patient %s cannot be folded; left out", subject_id)
            folded.failed[subject_id] = f"{type(exc).__name__}: {exc}"
    return folded


async def load_patient_states(
    conn: AsyncConnection, protocol: Protocol, *, now: datetime, as_of: datetime | None = None
) -> list[PatientState]:
    """The patients that fold (``fold_patients`` says which do not)."""
    return (await fold_patients(conn, protocol, now=now, as_of=as_of)).states


async def read_rule_inputs(conn: AsyncConnection, now: datetime) -> list[RuleInput]:
    """The stopping rules' read model: the rows that count at ``now`` (one waiting for its window
    to close does not yet)."""
    rows = await conn.execute(select(rule_inputs).where(
        or_(rule_inputs.c.counts_from.is_(None), rule_inputs.c.counts_from <= now.astimezone(UTC))))
    return [rule_input_of(r) for r in rows]


def rule_input_of(row: Any) -> RuleInput:
    """A ``rule_inputs`` row as the rules take it (times in UTC: SQLite keeps no offset)."""
    return RuleInput(row.rule_id, row.subject_id, row.arm, row.event, utc(row.evaluable_at),
                     utc(row.counts_from) if row.counts_from else None)


async def set_aside_subjects(conn: AsyncConnection) -> list[str]:
    """Patients the safety service could not evaluate: no rule can count them."""
    return list((await conn.execute(select(patient_failures.c.subject_id))).scalars())
