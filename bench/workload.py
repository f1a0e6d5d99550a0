"""Records for benchmarks and tests alike: enrolments and grade-0 labs, as bodies and NDJSON lines.

Tests import this module (not the other way round), so a benchmark and the test that guards the
same path send the same records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

AT = "2025-12-01T10:00:00+08:00"


def subject_ids(n: int, *, site: str = "S01", prefix: str = "B") -> list[str]:
    return [f"{site}-{prefix}{i:06d}" for i in range(n)]


def enrolment(subject_id: str, *, site: str = "S01", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "subject_id": subject_id, "site_id": site, "arm": "blinatumomab_dli",
        "enrolled_at": "2025-11-24T09:30:00+08:00", "age_years": 34, "weight_kg": 61.5,
        "cohort": "hematologic_relapse", "transplant_date": "2025-03-02", "relapse_date": "2025-11-20",
        "eligibility": {"stable_vital_signs": True, "severe_infection": False, "gvhd_grade_2_to_4": False,
                        "organ_failure": False, "cns_leukemia": False, "drug_allergy": False},
        "eligibility_override": None,
    }
    return body | changes


def lab(value: float = 4.0, *, at: str = AT, test: str = "neutrophils") -> dict[str, Any]:
    """A lab body; the default is grade 0 (a normal neutrophil count)."""
    return {"type": "lab", "occurred_at": at, "test": test, "value": value, "unit": "10^9/L"}


def import_lines(subjects: list[str], labs: int, *, enrol: bool = True, site: str = "S01") -> Iterator[dict[str, Any]]:
    """Bulk-import lines: each subject's enrolment (if ``enrol``), then ``labs`` labs spread over them."""
    if enrol:
        for s in subjects:
            yield {"type": "enrolment", **enrolment(s, site=site)}
    for k in range(labs):
        yield {"subject_id": subjects[k % len(subjects)], **lab(3.0 + (k % 50) / 10)}


def ndjson(lines: Iterator[dict[str, Any]] | list[dict[str, Any] | str]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()
