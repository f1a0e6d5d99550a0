"""The ingest use cases. Each takes the unit of work's connection, its command and plain values.

The unit of work (``unit_of_work.py``) opens the transaction and commits it; a handler loads,
decides once and appends. Errors are the named ones in ``domain/errors.py``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from services.ingest.domain.acceptance import (
    amendment_problems,
    grade_conflict_problems,
    missing_observations,
    not_after_today,
    not_ahead,
    time_problems,
)
from services.ingest.domain.access import check_site, reachable_site
from services.ingest.domain.death import after_death_problems, describe, recorded_death
from services.ingest.domain.eligibility import failed_criteria
from services.ingest.domain.errors import (
    Invalid,
    PatientExists,
    UnknownAlert,
    VersionMismatch,
)
from shared.alert_log import AlertView, fold_alerts
from shared.clinical.grading import GradeConflict, derive_data
from shared.events import (
    ALERT_ACKNOWLEDGED,
    DIGEST_REQUESTED,
    DIGEST_STREAM,
    PATIENT_ENROLLED,
    AlertAcknowledged,
    Enrolment,
    NewEvent,
    StoredEvent,
    alert_stream,
    patient_stream,
)
from shared.protocol import Protocol
from shared.store import eventstore
from shared.store.eventstore import WrongExpectedVersion


@dataclass(frozen=True)
class Enrol:
    enrolment: Enrolment
    recorded_by: str
    site_scope: str | None  # a site's staff: their site; None: every site


@dataclass(frozen=True)
class RecordEvent:
    subject_id: str
    body: BaseModel  # one of shared.events.ClinicalEventBody
    recorded_by: str
    site_scope: str | None
    expected_version: int | None = None  # If-Match


@dataclass(frozen=True)
class AcknowledgeAlert:
    alert_id: uuid.UUID
    note: str | None
    acknowledged_by: str


@dataclass(frozen=True)
class RequestDigest:
    requested_by: str


@dataclass(frozen=True)
class Acknowledged:
    view: AlertView
    event: StoredEvent | None  # None: acknowledged before, nothing appended


async def enrol(conn: AsyncConnection, cmd: Enrol, *, protocol: Protocol, now: datetime) -> StoredEvent:
    """Enrol one patient: the first event of the patient's stream.

    - A site's staff enrol at their own site only.
    - ``enrolled_at`` defaults to now and may not lie in the future, nor may the transplant and
      relapse dates (the study's era, ``shared/events.py``, bounds them all from below).
    - Every failed criterion is named (422) unless ``eligibility_override`` is given; then the
      enrolment is stored with the failed criteria's paths in ``failed_criteria`` (the safety
      service raises the protocol-deviation alert).
    - A subject id enrols once (its stream must not exist yet: 409).
    """
    e = cmd.enrolment
    check_site(cmd.site_scope, e.site_id, f"site {e.site_id}")
    enrolled_at = e.enrolled_at or now
    failed = failed_criteria(e, max_age_years=protocol.trial.max_age_years)
    refused = failed if e.eligibility_override is None else []
    dates = [p for name in ("transplant_date", "relapse_date")
             for p in not_after_today(name, getattr(e, name), now, protocol.tz)]
    if problems := not_ahead("enrolled_at", enrolled_at, now) + dates + refused:
        raise Invalid(problems, "the enrolment cannot be recorded: " + ", ".join(p.path for p in problems)
                      + (" (eligibility_override enrols an ineligible patient)" if refused else ""))
    data = e.model_dump(mode="json") | {"enrolled_at": enrolled_at.isoformat(),
                                        "failed_criteria": [p.path for p in failed]}
    event = NewEvent(type=PATIENT_ENROLLED, subject_id=e.subject_id, occurred_at=enrolled_at,
                     recorded_by=cmd.recorded_by, data=data)
    try:
        [stored] = await eventstore.append(conn, patient_stream(e.subject_id), [event], expected_version=0,
                                           recorded_at=now)
    except WrongExpectedVersion as exc:
        raise PatientExists(e.subject_id) from exc
    return stored


async def record_event(conn: AsyncConnection, cmd: RecordEvent, *, protocol: Protocol,
                       now: datetime) -> StoredEvent:
    """Record one clinical event in the patient's stream.

    - The patient must be enrolled, at the caller's site for a site's staff (else 404 alike).
    - ``occurred_at`` at most 5 minutes ahead; corrections and retractions point at a live
      observation of this patient (``domain/acceptance.py``).
    - A CRS grade derived from observations needs all four of them, each missing one named.
    - Derived grades are stored beside the observations; a posted grade the observations
      contradict is refused, naming the grade and the observations.
    - After the recorded death nothing clinical is accepted, not even a second death; corrections
      and retractions still are (``domain/death.py``).
    - With ``If-Match`` the stream must still be at that version (412), else nothing is stored.

    The decision rests on the history read here, so the append expects the version read: should
    another event slip in first, the stream is read again under the store's lock and decided anew.
    """
    stream = patient_stream(cmd.subject_id)
    for _ in range(3):
        history = await eventstore.read_stream(conn, stream)
        event = _decide(cmd, history, protocol=protocol, now=now)
        try:
            [stored] = await eventstore.append(conn, stream, [event], expected_version=history[-1].stream_version,
                                               recorded_at=now)
        except WrongExpectedVersion as exc:
            if cmd.expected_version is not None:
                raise VersionMismatch(cmd.subject_id, cmd.expected_version, exc.actual) from exc
            continue
        return stored
    raise RuntimeError(f"patient {cmd.subject_id} keeps changing; try again")


def _decide(cmd: RecordEvent, history: list[StoredEvent], *, protocol: Protocol, now: datetime) -> NewEvent:
    """The event to append after ``history``, or ``Invalid`` naming every problem."""
    reachable_site(cmd.site_scope, cmd.subject_id, history)
    expected, actual = cmd.expected_version, history[-1].stream_version
    if expected is not None and expected != actual:  # checked again under the store's lock
        raise VersionMismatch(cmd.subject_id, expected, actual)
    death = recorded_death(history, protocol.tz)
    after_death = after_death_problems(cmd.body, death, protocol.tz)
    problems = time_problems(cmd.body, now) + amendment_problems(cmd.body, history) + missing_observations(cmd.body)
    data: dict[str, Any] = {}
    try:
        data = derive_data(cmd.body, protocol)
    except GradeConflict as exc:
        problems += grade_conflict_problems(cmd.body, exc)
    if problems := after_death + problems:
        why = f"; {describe(death)}" if after_death and death else ""
        raise Invalid(problems, "the event cannot be recorded: " + ", ".join(p.path for p in problems) + why)
    return NewEvent(type=cmd.body.type, subject_id=cmd.subject_id,  # type: ignore[attr-defined]
                    occurred_at=cmd.body.occurred_at,  # type: ignore[attr-defined]
                    recorded_by=cmd.recorded_by, data=data)


async def _alert(conn: AsyncConnection, alert_id: uuid.UUID) -> AlertView:
    view = fold_alerts(await eventstore.read_stream(conn, alert_stream(alert_id))).get(alert_id)
    if view is None:
        raise UnknownAlert(alert_id)
    return view


async def acknowledge_alert(conn: AsyncConnection, cmd: AcknowledgeAlert, *, now: datetime) -> Acknowledged:
    """An investigator acknowledges an alert, once: a second acknowledgement appends nothing.

    The append expects the alert stream's version; should another acknowledgement (or a
    withdrawal) slip in first, the stream is read again under the store's lock and decided anew.
    """
    for _ in range(3):
        view = await _alert(conn, cmd.alert_id)
        if view.acknowledged_by is not None:
            return Acknowledged(view, None)
        data = AlertAcknowledged(alert_id=cmd.alert_id, note=cmd.note).model_dump(mode="json")
        event = NewEvent(type=ALERT_ACKNOWLEDGED, subject_id=view.subject_id, occurred_at=now,
                         recorded_by=cmd.acknowledged_by, data=data)
        try:
            [stored] = await eventstore.append(conn, alert_stream(cmd.alert_id), [event],
                                               expected_version=view.version, recorded_at=now)
        except WrongExpectedVersion:
            continue
        return Acknowledged(await _alert(conn, cmd.alert_id), stored)
    raise RuntimeError(f"alert {cmd.alert_id} keeps changing; try again")


async def request_digest(conn: AsyncConnection, cmd: RequestDigest, *, now: datetime) -> StoredEvent:
    """Ask the notify service for the DSMB summary now: an event it consumes, nothing sent here."""
    event = NewEvent(type=DIGEST_REQUESTED, occurred_at=now, recorded_by=cmd.requested_by,
                     data={"requested_by": cmd.requested_by})
    [stored] = await eventstore.append(conn, DIGEST_STREAM, [event], recorded_at=now)
    return stored
