"""The patient fold: a patient's stream and the clock in, the patient's state and alerts out.

Pure (no I/O, no async): the same events and the same ``now`` always give the same state and the
same alerts, whatever order the events arrive in. The rules live beside the concept they govern:

- ``history.py``: corrections and retractions -> the effective history (CONTRACT.md section 2).
- ``treatment.py``: courses, day 1, when a course is finished; the DLI (DOMAIN.md e).
- ``windows.py``: the 2-week and 100-day windows, assessment deadlines (CONTRACT.md section 4).
- ``deviations.py``: protocol deviations (CONTRACT.md sections 2 and 4).
- ``alerts.py``: which alerts the history justifies now, with the label's actions (DOMAIN.md e, g).
- ``endpoints.py``: incidence endpoints and the outcome for the DSMB summary (CONTRACT.md section 3).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.clinical import alerts, endpoints
from shared.clinical.chart import Chart
from shared.clinical.deviations import Deviation, find_deviations, pending_deviation_times
from shared.clinical.history import Fact, NotEnrolledError, effective_history
from shared.clinical.records import PatientOutcome
from shared.clinical.treatment import treatment_from
from shared.clinical.windows import build_windows
from shared.events import AlertRaised, StoredEvent
from shared.lazy import lazy
from shared.protocol import Protocol

__all__ = ["NotEnrolledError", "PatientState", "fold_patient"]

CGVHD_SEVERITY = ("mild", "moderate", "severe")


def fold_patient(events: Sequence[StoredEvent], protocol: Protocol, *, now: datetime) -> PatientState:
    """Fold one patient's stream (any order) at ``now`` (a timezone-aware time)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    enrolment, facts = effective_history(events, protocol.tz)
    treatment = treatment_from(facts)
    chart = Chart(protocol, now, enrolment, facts, treatment, build_windows(protocol, enrolment, treatment),
                  last_recorded_at=max(e.recorded_at for e in events))
    return PatientState(chart, find_deviations(chart))


