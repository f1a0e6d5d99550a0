"""ICANS and chronic GVHD in the patient fold: alerts, actions and endpoints follow the derived grade
and severity (data built by the ingest's own ``derive_data``), and events stored before findings were
taken (a bare grade or severity) fold as they always did."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

import pytest
from pydantic import TypeAdapter

from shared.clinical.grading import derive_data
from shared.events import ClinicalEventBody, StoredEvent, alert_id_for
from tests.unit.patient_history import PROTOCOL, History, at, kinds, only

DAY1 = date(2025, 3, 5)
_BODY = TypeAdapter(ClinicalEventBody)


def day(n: int) -> date:
    return DAY1 + timedelta(days=n - 1)


def on_course() -> History:
    h = History()
    h.course(1, DAY1, 10)
    return h


def posted(h: History, type_: str, when: datetime, **fields: Any) -> StoredEvent:
    """Record a body as the ingest stores it: the derived grade or severity beside the findings."""
    body = _BODY.validate_python({"type": type_, "occurred_at": when.isoformat(), **fields})
    return h.record(type_, when, derive_data(body, PROTOCOL))


NOW = at(day(16))  # the 2-week window has closed


def test_icans_derived_grade_0_raises_nothing_and_does_not_count_toward_the_incidence() -> None:
    h = on_course()
    posted(h, "icans", at(day(5)), ice_score=10, consciousness="alert")
    state = h.fold(NOW)
    assert [k for k in kinds(state) if k.startswith("icans")] == []
    assert state.endpoint("icans_any_2w") is False
    assert state.public()["grades"]["icans_max"] == 0


def test_icans_derived_grade_1_counts_toward_the_incidence_and_is_info() -> None:
    h = on_course()
    event = posted(h, "icans", at(day(5)), ice_score=9, consciousness="alert")
    state = h.fold(NOW)
    alert = only(state, "icans_low_grade")
    assert alert.severity == "info" and alert.alert_id == alert_id_for(h.subject_id, "icans_low_grade",
                                                                       f"{event.event_id}|grade 1")
    assert "derived ASTCT grade 1 from ICE 9/10, alert" in alert.detail
    assert state.endpoint("icans_any_2w") is True


def test_icans_grade_4_from_a_prolonged_seizure_means_permanent_discontinuation() -> None:
    h = on_course()
    posted(h, "icans", at(day(9)), ice_score=5, consciousness="awakens_to_voice", seizure="prolonged_or_repetitive")
    alert = only(h.fold(NOW), "icans_grade_3_plus")
    assert alert.title == "Grade 4 ICANS" and alert.severity == "urgent"
    assert "Discontinue blinatumomab permanently" in alert.action and "within 24 h" in alert.action


def test_a_second_seizure_means_permanent_discontinuation_even_at_grade_3() -> None:
    """Label (DOMAIN.md e): "Discontinue permanently if more than one seizure occurs"."""
    h = on_course()
    posted(h, "icans", at(day(8)), ice_score=8, consciousness="alert", seizure="resolved")
    second = posted(h, "icans", at(day(10)), ice_score=9, consciousness="alert", seizure="resolved")
    alerts = [a for a in h.fold(NOW).desired_alerts() if a.kind == "icans_grade_3_plus"]
    first_alert, second_alert = sorted(alerts, key=lambda a: a.cause_occurred_at or NOW)
    assert "Withhold blinatumomab" in first_alert.action and first_alert.facts["seizures"] == 1
    assert second_alert.cause_event_ids == (second.event_id,) and second_alert.facts["seizures"] == 2
    assert "More than one seizure" in second_alert.action and "permanently" in second_alert.action


def test_chronic_gvhd_from_organ_scores_is_alerted_with_the_scores_and_its_severity() -> None:
    h = on_course()
    dli = h.dli(at(day(15)))
    event = posted(h, "gvhd", dli.occurred_at + timedelta(days=40), form="chronic",
                   organ_scores={"skin": 1, "lungs": 2})
    state = h.fold(dli.occurred_at + timedelta(days=41))
    alert = only(state, "cgvhd")
    assert alert.title == "Chronic GVHD (severe)"
    assert alert.alert_id == alert_id_for(h.subject_id, "cgvhd", f"{event.event_id}|severity severe")
    assert "NIH 2014 global severity severe from organ scores skin 1, lungs 2" in alert.detail
    assert state.public()["grades"]["cgvhd_severity"] == "severe"


def test_a_correction_of_the_organ_scores_changing_the_severity_replaces_the_alert() -> None:
    h = on_course()
    event = posted(h, "gvhd", at(day(30)), form="chronic", organ_scores={"mouth": 1})
    before = only(h.fold(at(day(31))), "cgvhd")
    assert before.title == "Chronic GVHD (mild)"
    h.correct(event, organ_scores={"mouth": 1, "lungs": 1}, severity="moderate")
    after = only(h.fold(at(day(32))), "cgvhd")
    assert after.title == "Chronic GVHD (moderate)" and after.alert_id != before.alert_id


def test_events_stored_before_findings_were_taken_fold_as_before() -> None:
    """Schema version 1 events with a bare ``grade`` / ``severity`` (no findings, no organ scores)."""
    h = on_course()
    h.record("icans", at(day(4)), {"grade": 3})  # before the scale was stored, too
    h.record("gvhd", at(day(12)), {"form": "chronic", "severity": "moderate", "scale": "NIH-2014"})
    state = h.fold(NOW)
    icans = only(state, "icans_grade_3_plus")
    assert "reported ASTCT grade 3" in icans.detail
    cgvhd = only(state, "cgvhd")
    assert "NIH global severity moderate" in cgvhd.detail and "Record the NIH organ scores" in cgvhd.action
    assert state.endpoint("icans_any_2w") is True


def test_the_outcome_carries_the_worst_chronic_gvhd_severity_recorded_at_any_time() -> None:
    h = on_course()
    dli = h.dli(at(day(15)))
    assert h.fold(at(day(20))).outcome().cgvhd_severity is None
    posted(h, "gvhd", dli.occurred_at + timedelta(days=60), form="chronic", organ_scores={"lungs": 1})
    posted(h, "gvhd", dli.occurred_at + timedelta(days=150), form="chronic", organ_scores={"eyes": 3})
    posted(h, "gvhd", dli.occurred_at + timedelta(days=200), form="chronic", severity="mild")
    state = h.fold(dli.occurred_at + timedelta(days=201))
    assert state.outcome().cgvhd_severity == "severe"  # after day 100, too
    assert state.outcome().endpoints["cgvhd_any_100d"] is True  # the day-60 one is in the window


@pytest.mark.parametrize("fields, basis", [
    ({"ice_score": 0, "consciousness": "alert", "raised_icp": "focal_edema"},
     "derived ASTCT grade 3 from ICE 0/10, alert, focal cerebral oedema"),
    ({"consciousness": "unarousable"}, "derived ASTCT grade 4 from unarousable"),
    ({"ice_score": 6, "consciousness": "awakens_to_touch", "motor_weakness": True},
     "derived ASTCT grade 4 from ICE 6/10, awakens only to touch, deep focal motor weakness"),
    ({"grade": 4, "seizure": "resolved"}, "reported ASTCT grade 4 (seizure resolved rapidly)"),
    ({"grade": 3}, "reported ASTCT grade 3"),
])
def test_the_icans_alert_says_what_the_grade_rests_on(fields: dict[str, Any], basis: str) -> None:
    h = on_course()
    posted(h, "icans", at(day(6)), **fields)
    assert basis in only(h.fold(NOW), "icans_grade_3_plus").detail
