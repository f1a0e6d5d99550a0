"""Event schemas: the one contract the services meet through.

Two layers, as in eventsourcing's ``StoredEvent``:

- *bodies*: what clinical staff post (``type`` selects the kind; CONTRACT.md section 2). They are
  frozen pydantic v2 models in one discriminated union, ``ClinicalEventBody``.
- the *envelope*, ``StoredEvent``: id, stream, version, type, schema version, the two times, who
  recorded it, correlation and causation ids, and ``data`` (the body minus ``type`` and
  ``occurred_at``, plus derived grades).

Event types are stable strings, never Python import paths. Alert events (raised by the safety
service) live in their own streams (``alert-<alert_id>``) so that a patient's stream version is
moved only by what staff record.
"""

from __future__ import annotations

import re
import uuid
from datetime import date, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    model_validator,
)
from pydantic_core import PydanticCustomError

SCHEMA_VERSION = 1
SUBJECT_ID_PATTERN = r"^[A-Za-z0-9-]{1,32}$"
SubjectId = Annotated[str, Field(pattern=SUBJECT_ID_PATTERN)]
NAMESPACE = uuid.UUID("6f1c2a5e-3b7d-4c1e-9a57-2d6f0b8e4c11")

# --------------------------------------------------------------------------- field types
#
# FastAPI validates the decoded JSON in pydantic's lax python mode, which would take a Unix number
# for a time, "2025-03-02T00:00:00" for a date, true or "34" for an integer and "yes" for a boolean.
# Bodies take JSON's own types only (CONTRACT.md section 2): times and dates are ISO 8601 text.
# Python callers may still pass datetime and date objects.

# The study's era (CONTRACT.md section 2): clinical times (``occurred_at``, ``enrolled_at``) lie
# from STUDY_ERA_START (blinatumomab and this design did not exist before), a patient's history
# (``transplant_date``, ``relapse_date``) from HISTORY_ERA_START, and nothing from ERA_END on.
# Ingest also refuses the future against its clock (``services/ingest/domain/acceptance.py``).
STUDY_ERA_START = date(2000, 1, 1)
HISTORY_ERA_START = date(1990, 1, 1)
ERA_END = date(2100, 1, 1)

_ISO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _iso_time(value: object) -> object:
    if isinstance(value, datetime) or (isinstance(value, str) and _ISO_TIME.match(value)):
        return value
    raise PydanticCustomError("iso_time", "Input should be an ISO 8601 time with an offset as a string, "
                                          "e.g. 2025-11-24T09:30:00+08:00")


def _iso_date(value: object) -> object:
    if (isinstance(value, date) and not isinstance(value, datetime)) or (
            isinstance(value, str) and _ISO_DATE.match(value)):
        return value
    raise PydanticCustomError("iso_date", "Input should be a date as a YYYY-MM-DD string")


def _era(start: date) -> Any:
    """A check that a date or time (read on its own clock: no conversion can overflow) lies in
    [start, ERA_END)."""

    def check(value: date) -> date:
        day = value.date() if isinstance(value, datetime) else value
        if not start <= day < ERA_END:
            raise PydanticCustomError("outside_era", "{value} is outside the study's era ({start} to {end})",
                                      {"value": value.isoformat(), "start": start.isoformat(),
                                       "end": (ERA_END - timedelta(days=1)).isoformat()})
        return value

    return check


def _one_line(value: str) -> str:
    """Identifiers and short labels: printable, on one line (no tab, newline or invisible format
    character; the JSON reader already refuses other control characters)."""
    if not value.isprintable():
        raise PydanticCustomError("not_printable", "Input should be printable text on one line")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank_string", "Input should not be blank")
    return value


