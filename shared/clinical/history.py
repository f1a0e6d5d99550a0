"""The effective history: what a patient's record says once corrections and retractions apply.

Rules (CONTRACT.md section 2: "Nothing is ever updated or deleted: a correction or retraction is a
new event, and every derived state, alert decision and report follows the corrected history"):

- A ``correction`` replaces the event it corrects by its ``replacement``. The corrected event keeps
  its original ``event_id`` and position and takes the replacement's ``type``, ``occurred_at`` and
  data. With several corrections of one event the latest recorded wins (by ``recorded_at``, then
  position).
- A correction of a correction corrects the original event (the chain is followed to its root).
- A ``retraction`` drops the event it retracts. A retracted correction or retraction no longer
  counts: the history reads as if it had never been recorded.
- A correction or retraction naming an event that is not a clinical event of this stream is ignored.
- The same event delivered twice counts once.
- Effective events are ordered by (``occurred_at``, position, ``event_id``): the input order never
  matters.
- Each effective event keeps the ids of the events it rests on (original, then its corrections) and
  the latest time any of them was recorded, so an alert can cite them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from shared.events import CLINICAL_TYPES, OBSERVATION_TYPES, PATIENT_ENROLLED, StoredEvent

_ENVELOPE_KEYS = ("type", "occurred_at")


class NotEnrolledError(ValueError):
    """The stream holds no ``patient_enrolled`` event: there is no patient to fold."""


@dataclass(frozen=True)
class Fact:
    """One event of the effective history, in clinical time."""

    event_id: uuid.UUID
    type: str
    occurred_at: datetime
    day: date  # the trial-zone calendar day of occurred_at
    position: int
    data: Mapping[str, Any]
    cause_ids: tuple[uuid.UUID, ...]
    recorded_at: datetime

    @property
    def grade(self) -> int:
        return int(self.data.get("grade") or 0)

    @property
    def order(self) -> tuple[datetime, int, int]:
        # The id's number orders as its text does (fixed-width hex), without formatting it.
        return (self.occurred_at, self.position, self.event_id.int)


@dataclass(frozen=True)
class Enrolled:
    """The enrolment, parsed; ``fact`` is the ``patient_enrolled`` event itself."""

    fact: Fact
    subject_id: str
    site_id: str
    arm: str
    cohort: str
    age_years: float
    weight_kg: float
    transplant_date: date
    relapse_date: date
    eligibility: Mapping[str, Any]
    eligibility_override: Mapping[str, Any] | None


def effective_history(events: Sequence[StoredEvent], tz: ZoneInfo) -> tuple[Enrolled, tuple[Fact, ...]]:
    """The enrolment and the effective clinical events, ordered by clinical time."""
    # Keyed by the ids' numbers: they compare as the ids do and hash in C (a ``UUID`` hashes in
    # Python, and each event is looked up a few times).
    unique = {e.event_id.int: e for e in sorted(events, key=_recorded_order)}
    enrolment = _enrolment(unique.values(), tz)
    clinical = {i: e for i, e in unique.items() if e.type in CLINICAL_TYPES}
    live = _live_ids(clinical)
    corrections = _corrections_by_root(clinical, live)
    facts = [
        _effective(e, corrections.get(i), tz)
        for i, e in clinical.items()
        if i in live and e.type in OBSERVATION_TYPES
    ]
    facts.sort(key=_clinical_order)
    return enrolment, tuple(facts)


def _recorded_order(event: StoredEvent) -> tuple[datetime, int]:
    return (event.recorded_at, event.position)


def _clinical_order(fact: Fact) -> tuple[datetime, int, int]:
    return (fact.occurred_at, fact.position, fact.event_id.int)  # ``Fact.order``, without the property


def _enrolment(events: Iterable[StoredEvent], tz: ZoneInfo) -> Enrolled:
    found = sorted((e for e in events if e.type == PATIENT_ENROLLED), key=lambda e: e.position)
    if not found:
        raise NotEnrolledError("the stream has no patient_enrolled event")
    event, data = found[0], found[0].data
    return Enrolled(
        fact=_fact(event, event.type, event.occurred_at, data, (event,), tz),
        subject_id=str(data.get("subject_id") or event.subject_id),
        site_id=str(data["site_id"]),
        arm=str(data.get("arm") or "blinatumomab_dli"),
        cohort=str(data["cohort"]),
        age_years=float(data["age_years"]),
        weight_kg=float(data["weight_kg"]),
        transplant_date=_date(data["transplant_date"]),
        relapse_date=_date(data["relapse_date"]),
        eligibility=dict(data.get("eligibility") or {}),
        eligibility_override=data.get("eligibility_override") or None,
    )


def _live_ids(events: Mapping[int, StoredEvent]) -> set[int]:
    """Ids (by number) not retracted by a retraction that itself still counts."""
    retracted_by: dict[int, list[int]] = {}
    for e in events.values():
        if e.type == "retraction":
            retracted_by.setdefault(_uuid(e.data.get("retracts_event_id")).int, []).append(e.event_id.int)
    if not retracted_by:
        return set(events)
    memo: dict[int, bool] = {}

    def live(event_id: int, seen: frozenset[int]) -> bool:
        if event_id not in memo:
            by = [r for r in retracted_by.get(event_id, ()) if r not in seen]
            memo[event_id] = not any(live(r, seen | {event_id}) for r in by)
        return memo[event_id]

    return {i for i in events if live(i, frozenset())}


def _corrections_by_root(events: Mapping[int, StoredEvent], live: set[int]) -> dict[int, list[StoredEvent]]:
    by_root: dict[int, list[StoredEvent]] = {}
    for e in events.values():
        if e.type == "correction" and e.event_id.int in live:
            root = _root(e, events)
            if root is not None:
                by_root.setdefault(root, []).append(e)
    for chain in by_root.values():
        chain.sort(key=lambda c: (c.recorded_at, c.position))
    return by_root


def _root(correction: StoredEvent, events: Mapping[int, StoredEvent]) -> int | None:
    seen: set[int] = set()
    event: StoredEvent | None = correction
    while event is not None and event.type == "correction" and event.event_id.int not in seen:
        seen.add(event.event_id.int)
        event = events.get(_uuid(event.data.get("corrects_event_id")).int)
    if event is None or event.type not in OBSERVATION_TYPES:
        return None
    return event.event_id.int


def _effective(original: StoredEvent, corrections: list[StoredEvent] | None, tz: ZoneInfo) -> Fact:
    if not corrections:
        return _fact(original, original.type, original.occurred_at, original.data, (original,), tz)
    replacement = corrections[-1].data["replacement"]
    data = {k: v for k, v in replacement.items() if k not in _ENVELOPE_KEYS}
    occurred_at = _datetime(replacement["occurred_at"])
    return _fact(original, str(replacement["type"]), occurred_at, data, (original, *corrections), tz)


def _fact(
    original: StoredEvent, type_: str, occurred_at: datetime, data: Mapping[str, Any],
    causes: Sequence[StoredEvent], tz: ZoneInfo,
) -> Fact:
    cause_ids: tuple[uuid.UUID, ...]
    if len(causes) == 1:  # most events: no correction
        cause_ids, recorded_at = (original.event_id,), causes[0].recorded_at
    else:
        cause_ids, recorded_at = tuple(c.event_id for c in causes), max(c.recorded_at for c in causes)
    return Fact(
        event_id=original.event_id,
        type=type_,
        occurred_at=occurred_at,
        day=occurred_at.astimezone(tz).date(),
        position=original.position,
        data=dict(data),
        cause_ids=cause_ids,
        recorded_at=recorded_at,
    )


def _uuid(value: object) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        return uuid.UUID(int=0)


def _date(value: object) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def _datetime(value: object) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
