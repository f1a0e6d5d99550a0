"""A patient's chart: everything the clinical rules read, built once per fold.

- ``facts`` is the effective history (``history.py``); ``treatment`` and ``windows`` are derived
  from it; ``now`` is the clock every time-dependent rule uses.
- The patient *leaves* the study at the first death or withdrawal (``left``); the status is
  ``dead`` after a death, ``withdrawn`` after a withdrawal, else ``on_study``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from shared.clinical.history import Enrolled, Fact
from shared.clinical.treatment import Treatment
from shared.clinical.windows import Window
from shared.lazy import lazy
from shared.protocol import CohortPlan, Protocol


@dataclass(frozen=True)
class Chart:
    protocol: Protocol
    now: datetime
    enrolment: Enrolled
    facts: tuple[Fact, ...]
    treatment: Treatment
    windows: Mapping[str, Window]
    last_recorded_at: datetime  # the latest event of the patient's stream, corrections included

    @property
    def settled(self) -> bool:
        """Whether data entry has been quiet long enough to judge what is missing (protocol ``entry``)."""
        return self.now >= self.settled_at

    @property
    def settled_at(self) -> datetime:
        return self.last_recorded_at + timedelta(seconds=self.protocol.entry.settle_seconds)

    def of_type(self, *types: str) -> tuple[Fact, ...]:
        if len(types) == 1:  # nearly every rule asks for one type, some of them many times a fold
            return self._by_type.get(types[0], ())
        return tuple(f for f in self.facts if f.type in types)

    def first(self, type_: str) -> Fact | None:
        found = self._by_type.get(type_)
        return found[0] if found else None

    @lazy
    def _by_type(self) -> dict[str, tuple[Fact, ...]]:
        """The facts of each type, in clinical order: ``facts`` is read once per fold."""
        grouped: dict[str, list[Fact]] = {}
        for fact in self.facts:
            grouped.setdefault(fact.type, []).append(fact)
        return {type_: tuple(facts) for type_, facts in grouped.items()}

    @lazy
    def death(self) -> Fact | None:
        return self.first("death")

    @lazy
    def withdrawal(self) -> Fact | None:
        return self.first("withdrawal")

    @lazy
    def left(self) -> Fact | None:
        """The first death or withdrawal: the moment the patient left the study."""
        exits = [f for f in (self.death, self.withdrawal) if f is not None]
        return min(exits, key=lambda f: f.order, default=None)

    @property
    def status(self) -> str:
        return "dead" if self.death else "withdrawn" if self.withdrawal else "on_study"

    @property
    def treated(self) -> bool:
        return self.enrolment.arm == "blinatumomab_dli"

    @property
    def plan(self) -> CohortPlan:
        return self.protocol.cohorts[self.enrolment.cohort]  # type: ignore[index]

    def window_status(self, name: str) -> str:
        return self.windows[name].status(self.of_type("assessment_completed"), self.left, self.now)

    def clinical_time(self, at: datetime) -> tuple[str, dict[str, Any]]:
        """Where ``at`` falls in the patient's course: the text and the numbers."""
        local = at.astimezone(self.protocol.tz)
        day = local.date()
        parts = [f"{local:%Y-%m-%d %H:%M} {self.protocol.trial.timezone}"]
        numbers: dict[str, Any] = {"date": day.isoformat()}
        course = self.treatment.started_by(at)
        dli = self.treatment.first_dli
        dli = dli if dli is not None and dli.occurred_at <= at else None
        if course is not None and (dli is None or dli.occurred_at < course.first_dose.occurred_at
                                   or self.treatment.running_at(at) is course):
            numbers.update(course=course.number, course_day=(day - course.first_dose.day).days + 1)
            parts.append(f"course {course.number} day {numbers['course_day']}")
        if dli is not None:
            numbers["days_after_dli"] = (day - dli.day).days
            parts.append(f"{numbers['days_after_dli']} days after DLI")
        if len(parts) == 1:
            numbers["days_after_enrolment"] = (day - self.enrolment.fact.day).days
            parts.append(f"{numbers['days_after_enrolment']} days after enrolment")
        return ", ".join(parts), numbers
