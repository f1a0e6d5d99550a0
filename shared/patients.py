"""Loading patients from the store: folds of the log (``as_of`` questions, the DSMB summary) and
the safety service's read models of them (the patient list, the stopping rules' inputs, the
patients set aside)."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import exists, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.clinical.patient import PatientState, fold_patient
from shared.clinical.stopping import RuleInput
from shared.events import CLINICAL_TYPES, PATIENT_ENROLLED, StoredEvent
from shared.protocol import Protocol
from shared.store import eventstore
from shared.store.eventstore import utc
from shared.store.tables import events, patient_failures, patient_projection, rule_inputs

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


@dataclass(frozen=True)
class Listed:
    """A patient in the list, as the safety service last evaluated it: ``state`` is its projection
    (``PatientState.public()`` at that moment), None while it has not been evaluated yet (then
    ``enrolment`` is all there is); ``failure`` says why it was set aside, if it was."""

    subject_id: str
    site_id: str
    enrolment: dict[str, Any] | None
    state: dict[str, Any] | None
    failure: str | None


async def list_patients(conn: AsyncConnection, *, site_id: str | None = None) -> list[Listed]:
    """Every enrolled patient (of ``site_id``, if given), by subject id, from the read models and
    one enrolment row per patient not yet evaluated: no patient's stream is read."""
    failures = {r.subject_id: r.error for r in await conn.execute(select(patient_failures.c.subject_id,
                                                                             patient_failures.c.error))}
    evaluated = select(patient_projection.c.subject_id, patient_projection.c.site_id, patient_projection.c.state)
    if site_id is not None:
        evaluated = evaluated.where(patient_projection.c.site_id == site_id)
    listed = [Listed(r.subject_id, r.site_id, None, r.state, failures.get(r.subject_id))
              for r in await conn.execute(evaluated)]
    waiting = select(events.c.subject_id, events.c.data).where(
        events.c.type == PATIENT_ENROLLED,
        ~exists().where(patient_projection.c.subject_id == events.c.subject_id))
    seen = {p.subject_id for p in listed}
    for row in await conn.execute(waiting.order_by(events.c.position)):
        site = str(row.data.get("site_id"))
        if row.subject_id not in seen and (site_id is None or site == site_id):
            seen.add(row.subject_id)
            listed.append(Listed(str(row.subject_id), site, row.data, None, failures.get(row.subject_id)))
    return sorted(listed, key=lambda p: p.subject_id)


async def set_aside_note(conn: AsyncConnection, subject_id: str) -> str | None:
    """The safety service's record that it set the patient aside, in words; None if it has not."""
    row = (await conn.execute(select(patient_failures).where(patient_failures.c.subject_id == subject_id))).first()
    if row is None:
        return None
    return (f"the safety service set the patient aside ({row.failures} failed evaluation"
            f"{'' if row.failures == 1 else 's'}, the latest at {utc(row.failed_at).isoformat()}) "
            "and alerted the investigators")