@dataclass(frozen=True)
class PatientState:
    chart: Chart
    deviations: tuple[Deviation, ...]

    @property
    def subject_id(self) -> str:
        return self.chart.enrolment.subject_id

    @property
    def site_id(self) -> str:
        return self.chart.enrolment.site_id

    @property
    def arm(self) -> str:
        return self.chart.enrolment.arm

    @property
    def status(self) -> str:
        return self.chart.status

    def desired_alerts(self) -> list[AlertRaised]:
        """Every alert this history justifies at ``now`` (alerts.py)."""
        return list(self._desired)

    @lazy
    def _desired(self) -> tuple[AlertRaised, ...]:
        # Computed once per fold: the monitor asks for the alerts, the held ones and the next due
        # moment (which asks for the held ones) of the same state.
        return tuple(alerts.desired_alerts(self.chart, self.deviations))

    def held_alert_ids(self) -> frozenset[uuid.UUID]:
        """Desired alerts not to raise yet: alerts on something missing while data entry has not
        settled (alerts.py). An open one stays open; the rest wait for ``next_due_at``."""
        return self._held

    @lazy
    def _held(self) -> frozenset[uuid.UUID]:  # the monitor asks for them, and ``next_due_at`` does
        if self.chart.settled:
            return frozenset()
        return frozenset(a.alert_id for a in self._desired if alerts.by_absence(a))

    def next_due_at(self) -> datetime | None:
        """The earliest moment after ``now`` at which the alerts change by time alone: an
        assessment falling overdue, a too-short course becoming finished, or the record settling
        while an alert on something missing waits for it (alerts.py)."""
        chart = self.chart
        if self.held_alert_ids():
            return chart.settled_at
        assessments = chart.of_type("assessment_completed")
        overdue = [
            w.overdue_from for w in chart.windows.values()
            if w.overdue_from is not None and w.overdue_from > chart.now
            and not w.assessed_by(assessments, w.overdue_from)
            and not (chart.left is not None and chart.left.occurred_at < w.overdue_from)
        ]
        return min([*overdue, *pending_deviation_times(chart)], default=None)

    def next_window_close_at(self) -> datetime | None:
        """The earliest moment after ``now`` at which a window closes: endpoints may become
        evaluable then (the stopping rules' evaluable counts change), though no alert does."""
        closes = [w.closes_at for w in self.chart.windows.values()
                  if w.closes_at is not None and w.closes_at > self.chart.now]
        return min(closes, default=None)

    def outcome(self) -> PatientOutcome:
        return endpoints.outcome(self.chart)

    def endpoint(self, name: str, *, count_withdrawn: bool = False, count_dead: bool = False) -> bool | None:
        """True: the event happened in its window; False: the window closed without it (or the
        patient left and the flags count them); None: not evaluable (endpoints.py)."""
        return endpoints.endpoint(self.chart, name, count_withdrawn=count_withdrawn, count_dead=count_dead)

    def endpoint_at(self, name: str, *, count_withdrawn: bool = False,
                    count_dead: bool = False) -> tuple[bool, datetime] | None:
        """As ``endpoint``, with the moment the patient became evaluable (stopping.py orders by it)."""
        return endpoints.endpoint_at(self.chart, name, count_withdrawn=count_withdrawn, count_dead=count_dead)

    def endpoint_unless_recorded(self, name: str, *, count_withdrawn: bool = False,
                                 count_dead: bool = False) -> tuple[bool, datetime, datetime | None] | None:
        """As ``endpoint_at`` if nothing more is recorded, with the moment it starts to hold (endpoints.py)."""
        return endpoints.endpoint_unless_recorded(self.chart, name, count_withdrawn=count_withdrawn,
                                                  count_dead=count_dead)

    def public(self) -> dict[str, Any]:
        """The JSON answer of ``GET /v1/patients/{id}`` (open alerts are added by the API)."""
        chart, enrolled = self.chart, self.chart.enrolment
        return {
            "subject_id": enrolled.subject_id,
            "site_id": enrolled.site_id,
            "arm": enrolled.arm,
            "cohort": enrolled.cohort,
            "enrolled_at": enrolled.fact.occurred_at.isoformat(),
            "age_years": enrolled.age_years,
            "weight_kg": enrolled.weight_kg,
            "transplant_date": enrolled.transplant_date.isoformat(),
            "relapse_date": enrolled.relapse_date.isoformat(),
            "status": chart.status,
            "death": _dated(chart.death, "cause"),
            "withdrawal": _dated(chart.withdrawal, "reason"),
            "courses": [c.public(chart.now >= chart.treatment.finished_at(c)) for c in chart.treatment.courses],
            "dli": _dli(chart),
            "windows": {name: w.public(chart.window_status(name)) for name, w in chart.windows.items()},
            "grades": _grades(chart),
            "deviations": [d.public() for d in self.deviations],
            "as_of": chart.now.isoformat(),
        }


def _dated(fact: Fact | None, key: str) -> dict[str, Any] | None:
    return {"date": fact.day.isoformat(), key: fact.data.get(key)} if fact is not None else None


def _dli(chart: Chart) -> dict[str, Any] | None:
    dli = chart.treatment.first_dli
    if dli is None:
        return None
    return {"date": dli.day.isoformat(), "mnc_per_kg": float(dli.data["mnc_per_kg"]),
            "count": len(chart.treatment.dlis)}


def _grades(chart: Chart) -> dict[str, Any]:
    def worst(type_: str, form: str | None = None) -> int | None:
        graded = [f.grade for f in chart.of_type(type_) if form is None or f.data.get("form") == form]
        return max(graded, default=None)

    chronic = [str(f.data.get("severity")) for f in chart.of_type("gvhd") if f.data.get("form") == "chronic"]
    labs = {str(f.data.get("test")): f.grade for f in chart.of_type("lab")}  # later ones win
    return {
        "crs_max": worst("crs"),
        "icans_max": worst("icans"),
        "agvhd_max": worst("gvhd", "acute"),
        "cgvhd_severity": max(chronic, key=_severity_rank, default=None),
        "infection_max": worst("infection"),
        "labs": labs,
    }


def _severity_rank(severity: str) -> int:
    return CGVHD_SEVERITY.index(severity) if severity in CGVHD_SEVERITY else -1
