"""Who may be enrolled (the study's inclusion and exclusion criteria, CONTRACT.md section 2)."""

from __future__ import annotations

from services.ingest.domain.errors import FieldProblem
from shared.events import Enrolment

# Exclusion criteria: True makes a patient ineligible.
EXCLUSIONS = {
    "severe_infection": "a severe infection excludes the patient",
    "gvhd_grade_2_to_4": "grade II-IV GVHD excludes the patient",
    "organ_failure": "organ failure excludes the patient",
    "cns_leukemia": "CNS leukemia excludes the patient",
    "drug_allergy": "an allergy to the treatment regimen excludes the patient",
}


def failed_criteria(enrolment: Enrolment, *, max_age_years: float) -> list[FieldProblem]:
    """Every criterion the patient fails, each named by its path in the enrolment body.

    - Age above the protocol's ``max_age_years`` (65: "Age > 65 years old" excludes).
    - Vital signs must be stable (an inclusion criterion: ``false`` fails it).
    - Each exclusion criterion answered ``true`` fails.
    """
    failed = []
    if enrolment.age_years > max_age_years:
        failed.append(FieldProblem("age_years", f"age {enrolment.age_years:g} is above the "
                                                f"protocol's maximum of {max_age_years:g} years"))
    if not enrolment.eligibility.stable_vital_signs:
        failed.append(FieldProblem("eligibility.stable_vital_signs", "vital signs must be stable"))
    for name, message in EXCLUSIONS.items():
        if getattr(enrolment.eligibility, name):
            failed.append(FieldProblem(f"eligibility.{name}", message))
    return failed
