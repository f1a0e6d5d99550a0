"""The ingest use cases. Each takes the unit of work's connection (or, for the patient writes that go
through the group commit, its ``Ledger``), its command and plain values.

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
from services.ingest.domain.access import check_site, visible
from services.ingest.domain.death import RecordedDeath, after_death_problems, describe
from services.ingest.domain.eligibility import failed_criteria
from services.ingest.domain.errors import (
    Invalid,
    PatientExists,
    UnknownAlert,
    UnknownPatient,
    VersionMismatch,
)
from services.ingest.ledger import Ledger
from shared.alert_log import AlertView, fold_alerts
from shared.clinical.grading import GradeConflict, derive_data
from shared.events import (
    ALERT_ACKNOWLEDGED,
    DIGEST_REQUESTED,
    DIGEST_STREAM,
    PATIENT_ENROLLED,
    AlertAcknowledged,
    Correction,
    Enrolment,
    NewEvent,
    Retraction,
    StoredEvent,
    alert_stream,
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


async def enrol(ledger: Ledger, cmd: Enrol, *, protocol: Protocol, now: datetime) -> StoredEvent:
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
    if await ledger.head(e.subject_id) is not None:
        raise PatientExists(e.subject_id)
    data = e.model_dump(mode="json") | {"enrolled_at": enrolled_at.isoformat(),
                                        "failed_criteria": [p.path for p in failed]}
    event = NewEvent(type=PATIENT_ENROLLED, subject_id=e.subject_id, occurred_at=enrolled_at,
                     recorded_by=cmd.recorded_by, data=data)
    return await ledger.enrol(event, site_id=e.site_id, arm=e.arm)


async def record_event(ledger: Ledger, cmd: RecordEvent, *, protocol: Protocol, now: datetime) -> StoredEvent:
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

    The ledger is read under the store's lock (the group commit holds it), so what is decided on
    here is what the event is appended after.
    """
    head = await ledger.head(cmd.subject_id)
    if head is None or not visible(cmd.site_scope, head.site_id):  # another site's: as unknown (no probing)
        raise UnknownPatient(cmd.subject_id)
    if cmd.expected_version is not None and cmd.expected_version != head.stream_version:
        raise VersionMismatch(cmd.subject_id, cmd.expected_version, head.stream_version)
    amends = isinstance(cmd.body, Correction | Retraction)
    history = await ledger.history(cmd.subject_id) if amends else []
    event = _decide(cmd, ledger.death(head), history, protocol=protocol, now=now)
    return await ledger.append(head, event)


def _decide(cmd: RecordEvent, death: RecordedDeath | None, history: list[StoredEvent], *, protocol: Protocol,
            now: datetime) -> NewEvent:
    """The event to append, or ``Invalid`` naming every problem (``history``: the patient's stream,
    needed only by a correction or retraction)."""
    after_death = after_death_problems(cmd.body, death, protocol.tz)
    problems = time_problems(cmd.body, now) + amendment_problems(cmd.body, history) + missing_observations(cmd.body)
    data: dict[str, Any] = {}
    try:
        data = derive_data(cmd.body, protocol)
    except GradeConflict as exc:
        problems += grade_conflict_problems(cmd.body, exc)
    if problems := after_death + problems:
        why = f"; {describe(death, protocol.tz)}" if after_death and death else ""
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
