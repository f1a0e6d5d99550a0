"""Plain records that cross from the patient fold to the reports and the stopping rules.

``PatientOutcome`` is what the DSMB summary needs of one patient at a data cutoff: dates for the
survival endpoints and one flag per incidence (``None`` while the patient is not evaluable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

INCIDENCE_NAMES = (
    "crs_any_2w",
    "crs_grade_3_plus_2w",
    "icans_any_2w",
    "infection_any_2w",
    "infection_grade_3_plus_2w",
    "heme_ae_grade_3_plus_2w",
    "agvhd_any_100d",
    "agvhd_grade_3_4_100d",
    "cgvhd_any_100d",
)
# Stopping-rule endpoints beyond the incidences: death not caused by relapse within 100 days of DLI.
ENDPOINT_NAMES = INCIDENCE_NAMES + ("nrm_100d",)


@dataclass(frozen=True)
class PatientOutcome:
    subject_id: str
    site_id: str
    arm: str  # blinatumomab_dli | usual_care
    cohort: str  # mrd_positive | hematologic_relapse
    enrolled_at: datetime
    # Time zero of OS and DFS: the day of the first blinatumomab dose (usual care: enrolment day).
    origin: date
    # The last day the patient was known alive (any recorded contact), or the death day.
    last_contact: date
    death_date: date | None = None
    death_cause: str | None = None
    relapse_date: date | None = None  # first relapse on or after origin (a DFS event)
    withdrawn_date: date | None = None
    courses: int = 0
    doses: int = 0
    dlis: int = 0
    dli_date: date | None = None
    # Acute GVHD onset after the DLI (any grade; grade II-IV), for the cumulative incidence.
    agvhd_onset: date | None = None
    agvhd_2_4_onset: date | None = None
    # The worst NIH 2014 global severity of chronic GVHD recorded (mild | moderate | severe), any time.
    cgvhd_severity: str | None = None
    # name (ENDPOINT_NAMES) -> True (event), False (evaluable, no event), None (not evaluable yet)
    endpoints: dict[str, bool | None] = field(default_factory=dict)