IsoTime = Annotated[AwareDatetime, BeforeValidator(_iso_time), AfterValidator(_era(STUDY_ERA_START))]
IsoDate = Annotated[date, BeforeValidator(_iso_date), AfterValidator(_era(HISTORY_ERA_START))]
Integer = Annotated[int, Strict()]  # no booleans, no numeric strings, no 2.0
Number = Annotated[float, Strict()]  # an int or a float; no strings, no booleans
Flag = Annotated[bool, Strict()]  # true or false only
Text = Annotated[str, AfterValidator(_not_blank)]
Label = Annotated[str, AfterValidator(_one_line)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


# --------------------------------------------------------------------------- enrolment


class Eligibility(Frozen):
    """The seed protocol's criteria; ``True`` on an exclusion criterion makes a patient ineligible."""

    stable_vital_signs: Flag
    severe_infection: Flag
    gvhd_grade_2_to_4: Flag
    organ_failure: Flag
    cns_leukemia: Flag
    drug_allergy: Flag


class EligibilityOverride(Frozen):
    """Who enrolled an ineligible patient anyway, and why: both must say something."""

    reason: Text = Field(min_length=1, max_length=2000)
    approved_by: Annotated[Text, AfterValidator(_one_line)] = Field(min_length=1, max_length=200)


Cohort = Literal["mrd_positive", "hematologic_relapse"]
Arm = Literal["blinatumomab_dli", "usual_care"]


class Enrolment(Frozen):
    subject_id: SubjectId
    site_id: Label = Field(min_length=1, max_length=32)
    arm: Arm = "blinatumomab_dli"
    enrolled_at: IsoTime | None = None
    age_years: Number = Field(ge=0, le=120)
    weight_kg: Number = Field(gt=0, le=400)
    cohort: Cohort
    transplant_date: IsoDate
    relapse_date: IsoDate
    eligibility: Eligibility
    eligibility_override: EligibilityOverride | None = None

    @model_validator(mode="after")
    def _dates_in_order(self) -> Enrolment:
        if self.relapse_date < self.transplant_date:
            raise ValueError("relapse_date is before transplant_date")
        return self


# --------------------------------------------------------------------------- clinical bodies


class _Body(Frozen):
    occurred_at: IsoTime


# Plausible ranges (README, "Plausible values"): wide enough for every value a clinic records,
# a real overdose included, narrow enough to refuse a unit slip by orders of magnitude or 1e308.
MAX_DOSE_UG = 10_000.0  # µg a day: 28 µg is the adult dose; the label reports a 133-fold overdose
MAX_MNC_PER_KG = 1e10  # cells/kg: 100 times the protocol's highest DLI (1e8)


class BlinatumomabDose(_Body):
    type: Literal["blinatumomab_dose"]
    course: Integer = Field(ge=1, le=2)
    day: Integer = Field(ge=1, le=28)
    dose_ug: Number = Field(gt=0, le=MAX_DOSE_UG)


class Dli(_Body):
    type: Literal["dli"]
    mnc_per_kg: Number = Field(gt=0, le=MAX_MNC_PER_KG)


Oxygen = Literal[
    "none",
    "low_flow_nasal_cannula",
    "high_flow_nasal_cannula",
    "facemask",
    "nonrebreather",
    "venturi",
    "cpap",
    "bipap",
    "mechanical_ventilation",
]


class Crs(_Body):
    """A grade 1-4, or the ASTCT observations the grade is derived from.

    Deriving a grade takes all of ``OBSERVATIONS`` (ingest refuses a derived grade without them);
    ``vasopressin`` and ``anticytokine_given`` are optional.
    """

    OBSERVATIONS: ClassVar[tuple[str, ...]] = ("max_temp_c", "hypotension", "vasopressors", "oxygen")
    OPTIONAL_OBSERVATIONS: ClassVar[tuple[str, ...]] = ("vasopressin", "anticytokine_given")

    type: Literal["crs"]
    grade: Integer | None = Field(default=None, ge=1, le=4)
    max_temp_c: Number | None = Field(default=None, ge=30, le=45)
    hypotension: Flag | None = None
    vasopressors: Integer | None = Field(default=None, ge=0, le=10)
    vasopressin: Flag | None = None
    oxygen: Oxygen | None = None
    anticytokine_given: Flag | None = None

    @property
    def has_observations(self) -> bool:
        return any(getattr(self, name) is not None for name in self.OBSERVATIONS)

    @property
    def given_observations(self) -> tuple[str, ...]:
        """The observation fields this body carries, in the schema's order."""
        return tuple(n for n in (*self.OBSERVATIONS, *self.OPTIONAL_OBSERVATIONS) if getattr(self, n) is not None)

    @model_validator(mode="after")
    def _grade_or_observations(self) -> Crs:
        if self.grade is None and not self.has_observations:
            raise ValueError("give either grade (1-4) or the observations max_temp_c, "
                             "hypotension, vasopressors and oxygen")
        if self.grade is None and self.max_temp_c is None and not self.anticytokine_given:
            raise ValueError("max_temp_c is required to grade CRS unless anticytokine_given")
        return self


Consciousness = Literal["alert", "awakens_spontaneously", "awakens_to_voice", "awakens_to_touch", "unarousable"]
Seizure = Literal["none", "resolved", "prolonged_or_repetitive"]
RaisedIcp = Literal["none", "focal_edema", "diffuse_edema_or_signs"]


class Icans(_Body):
    """A grade 1-4, or the ASTCT 2019 bedside findings the grade is derived from (0: no ICANS).

    Deriving a grade takes all of ``FINDINGS`` (ingest names each one missing); the other domains
    (``OPTIONAL_FINDINGS``) count as absent when not given. An unarousable patient cannot perform
    the ICE assessment (ASTCT: "0, patient is unarousable and unable to perform ICE"), so
    ``unarousable`` goes with ``ice_score`` 0 or none given, which is then read as 0.

    Stored data keeps its shape (``grade``, ``scale``, plus the findings as given), so events
    recorded with a bare grade before findings were taken fold unchanged: no upcast, schema 1.
    """

    FINDINGS: ClassVar[tuple[str, ...]] = ("ice_score", "consciousness")
    OPTIONAL_FINDINGS: ClassVar[tuple[str, ...]] = ("seizure", "motor_weakness", "raised_icp")

    type: Literal["icans"]
    grade: Integer | None = Field(default=None, ge=1, le=4)
    ice_score: Integer | None = Field(default=None, ge=0, le=10)
    consciousness: Consciousness | None = None
    seizure: Seizure | None = None
    motor_weakness: Flag | None = None
    raised_icp: RaisedIcp | None = None

    @property
    def has_findings(self) -> bool:
        return bool(self.given_findings)

    @property
    def missing_findings(self) -> tuple[str, ...]:
        """Of ``FINDINGS``, those not given (the ICE score is not missing for an unarousable patient)."""
        unarousable = self.consciousness == "unarousable"
        return tuple(n for n in self.FINDINGS
                     if getattr(self, n) is None and not (n == "ice_score" and unarousable))

    @property
    def has_all_findings(self) -> bool:
        return not self.missing_findings

    @property
    def given_findings(self) -> tuple[str, ...]:
        """The finding fields this body carries, in the schema's order."""
        return tuple(n for n in (*self.FINDINGS, *self.OPTIONAL_FINDINGS) if getattr(self, n) is not None)

    @model_validator(mode="after")
    def _grade_or_findings(self) -> Icans:
        if self.grade is None and not self.has_findings:
            raise ValueError("give either grade (1-4) or the bedside findings ice_score and consciousness "
                             "(optionally seizure, motor_weakness, raised_icp)")
        if self.consciousness == "unarousable" and self.ice_score:
            raise ValueError(f"ice_score {self.ice_score} cannot go with consciousness unarousable: an "
                             "unarousable patient cannot perform the ICE assessment (ICE score 0)")
        return self


class OrganScores(Frozen):
    """NIH 2014 chronic GVHD organ scores, 0-3 each (0 none ... 3 major disability); an organ
    left out is not involved (0)."""

    skin: Integer | None = Field(default=None, ge=0, le=3)
    mouth: Integer | None = Field(default=None, ge=0, le=3)
    eyes: Integer | None = Field(default=None, ge=0, le=3)
    gi: Integer | None = Field(default=None, ge=0, le=3)
    liver: Integer | None = Field(default=None, ge=0, le=3)
    lungs: Integer | None = Field(default=None, ge=0, le=3)
    joints_fascia: Integer | None = Field(default=None, ge=0, le=3)
    genital: Integer | None = Field(default=None, ge=0, le=3)

    def scores(self) -> dict[str, int]:
        """Every organ's score, 0 for one left out."""
        return {name: getattr(self, name) or 0 for name in type(self).model_fields}


class Gvhd(_Body):
    """Acute: a MAGIC grade 1-4 or the organ findings; chronic: the NIH global severity, or the
    NIH 2014 organ scores it is derived from (stored beside ``severity``; a chronic event stored
    with a bare severity has the same shape, so it folds unchanged: no upcast, schema 1)."""

    FINDINGS: ClassVar[tuple[str, ...]] = ("skin_bsa_pct", "bullae", "bilirubin_mg_dl", "upper_gi", "stool_ml_day",
                                           "severe_abdominal_pain")

    type: Literal["gvhd"]
    form: Literal["acute", "chronic"]
    grade: Integer | None = Field(default=None, ge=1, le=4)
    skin_bsa_pct: Number | None = Field(default=None, ge=0, le=100)
    bullae: Flag | None = None
    bilirubin_mg_dl: Number | None = Field(default=None, ge=0, le=100)
    upper_gi: Flag | None = None
    stool_ml_day: Number | None = Field(default=None, ge=0, le=20000)
    severe_abdominal_pain: Flag | None = None
    severity: Literal["mild", "moderate", "severe"] | None = None
    organ_scores: OrganScores | None = None

    @property
    def has_findings(self) -> bool:
        return bool(self.given_findings)

    @property
    def given_findings(self) -> tuple[str, ...]:
        """The organ-finding fields this body carries, in the schema's order."""
        return tuple(n for n in self.FINDINGS if getattr(self, n) is not None)

    @model_validator(mode="after")
    def _form_fields(self) -> Gvhd:
        problem = self._acute_problem() if self.form == "acute" else self._chronic_problem()
        if problem:
            raise ValueError(problem)
        return self

    def _acute_problem(self) -> str | None:
        chronic = next((n for n in ("severity", "organ_scores") if getattr(self, n) is not None), None)
        if chronic:
            return f"{chronic} is for chronic GVHD; acute GVHD takes grade or organ findings"
        if self.grade is None and not self.has_findings:
            return ("acute GVHD needs grade (1-4) or organ findings (skin_bsa_pct, bullae, bilirubin_mg_dl, "
                    "upper_gi, stool_ml_day, severe_abdominal_pain)")
        return None

    def _chronic_problem(self) -> str | None:
        if self.severity is None and self.organ_scores is None:
            return "chronic GVHD needs severity (mild, moderate, severe) or organ_scores"
        acute = next((n for n in ("grade", *self.given_findings) if getattr(self, n) is not None), None)
        if acute:
            return f"{acute} is for acute GVHD; chronic GVHD takes severity or organ_scores"
        if self.organ_scores is not None and not any(self.organ_scores.scores().values()):
            return "organ_scores need at least one organ scored above 0 (all 0 is no chronic GVHD)"
        return None


class Infection(_Body):
    type: Literal["infection"]
    grade: Integer = Field(ge=1, le=5)
    site: Label = Field(min_length=1, max_length=200)
    organism: Label | None = Field(default=None, max_length=200)


LabTest = Literal["neutrophils", "platelets", "hemoglobin", "wbc", "lymphocytes"]
LabUnit = Literal["10^9/L", "cells/mm3", "g/dL", "g/L"]
COUNT_UNITS = ("10^9/L", "cells/mm3")
HEMOGLOBIN_UNITS = ("g/dL", "g/L")
# The highest plausible lab value per unit (value and lln): counts up to 5000 x 10^9/L (extreme
# leukocytosis or thrombocytosis stays below), hemoglobin up to 30 g/dL.
LAB_MAXIMUM = {"10^9/L": 5_000.0, "cells/mm3": 5_000_000.0, "g/dL": 30.0, "g/L": 300.0}


class Lab(_Body):
    type: Literal["lab"]
    test: LabTest
    value: Number = Field(ge=0, le=max(LAB_MAXIMUM.values()))
    unit: LabUnit
    lln: Number | None = Field(default=None, gt=0, le=max(LAB_MAXIMUM.values()))

    @model_validator(mode="after")
    def _unit_fits_test(self) -> Lab:
        allowed = HEMOGLOBIN_UNITS if self.test == "hemoglobin" else COUNT_UNITS
        if self.unit not in allowed:
            raise ValueError(f"unit {self.unit!r} does not fit test {self.test!r}; use one of {list(allowed)}")
        most = LAB_MAXIMUM[self.unit]
        for name in ("value", "lln"):
            if (given := getattr(self, name)) is not None and given > most:
                raise ValueError(f"{name} {given:g} {self.unit} is above the plausible {most:g} {self.unit}")
        return self


class DiseaseAssessment(_Body):
    type: Literal["disease_assessment"]
    mrd: Literal["positive", "negative"]
    response: Literal["cr", "cri", "pr", "nr"]


class Relapse(_Body):
    type: Literal["relapse"]


class AssessmentCompleted(_Body):
    type: Literal["assessment_completed"]
    timepoint: Literal["day14", "day100"]


class Death(_Body):
    type: Literal["death"]
    cause: Literal["relapse", "infection", "gvhd", "crs", "other"]


class FollowUp(_Body):
    type: Literal["follow_up"]


class Withdrawal(_Body):
    type: Literal["withdrawal"]
    reason: str = Field(min_length=1, max_length=2000)


ObservationBody = Annotated[
    BlinatumomabDose | Dli | Crs | Icans | Gvhd | Infection | Lab | DiseaseAssessment | Relapse | AssessmentCompleted | Death | FollowUp | Withdrawal,
    Field(discriminator="type"),
]


class Correction(_Body):
    type: Literal["correction"]
    corrects_event_id: uuid.UUID
    reason: str = Field(min_length=1, max_length=2000)
    replacement: ObservationBody


class Retraction(_Body):
    type: Literal["retraction"]
    retracts_event_id: uuid.UUID
    reason: str = Field(min_length=1, max_length=2000)


ClinicalEventBody = Annotated[
    BlinatumomabDose | Dli | Crs | Icans | Gvhd | Infection | Lab | DiseaseAssessment | Relapse | AssessmentCompleted | Death | FollowUp | Withdrawal | Correction | Retraction,
    Field(discriminator="type"),
]

CLINICAL_TYPES = frozenset(
    ["blinatumomab_dose", "dli", "crs", "icans", "gvhd", "infection", "lab", "disease_assessment",
     "relapse", "assessment_completed", "death", "follow_up", "withdrawal", "correction", "retraction"]
)
OBSERVATION_TYPES = CLINICAL_TYPES - {"correction", "retraction"}

# --------------------------------------------------------------------------- alerts

PATIENT_ENROLLED = "patient_enrolled"
ALERT_RAISED = "safety_alert_raised"
STOPPING_BOUNDARY_CROSSED = "stopping_boundary_crossed"
ALERT_WITHDRAWN = "safety_alert_withdrawn"
ALERT_ACKNOWLEDGED = "alert_acknowledged"
ALERT_TYPES = frozenset([ALERT_RAISED, STOPPING_BOUNDARY_CROSSED, ALERT_WITHDRAWN, ALERT_ACKNOWLEDGED])

# A request for the DSMB summary now (POST /v1/digests), consumed by the notifier.
DIGEST_REQUESTED = "digest_requested"
DIGEST_STREAM = "digests"

Severity = Literal["urgent", "high", "info"]
Audience = Literal["investigators", "investigators_and_dsmb"]


class AlertRaised(Frozen):
    """The data of ``safety_alert_raised`` and ``stopping_boundary_crossed`` events.

    ``alert_id`` is deterministic (``alert_id_for``): the same cause always gives the same id, so a
    replay or redelivery can never raise a second alert for it.
    """

    alert_id: uuid.UUID
    kind: str
    severity: Severity
    audience: Audience = "investigators"
    subject_id: str | None = None
    site_id: str | None = None
    title: str
    detail: str
    action: str = ""
    rule: str
    cause_event_ids: tuple[uuid.UUID, ...] = ()
    cause_occurred_at: datetime | None = None
    cause_recorded_at: datetime | None = None
    facts: dict[str, Any] = Field(default_factory=dict)


class AlertWithdrawn(Frozen):
    alert_id: uuid.UUID
    kind: str
    severity: Severity
    audience: Audience = "investigators"
    subject_id: str | None = None
    site_id: str | None = None
    title: str
    reason: str


class AlertAcknowledged(Frozen):
    alert_id: uuid.UUID
    note: str | None = None


def alert_id_for(*parts: object) -> uuid.UUID:
    """A stable alert id from the alert's cause (subject, rule, cause key...)."""
    return uuid.uuid5(NAMESPACE, "|".join(str(p) for p in parts))


def alert_stream(alert_id: uuid.UUID | str) -> str:
    return f"alert-{alert_id}"


def patient_stream(subject_id: str) -> str:
    return f"patient-{subject_id}"


# --------------------------------------------------------------------------- envelope


class NewEvent(Frozen):
    """An event about to be appended; the store gives it a position and a version."""

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    type: str
    subject_id: str | None = None
    occurred_at: AwareDatetime
    recorded_by: str
    data: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    correlation_id: uuid.UUID | None = None
    causation_id: uuid.UUID | None = None


class StoredEvent(Frozen):
    """An event as stored; ``public()`` is the contract's answer shape."""

    position: int
    event_id: uuid.UUID
    stream_id: str
    stream_version: int
    type: str
    schema_version: int = SCHEMA_VERSION
    subject_id: str | None
    occurred_at: AwareDatetime
    recorded_at: AwareDatetime
    recorded_by: str
    data: dict[str, Any]
    correlation_id: uuid.UUID | None = None
    causation_id: uuid.UUID | None = None

    def public(self) -> dict[str, Any]:
        return {
            "event_id": str(self.event_id),
            "subject_id": self.subject_id,
            "type": self.type,
            "stream_version": self.stream_version,
            "occurred_at": self.occurred_at.isoformat(),
            "recorded_at": self.recorded_at.isoformat(),
            "recorded_by": self.recorded_by,
            "data": self.data,
        }

    def to_message(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
