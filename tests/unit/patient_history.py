"""Writing a patient's stream for the fold tests: each method records one event, as the ingest would.

Times are trial-zone (Asia/Shanghai) wall-clock times; ids are random; positions and recorded_at
increase with every event recorded.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from shared.clinical.patient import PatientState, fold_patient
from shared.events import AlertRaised, StoredEvent, patient_stream
from shared.protocol import load_protocol

PROTOCOL = load_protocol()
TZ = ZoneInfo("Asia/Shanghai")
ELIGIBLE = {"stable_vital_signs": True, "severe_infection": False, "gvhd_grade_2_to_4": False,
            "organ_failure": False, "cns_leukemia": False, "drug_allergy": False}


def at(day: date, hour: int = 9, minute: int = 0, second: int = 0) -> datetime:
    """A trial-zone wall-clock time on ``day``."""
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=TZ)


def midnight(day: date) -> datetime:
    return at(day, 0)


class History:
    def __init__(self, *, arm: str = "blinatumomab_dli", cohort: str = "hematologic_relapse",
                 enrolled: date = date(2025, 3, 3), weight_kg: float = 61.5, age_years: float = 34,
                 override: dict[str, str] | None = None) -> None:
        self.subject_id = f"S-{uuid.uuid4().hex[:8]}"
        self.cohort = cohort
        self.events: list[StoredEvent] = []
        self._recorded = datetime(2025, 1, 1, tzinfo=UTC)
        self.enrolment = self.record("patient_enrolled", at(enrolled, 8), {
            "subject_id": self.subject_id, "site_id": "S01", "arm": arm, "age_years": age_years,
            "weight_kg": weight_kg, "cohort": cohort, "transplant_date": "2024-06-02",
            "relapse_date": "2025-02-20", "eligibility": ELIGIBLE, "eligibility_override": override,
        })

    # ------------------------------------------------------------------ recording

    def record(self, type_: str, occurred_at: datetime, data: dict[str, Any]) -> StoredEvent:
        self._recorded = max(self._recorded + timedelta(seconds=1), occurred_at + timedelta(minutes=5))
        event = StoredEvent(
            position=len(self.events) + 1, event_id=uuid.uuid4(), stream_id=patient_stream(self.subject_id),
            stream_version=len(self.events) + 1, type=type_, subject_id=self.subject_id,
            occurred_at=occurred_at, recorded_at=self._recorded, recorded_by="nurse@S01", data=data,
        )
        self.events.append(event)
        return event

    def enter_late(self, on: datetime) -> None:
        """The next events are recorded no earlier than ``on`` (data entered late)."""
        self._recorded = max(self._recorded, on)

    def dose(self, course: int, day: int, when: datetime, dose_ug: float | None = None) -> StoredEvent:
        if dose_ug is None:
            dose_ug = PROTOCOL.cohorts[self.cohort].doses_for(course, day)[0]  # type: ignore[index]
        return self.record("blinatumomab_dose", when, {"course": course, "day": day, "dose_ug": dose_ug})

    def course(self, number: int, day1: date, days: int) -> list[StoredEvent]:
        """Daily doses on schedule, days 1..``days``, each at 09:00."""
        return [self.dose(number, d, at(day1 + timedelta(days=d - 1))) for d in range(1, days + 1)]

    def dli(self, when: datetime, mnc_per_kg: float = 7.5e7) -> StoredEvent:
        return self.record("dli", when, {"mnc_per_kg": mnc_per_kg})

    def crs(self, when: datetime, grade: int, **observations: Any) -> StoredEvent:
        return self.record("crs", when, {"grade": grade, "scale": "ASTCT-2019", **observations})

    def icans(self, when: datetime, grade: int) -> StoredEvent:
        return self.record("icans", when, {"grade": grade, "scale": "ASTCT-2019"})

    def agvhd(self, when: datetime, grade: int) -> StoredEvent:
        return self.record("gvhd", when, {"form": "acute", "grade": grade, "scale": "MAGIC-2016"})

    def cgvhd(self, when: datetime, severity: str = "moderate") -> StoredEvent:
        return self.record("gvhd", when, {"form": "chronic", "severity": severity, "scale": "NIH-2014"})

    def infection(self, when: datetime, grade: int, site: str = "lung") -> StoredEvent:
        return self.record("infection", when, {"grade": grade, "site": site, "scale": "CTCAE-5.0"})

    def lab(self, when: datetime, test: str, value: float, grade: int, unit: str = "10^9/L") -> StoredEvent:
        return self.record("lab", when, {"test": test, "value": value, "unit": unit, "lln": 1.8,
                                         "grade": grade, "scale": "CTCAE-5.0"})

    def assessment(self, when: datetime, timepoint: str) -> StoredEvent:
        return self.record("assessment_completed", when, {"timepoint": timepoint})

    def death(self, when: datetime, cause: str = "infection") -> StoredEvent:
        return self.record("death", when, {"cause": cause})

    def withdrawal(self, when: datetime, reason: str = "consent withdrawn") -> StoredEvent:
        return self.record("withdrawal", when, {"reason": reason})

    def relapse(self, when: datetime) -> StoredEvent:
        return self.record("relapse", when, {})

    def follow_up(self, when: datetime) -> StoredEvent:
        return self.record("follow_up", when, {})

    def correct(self, event: StoredEvent, *, occurred_at: datetime | None = None, **data: Any) -> StoredEvent:
        """Replace ``event`` by the same type with ``data`` merged in."""
        when = occurred_at or event.occurred_at
        replacement = {**event.data, **data, "type": event.type, "occurred_at": when.isoformat()}
        return self.record("correction", at(when.date() + timedelta(days=1)), {
            "corrects_event_id": str(event.event_id), "reason": "transcription error",
            "replacement": replacement})

    def retract(self, event: StoredEvent) -> StoredEvent:
        return self.record("retraction", event.occurred_at + timedelta(hours=1), {
            "retracts_event_id": str(event.event_id), "reason": "entered for the wrong patient"})

    # ------------------------------------------------------------------ reading

    def fold(self, now: datetime) -> PatientState:
        return fold_patient(self.events, PROTOCOL, now=now)


def kinds(state: PatientState) -> list[str]:
    return sorted(a.kind for a in state.desired_alerts())


def only(state: PatientState, kind: str) -> AlertRaised:
    found = [a for a in state.desired_alerts() if a.kind == kind]
    assert len(found) == 1, f"expected one {kind} alert, got {[a.kind for a in state.desired_alerts()]}"
    return found[0]


def deviation_codes(state: PatientState) -> list[str]:
    return sorted(d["code"] for d in state.public()["deviations"])
