"""What the patient was given: blinatumomab courses and donor lymphocyte infusions.

Rules (CONTRACT.md section 4; DOMAIN.md e):

- A course is the doses recorded with that ``course`` number. Its day 1 is the trial-zone day of its
  first dose (the earliest ``occurred_at``); its length is the highest infusion ``day`` recorded.
- A course is *finished* once a DLI or a later course's dose follows its last dose, or once 7 days
  have passed since its last dose (label: an interruption of more than 7 days starts a new cycle).
  The 7-day mark itself counts as finished, so a check scheduled at that moment sees the change.
- The DLI of the study is the first one recorded; later ones are listed but anchor nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.clinical.history import Fact

INTERRUPTION_STARTS_NEW_CYCLE = timedelta(days=7)  # blinatumomab label, DOMAIN.md e ("interruption > 7 days")


@dataclass(frozen=True)
class Course:
    number: int
    doses: tuple[Fact, ...]  # in clinical order, never empty

    @property
    def first_dose(self) -> Fact:
        return self.doses[0]

    @property
    def last_dose(self) -> Fact:
        return self.doses[-1]

    @property
    def day_numbers(self) -> list[int]:
        return [int(d.data["day"]) for d in self.doses]

    @property
    def length(self) -> int:
        return max(self.day_numbers)

    def public(self, finished: bool) -> dict[str, object]:
        days = self.day_numbers
        return {
            "course": self.number,
            "day1": self.first_dose.day.isoformat(),
            "first_day": min(days),
            "last_day": max(days),  # ``length``
            "days_dosed": len(set(days)),
            "doses": len(self.doses),
            "finished": finished,
        }


@dataclass(frozen=True)
class Treatment:
    courses: tuple[Course, ...]  # by course number
    dlis: tuple[Fact, ...]  # in clinical order

    @property
    def doses(self) -> tuple[Fact, ...]:
        return tuple(d for c in self.courses for d in c.doses)

    @property
    def first_dli(self) -> Fact | None:
        return self.dlis[0] if self.dlis else None

    def course(self, number: int) -> Course | None:
        return next((c for c in self.courses if c.number == number), None)

    def finished_at(self, course: Course) -> datetime:
        """The moment ``course`` counts as finished (see the module rules)."""
        last = course.last_dose.occurred_at
        followers = [f.occurred_at for f in self.dlis if f.occurred_at > last] + [
            d.occurred_at for c in self.courses if c.number > course.number
            for d in c.doses if d.occurred_at > last
        ]
        return min([last + INTERRUPTION_STARTS_NEW_CYCLE, *followers])

    def running_at(self, at: datetime) -> Course | None:
        """The course being given at ``at``: started, not yet finished."""
        return next(
            (c for c in reversed(self.courses)
             if c.first_dose.occurred_at <= at < self.finished_at(c)),
            None,
        )

    def started_by(self, at: datetime) -> Course | None:
        """The latest course whose first dose was given by ``at``."""
        started = [c for c in self.courses if c.first_dose.occurred_at <= at]
        return max(started, key=lambda c: c.first_dose.order, default=None)

    def last_dose_before(self, at: datetime) -> Fact | None:
        return max((d for d in self.doses if d.occurred_at <= at), key=lambda d: d.order, default=None)


def treatment_from(facts: tuple[Fact, ...]) -> Treatment:
    by_course: dict[int, list[Fact]] = {}
    for f in facts:
        if f.type == "blinatumomab_dose":
            by_course.setdefault(int(f.data["course"]), []).append(f)
    courses = tuple(Course(n, tuple(by_course[n])) for n in sorted(by_course))
    return Treatment(courses=courses, dlis=tuple(f for f in facts if f.type == "dli"))
