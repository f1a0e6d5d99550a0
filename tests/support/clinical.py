"""Request bodies for tests: a valid enrolment and the events of the study, by name."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

SHANGHAI = timezone(timedelta(hours=8))


def subject_id(site: str = "S01") -> str:
    return f"{site}-{uuid.uuid4().hex[:8]}"


def at(day: int, hour: int = 10, minute: int = 0, *, start: datetime | None = None) -> str:
    """Trial-zone time on study day ``day`` (day 1 = ``start``'s date)."""
    base = start or (datetime.now(SHANGHAI) - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (base + timedelta(days=day - 1, hours=hour, minutes=minute)).isoformat()


def enrolment(subject: str, *, site: str = "S01", cohort: str = "hematologic_relapse", arm: str = "blinatumomab_dli",
              enrolled_at: str | None = None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "subject_id": subject, "site_id": site, "arm": arm, "age_years": 34, "weight_kg": 61.5,
        "cohort": cohort, "transplant_date": "2025-03-02", "relapse_date": "2025-11-20",
        "eligibility": {"stable_vital_signs": True, "severe_infection": False, "gvhd_grade_2_to_4": False,
                        "organ_failure": False, "cns_leukemia": False, "drug_allergy": False},
        "eligibility_override": None,
    }
    if enrolled_at:
        body["enrolled_at"] = enrolled_at
    body.update(overrides)
    return body


def crs(occurred_at: str, grade: int) -> dict[str, Any]:
    return {"type": "crs", "occurred_at": occurred_at, "grade": grade}


def dose(occurred_at: str, *, course: int = 1, day: int = 1, dose_ug: float = 9.0) -> dict[str, Any]:
    return {"type": "blinatumomab_dose", "occurred_at": occurred_at, "course": course, "day": day, "dose_ug": dose_ug}
