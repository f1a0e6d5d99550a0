"""The ingest service's pure rules: eligibility, amendments, error paths, body fingerprints."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import TypeAdapter, ValidationError

from services.ingest.auth import PERMISSIONS, Principal
from services.ingest.domain.acceptance import (
    amendment_problems,
    grade_conflict_problems,
    missing_observations,
    time_problems,
)
from services.ingest.domain.death import after_death_problems, recorded_death
from services.ingest.domain.eligibility import failed_criteria
from services.ingest.idempotency import body_hash
from services.ingest.problems import content_type_problem, field_problems, is_json
from shared.clinical.grading import GradeConflict
from shared.events import ClinicalEventBody, Enrolment, StoredEvent

NOW = datetime(2025, 12, 1, 12, tzinfo=UTC)
AT = NOW.isoformat()
BODY = TypeAdapter(ClinicalEventBody)
CLEAN = {"stable_vital_signs": True, "severe_infection": False, "gvhd_grade_2_to_4": False,
         "organ_failure": False, "cns_leukemia": False, "drug_allergy": False}


def enrolment(**changes: object) -> Enrolment:
    return Enrolment.model_validate({
        "subject_id": "S01-001", "site_id": "S01", "age_years": 40, "weight_kg": 60, "cohort": "mrd_positive",
        "transplant_date": "2025-01-01", "relapse_date": "2025-06-01", "eligibility": CLEAN} | changes)


def stored(type_: str, version: int, occurred_at: datetime = NOW, **data: object) -> StoredEvent:
    return StoredEvent(position=version, event_id=uuid.uuid4(), stream_id="patient-S01-001", stream_version=version,
                       type=type_, subject_id="S01-001", occurred_at=occurred_at, recorded_at=NOW, recorded_by="t",
                       data=dict(data))


def test_an_eligible_patient_fails_nothing_and_each_failure_is_named() -> None:
    assert failed_criteria(enrolment(), max_age_years=65) == []
    assert failed_criteria(enrolment(age_years=65), max_age_years=65) == []  # the limit is "over 65"
    failed = failed_criteria(enrolment(age_years=65.5, eligibility=CLEAN | {"stable_vital_signs": False,
                                                                            "drug_allergy": True}), max_age_years=65)
    assert [p.path for p in failed] == ["age_years", "eligibility.stable_vital_signs", "eligibility.drug_allergy"]


def test_clinical_time_may_run_five_minutes_ahead_not_more() -> None:
    ok = BODY.validate_python({"type": "relapse", "occurred_at": (NOW + timedelta(minutes=5)).isoformat()})
    late = BODY.validate_python({"type": "relapse", "occurred_at": (NOW + timedelta(minutes=6)).isoformat()})
    assert time_problems(ok, NOW) == [] and [p.path for p in time_problems(late, NOW)] == ["occurred_at"]


def test_amendments_point_at_live_observations_of_the_same_type() -> None:
    enrolled, crs = stored("patient_enrolled", 1, site_id="S01"), stored("crs", 2, grade=1)
    retraction = stored("retraction", 3, retracts_event_id=str(crs.event_id), reason="x")

    def correction(target: uuid.UUID, kind: str = "crs") -> object:
        return BODY.validate_python({"type": "correction", "occurred_at": NOW.isoformat(), "reason": "x",
                                     "corrects_event_id": str(target),
                                     "replacement": {"type": kind, "grade": 2, "occurred_at": NOW.isoformat()}})

    assert amendment_problems(correction(crs.event_id), [enrolled, crs]) == []
    assert [p.path for p in amendment_problems(correction(crs.event_id, "icans"), [enrolled, crs])] == \
        ["replacement.type"]
    assert [p.path for p in amendment_problems(correction(enrolled.event_id), [enrolled, crs])] == \
        ["corrects_event_id"]
    problems = amendment_problems(correction(crs.event_id), [enrolled, crs, retraction])
    assert "already retracted" in problems[0].message


@pytest.mark.parametrize("body,path", [
    ({"type": "crs", "occurred_at": "2025-12-01T00:00:00Z"}, "grade"),
    ({"type": "crs", "occurred_at": "2025-12-01T00:00:00Z", "hypotension": True}, "max_temp_c"),
    ({"type": "gvhd", "occurred_at": "2025-12-01T00:00:00Z", "form": "acute"}, "grade"),
    ({"type": "lab", "occurred_at": "2025-12-01T00:00:00Z", "test": "platelets", "value": 1, "unit": "g/L"}, "unit"),
    ({"type": "disease_assessment", "occurred_at": "2025-12-01T00:00:00Z"}, "mrd"),
    ({"type": "correction", "occurred_at": "2025-12-01T00:00:00Z", "reason": "r",
      "corrects_event_id": str(uuid.uuid4()), "replacement": {"type": "dli", "occurred_at": "x", "mnc_per_kg": 1}},
     "replacement.occurred_at"),
    ({"type": "correction", "occurred_at": "2025-12-01T00:00:00Z", "reason": "r",
      "corrects_event_id": str(uuid.uuid4()), "replacement": {"type": "nope"}}, "replacement.type"),
])
def test_a_rule_over_several_fields_names_a_field_and_union_tags_are_dropped(body: dict[str, object],
                                                                              path: str) -> None:
    with pytest.raises(ValidationError) as caught:
        BODY.validate_python(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()]
    assert path in [p.path for p in field_problems(errors)]


def test_a_derived_crs_grade_needs_every_observation_a_posted_one_none() -> None:
    def missing(fields: dict[str, object]) -> list[str]:
        return [p.path for p in missing_observations(BODY.validate_python({"type": "crs", "occurred_at": AT} | fields))]

    assert missing({"max_temp_c": 38.5}) == ["hypotension", "vasopressors", "oxygen"]
    assert missing({"max_temp_c": 38.5, "hypotension": False, "vasopressors": 0, "oxygen": "none"}) == []
    assert missing({"grade": 2, "max_temp_c": 39.0}) == []
    fix = BODY.validate_python({"type": "correction", "occurred_at": AT, "reason": "x",
                                "corrects_event_id": str(uuid.uuid4()),
                                "replacement": {"type": "crs", "occurred_at": AT, "anticytokine_given": True,
                                                "hypotension": True}})
    assert [p.path for p in missing_observations(fix)] == ["replacement.max_temp_c", "replacement.vasopressors",
                                                           "replacement.oxygen"]


def test_a_grade_conflict_names_the_grade_and_each_observation_given() -> None:
    crs = BODY.validate_python({"type": "crs", "occurred_at": AT, "grade": 1, "max_temp_c": 39.0,
                                "vasopressors": 2, "vasopressin": True})
    problems = grade_conflict_problems(crs, GradeConflict("CRS", 1, 4))
    assert [p.path for p in problems] == ["grade", "max_temp_c", "vasopressors", "vasopressin"]
    assert "max_temp_c, vasopressors, vasopressin derive grade 4" in problems[0].message
    gvhd = BODY.validate_python({"type": "gvhd", "occurred_at": AT, "form": "acute", "grade": 3, "skin_bsa_pct": 60})
    assert [p.path for p in grade_conflict_problems(gvhd, GradeConflict("acute GVHD", 3, 2))] == \
        ["grade", "skin_bsa_pct"]


def test_after_the_recorded_death_only_amendments_are_accepted() -> None:
    enrolled = stored("patient_enrolled", 1, site_id="S01", cohort="mrd_positive", age_years=40, weight_kg=60,
                      transplant_date="2025-01-01", relapse_date="2025-06-01")
    death = stored("death", 2, cause="other")
    tz = ZoneInfo("Asia/Shanghai")

    def refused(history: list[StoredEvent], kind: str, when: datetime, **fields: object) -> list[str]:
        body = BODY.validate_python({"type": kind, "occurred_at": when.isoformat(), **fields})
        return [p.path for p in after_death_problems(body, recorded_death(history, tz), tz)]

    alive, dead = [enrolled], [enrolled, death]
    later = NOW + timedelta(days=1)
    assert refused(alive, "follow_up", later) == [] and refused(alive, "death", NOW, cause="other") == []
    assert refused(dead, "follow_up", later) == ["occurred_at"]
    assert refused(dead, "death", NOW - timedelta(days=1), cause="other") == ["type"]
    assert refused(dead, "follow_up", NOW) == [] and refused(dead, "crs", NOW - timedelta(hours=1), grade=1) == []
    # Later the same trial-zone day is still the day of death (a death recorded at midnight, say).
    assert refused(dead, "lab", NOW.astimezone(tz).replace(hour=23, minute=59), test="platelets", value=20,
                   unit="10^9/L") == []
    assert refused(dead, "retraction", later, retracts_event_id=str(death.event_id), reason="x") == []
    problem = after_death_problems(BODY.validate_python({"type": "relapse", "occurred_at": later.isoformat()}),
                                   recorded_death(dead, tz), tz)[0]
    assert str(death.event_id) in problem.message and "2025-12-01" in problem.message
    # A retracted death no longer counts; a corrected one counts at its corrected time.
    retracted = dead + [stored("retraction", 3, retracts_event_id=str(death.event_id), reason="x")]
    assert recorded_death(retracted, tz) is None
    moved = dead + [stored("correction", 3, corrects_event_id=str(death.event_id), reason="x",
                           replacement={"type": "death", "occurred_at": (NOW + timedelta(days=2)).isoformat(),
                                        "cause": "other"})]
    assert refused(moved, "follow_up", later) == []
    assert refused(moved, "follow_up", NOW + timedelta(days=3)) == ["occurred_at"]


def test_a_body_that_is_not_json_is_named_as_such() -> None:
    assert is_json("application/json") and is_json("Application/JSON; charset=utf-8")
    assert is_json("application/problem+json") and not is_json("text/plain") and not is_json(None)
    body_error = [{"loc": ("body",), "msg": "Input should be a valid dictionary", "type": "model_attributes_type"}]
    assert content_type_problem("application/json", body_error) is None
    assert content_type_problem("text/plain", [{"loc": ("query", "as_of"), "msg": "bad"}]) is None
    problem = content_type_problem("application/x-www-form-urlencoded", body_error)
    assert problem is not None and problem.path == ""
    assert "Content-Type: application/json" in problem.message


def test_the_body_fingerprint_ignores_key_order_and_spacing() -> None:
    assert body_hash(b'{"a": 1, "b": [1, 2]}') == body_hash(b'{"b":[1,2],"a":1}')
    assert body_hash(b'{"a": 1}') != body_hash(b'{"a": 2}')
    assert body_hash(b"") == body_hash(b"  ")


def test_roles() -> None:
    staff = Principal("u", "site_staff", "S01", "h")
    assert staff.site_scope == "S01" and staff.may("record_event") and not staff.may("acknowledge_alert")
    assert Principal("u", "investigator", "S01", "h").site_scope is None
    assert PERMISSIONS["dsmb"] == {"read_stopping_rules"}
    assert not Principal("u", "investigator", None, "h").may("record_event")
    assert not Principal("u", "investigator", None, "h").may("enrol")
