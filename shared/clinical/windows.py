"""The 2-week and 100-day windows and their assessments (CONTRACT.md section 4; protocol ``windows``).

Rules:

- Days are trial-zone (``protocol.tz``) calendar days; day 1 is the anchor day.
- Anchors (protocol ``windows.<name>.anchor``): ``course1_start`` = the day of course 1's first dose;
  ``dli`` = the day of the (first) DLI. Usual-care patients get no blinatumomab: ``course1_start``
  anchors on the enrolment day, ``dli`` on the DLI if they got one, else on the enrolment day.
- A window covers days 1..``length_days`` (``start``..``end``); an event counts in it when its
  trial-zone day is in that range (day 14 23:59 is in, day 15 00:00 is out). It *closes* at the
  midnight that starts the day after ``end``.
- The assessment is due by ``end`` + ``grace_days`` (``due``); it is *overdue* from the midnight that
  starts the day after ``due`` (day 18 for the 2-week window, day 108 for the 100-day one) when no
  ``assessment_completed`` for the timepoint occurred before that moment and the patient neither
  died nor withdrew before it.
- Status: ``not_started`` (no anchor yet, or the window opens later), ``open`` (within days
  1..length), ``awaiting_assessment`` (window over, within grace), ``completed`` (an assessment of
  the timepoint is recorded, on time or late), ``overdue``, ``not_required`` (the patient died or
  withdrew before the assessment fell due, or before there was any anchor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from shared.clinical.history import Enrolled, Fact
from shared.clinical.treatment import Treatment
from shared.lazy import lazy
from shared.protocol import Protocol


@dataclass(frozen=True)
class Window:
    name: str
    anchor_fact: Fact | None
    length_days: int
    grace_days: int
    tz: ZoneInfo

    @lazy
    def anchor(self) -> date | None:
        return self.anchor_fact.day if self.anchor_fact else None

    @lazy
    def start(self) -> date | None:
        return self.anchor

    @lazy
    def end(self) -> date | None:
        return self.anchor + timedelta(days=self.length_days - 1) if self.anchor else None

    @lazy
    def due(self) -> date | None:
        return self.end + timedelta(days=self.grace_days) if self.end else None

    @lazy
    def closes_at(self) -> datetime | None:
        return self._midnight_after(self.end)

    @lazy
    def overdue_from(self) -> datetime | None:
        return self._midnight_after(self.due)

    def contains(self, day: date) -> bool:
        return self.start is not None and self.end is not None and self.start <= day <= self.end

    def assessed_by(self, assessments: Sequence[Fact], moment: datetime) -> bool:
        return any(a.occurred_at < moment for a in self._own(assessments))

    def is_overdue(self, assessments: Sequence[Fact], left: Fact | None, now: datetime) -> bool:
        deadline = self.overdue_from
        return (
            deadline is not None
            and now >= deadline
            and not self.assessed_by(assessments, deadline)
            and not (left is not None and left.occurred_at < deadline)
        )

    def status(self, assessments: Sequence[Fact], left: Fact | None, now: datetime) -> str:
        if self.anchor_fact is None or self.closes_at is None or self.overdue_from is None:
            return "not_required" if left is not None else "not_started"
        if self._own(assessments):
            return "completed"
        if left is not None and left.occurred_at < self.overdue_from:
            return "not_required"
        if now >= self.overdue_from:
            return "overdue"
        if now >= self.closes_at:
            return "awaiting_assessment"
        return "open" if self.anchor and now >= self._midnight(self.anchor) else "not_started"

    def public(self, status: str) -> dict[str, Any]:
        def iso(value: date | datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "anchor": iso(self.anchor), "start": iso(self.start), "end": iso(self.end),
            "due": iso(self.due), "overdue_from": iso(self.overdue_from), "status": status,
        }

    def _own(self, assessments: Sequence[Fact]) -> list[Fact]:
        """This timepoint's assessments made in the window or after it: one dated before the window
        opened (before the first dose, before the DLI) assessed something else."""
        return [a for a in assessments
                if a.data.get("timepoint") == self.name and self.anchor is not None and a.day >= self.anchor]

    def _midnight(self, day: date) -> datetime:
        return datetime.combine(day, time(0), tzinfo=self.tz)

    def _midnight_after(self, day: date | None) -> datetime | None:
        return self._midnight(day + timedelta(days=1)) if day is not None else None


def build_windows(protocol: Protocol, enrolment: Enrolled, treatment: Treatment) -> dict[str, Window]:
    return {
        name: Window(name, _anchor(plan.anchor, enrolment, treatment), plan.length_days,
                     plan.grace_days, protocol.tz)
        for name, plan in protocol.windows.items()
    }


def _anchor(kind: str, enrolment: Enrolled, treatment: Treatment) -> Fact | None:
    usual_care = enrolment.arm == "usual_care"
    if kind == "dli":
        return treatment.first_dli or (enrolment.fact if usual_care else None)
    if usual_care:
        return enrolment.fact
    course1 = treatment.course(1)
    return course1.first_dose if course1 else None
