"""Enrolment, treatment exposure and the deaths listing of the DSMB summary (DOMAIN §g, open session).

Counts are by arm; cohort and site tables are cross-tabulated by arm so the closed session can read
them per arm. The deaths listing names patients by subject id only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.clinical.records import PatientOutcome


@dataclass(frozen=True)
class Exposure:
    arm: str  # an arm, or "all"
    patients: int
    courses: int
    doses: int
    dlis: int
    patients_with_dli: int


@dataclass(frozen=True)
class Death:
    subject_id: str
    arm: str
    site_id: str
    day: int  # days from the survival origin
    cause: str | None


def enrolled_by_arm(patients: Sequence[PatientOutcome], arms: Sequence[str]) -> dict[str, int]:
    return {arm: sum(1 for p in patients if p.arm == arm) for arm in arms}


def cross_tab(
    patients: Sequence[PatientOutcome], arms: Sequence[str], attribute: str
) -> dict[str, dict[str, int]]:
    """{value of ``attribute`` (cohort, site_id): {arm: patients}}, values sorted."""
    values = sorted({getattr(p, attribute) for p in patients})
    return {
        value: {arm: sum(1 for p in patients if p.arm == arm and getattr(p, attribute) == value) for arm in arms}
        for value in values
    }


def exposure(arm: str, patients: Sequence[PatientOutcome]) -> Exposure:
    return Exposure(
        arm,
        len(patients),
        sum(p.courses for p in patients),
        sum(p.doses for p in patients),
        sum(p.dlis for p in patients),
        sum(1 for p in patients if p.dli_date is not None or p.dlis > 0),
    )


def exposures(patients: Sequence[PatientOutcome], arms: Sequence[str]) -> tuple[Exposure, ...]:
    per_arm = [exposure(arm, [p for p in patients if p.arm == arm]) for arm in arms]
    return (*per_arm, exposure("all", patients))


def deaths(patients: Sequence[PatientOutcome]) -> tuple[Death, ...]:
    listed = [
        Death(p.subject_id, p.arm, p.site_id, max(0, (p.death_date - p.origin).days), p.death_cause)
        for p in patients
        if p.death_date is not None
    ]
    return tuple(sorted(listed, key=lambda d: (d.arm, d.day, d.subject_id)))
