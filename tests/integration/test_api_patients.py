"""Enrolment, the patient's state and history (CONTRACT.md section 2)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.store import eventstore
from tests.support.api import bearer, enrol, enrolment, paths, post_event, raise_alert, subject

CLEAN = enrolment()["eligibility"]


async def test_enrolment_answers_201_with_the_stored_event(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    body = enrolment()
    answer = await client.post("/v1/patients", json=body, headers=bearer(tokens["staff_s01"]))
    assert answer.status_code == 201
    stored = answer.json()
    assert stored.keys() == {"event_id", "subject_id", "type", "stream_version", "occurred_at", "recorded_at",
                             "recorded_by", "data"}
    assert stored["type"] == "patient_enrolled" and stored["subject_id"] == body["subject_id"]
    assert stored["stream_version"] == 1
    assert datetime.fromisoformat(stored["occurred_at"]) == datetime.fromisoformat("2025-11-24T09:30:00+08:00")
    assert stored["data"]["cohort"] == "hematologic_relapse" and stored["data"]["failed_criteria"] == []


async def test_enrolling_the_same_subject_twice_is_409(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    subject_id = await enrol(client, tokens["admin"])
    again = await client.post("/v1/patients", json=enrolment(subject_id), headers=bearer(tokens["admin"]))
    assert again.status_code == 409
    assert again.headers["content-type"].startswith("application/problem+json")
    assert subject_id in again.json()["detail"]


async def test_an_ineligible_patient_is_422_naming_every_failed_criterion(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str]) -> None:
    body = enrolment(age_years=70, eligibility=CLEAN | {"stable_vital_signs": False, "severe_infection": True,
                                                         "cns_leukemia": True})
    answer = await client.post("/v1/patients", json=body, headers=bearer(tokens["admin"]))
    assert answer.status_code == 422
    assert sorted(paths(answer)) == ["age_years", "eligibility.cns_leukemia", "eligibility.severe_infection",
                                     "eligibility.stable_vital_signs"]
    async with engine.connect() as conn:
        assert await eventstore.read_stream(conn, f"patient-{body['subject_id']}") == []


async def test_age_65_is_eligible_and_each_exclusion_is_named_alone(
        client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    assert (await client.post("/v1/patients", json=enrolment(age_years=65), headers=bearer(tokens["admin"]))
            ).status_code == 201
    for criterion in ("severe_infection", "gvhd_grade_2_to_4", "organ_failure", "cns_leukemia", "drug_allergy"):
        answer = await client.post("/v1/patients", json=enrolment(eligibility=CLEAN | {criterion: True}),
                                   headers=bearer(tokens["admin"]))
        assert answer.status_code == 422 and paths(answer) == [f"eligibility.{criterion}"]


async def test_an_override_stores_an_ineligible_enrolment(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    override = {"reason": "PI decision, infection controlled", "approved_by": "Dr Li"}
    body = enrolment(age_years=67, eligibility=CLEAN | {"severe_infection": True}, eligibility_override=override)
    answer = await client.post("/v1/patients", json=body, headers=bearer(tokens["admin"]))
    assert answer.status_code == 201
    assert answer.json()["data"]["eligibility_override"] == override
    assert answer.json()["data"]["failed_criteria"] == ["age_years", "eligibility.severe_infection"]


async def test_malformed_enrolments_name_each_bad_field(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    body = enrolment(subject_id="bad id!", cohort="other", weight_kg=-1, enrolled_at="2025-11-24T09:30:00",
                     eligibility={"stable_vital_signs": True}, eligibility_override={"reason": ""})
    answer = await client.post("/v1/patients", json=body, headers=bearer(tokens["admin"]))
    assert answer.status_code == 422
    assert {"subject_id", "cohort", "weight_kg", "enrolled_at", "eligibility.severe_infection",
            "eligibility.drug_allergy", "eligibility_override.reason",
            "eligibility_override.approved_by"} <= set(paths(answer))
    assert all(e["message"] for e in answer.json()["errors"])


@pytest.mark.parametrize("changes,path", [
    ({"age_years": "34"}, "age_years"),
    ({"age_years": True}, "age_years"),
    ({"weight_kg": "61.5"}, "weight_kg"),
    ({"transplant_date": "2025-03-02T00:00:00"}, "transplant_date"),
    ({"transplant_date": "2025-03-02T00:00:00Z"}, "transplant_date"),
    ({"relapse_date": 1763596800}, "relapse_date"),
    ({"relapse_date": "20251120"}, "relapse_date"),
    ({"enrolled_at": 1762300000}, "enrolled_at"),
    ({"enrolled_at": "1762300000"}, "enrolled_at"),
    ({"eligibility": CLEAN | {"severe_infection": "no"}}, "eligibility.severe_infection"),
    ({"eligibility": CLEAN | {"stable_vital_signs": 1}}, "eligibility.stable_vital_signs"),
])
async def test_lax_enrolment_input_is_422_naming_the_field(
        client: httpx.AsyncClient, tokens: dict[str, str], changes: dict[str, Any], path: str) -> None:
    answer = await client.post("/v1/patients", json=enrolment(**changes), headers=bearer(tokens["admin"]))
    assert answer.status_code == 422, answer.text
    assert paths(answer) == [path]


@pytest.mark.parametrize("override,bad", [
    ({"reason": "   ", "approved_by": "Dr Li"}, ["eligibility_override.reason"]),
    ({"reason": "PI decision", "approved_by": ""}, ["eligibility_override.approved_by"]),
    ({"reason": "PI decision"}, ["eligibility_override.approved_by"]),
    ({"reason": "PI decision", "approved_by": 42}, ["eligibility_override.approved_by"]),
    ({"reason": "PI decision", "approved_by": "Dr Li", "by": "x"}, ["eligibility_override.by"]),
    ("approved", ["eligibility_override"]),
])
async def test_an_override_needs_a_reason_and_an_approver(
        client: httpx.AsyncClient, tokens: dict[str, str], override: Any, bad: list[str]) -> None:
    body = enrolment(age_years=67, eligibility_override=override)
    answer = await client.post("/v1/patients", json=body, headers=bearer(tokens["admin"]))
    assert answer.status_code == 422 and paths(answer) == bad


async def test_relapse_before_transplant_names_relapse_date(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    answer = await client.post("/v1/patients", json=enrolment(relapse_date="2025-01-01"),
                               headers=bearer(tokens["admin"]))
    assert answer.status_code == 422 and paths(answer) == ["relapse_date"]


async def test_enrolled_at_defaults_to_now_and_may_not_lie_ahead(
        client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    body = enrolment()
    del body["enrolled_at"]
    before = datetime.now(UTC)
    answer = await client.post("/v1/patients", json=body, headers=bearer(tokens["admin"]))
    assert answer.status_code == 201
    enrolled_at = datetime.fromisoformat(answer.json()["occurred_at"])
    assert before - timedelta(seconds=1) <= enrolled_at <= datetime.now(UTC)
    ahead = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    answer = await client.post("/v1/patients", json=enrolment(enrolled_at=ahead), headers=bearer(tokens["admin"]))
    assert answer.status_code == 422 and paths(answer) == ["enrolled_at"]


async def test_the_patient_view_has_state_open_alerts_and_stream_version(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str]) -> None:
    subject_id = await enrol(client, tokens["staff_s01"])
    await post_event(client, tokens["staff_s01"], subject_id,
                     {"type": "blinatumomab_dose", "occurred_at": "2025-11-25T09:00:00+08:00",
                      "course": 1, "day": 1, "dose_ug": 9})
    alert_id = await raise_alert(engine, subject_id, "S01")
    other = await raise_alert(engine, subject(), "S01")
    answer = await client.get(f"/v1/patients/{subject_id}", headers=bearer(tokens["investigator"]))
    assert answer.status_code == 200
    view = answer.json()
    assert view["subject_id"] == subject_id and view["site_id"] == "S01" and view["cohort"] == "hematologic_relapse"
    assert view["stream_version"] == 2 and answer.headers["etag"] == '"2"'
    assert [a["alert_id"] for a in view["open_alerts"]] == [str(alert_id)]
    assert str(other) not in answer.text


async def test_an_unknown_patient_is_404(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    for path in ("/v1/patients/S01-nobody", "/v1/patients/S01-nobody/events"):
        answer = await client.get(path, headers=bearer(tokens["admin"]))
        assert answer.status_code == 404 and answer.headers["content-type"].startswith("application/problem+json")


async def test_history_in_recorded_order_and_as_of_gives_what_was_known_then(
        client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    token = tokens["staff_s01"]
    subject_id = await enrol(client, token)
    first = (await post_event(client, token, subject_id, {"type": "icans", "grade": 1,
                                                          "occurred_at": "2025-12-02T08:00:00+08:00"})).json()
    # A late entry: clinically earlier, recorded later.
    late = (await post_event(client, token, subject_id, {"type": "follow_up",
                                                         "occurred_at": "2025-11-30T08:00:00+08:00"})).json()
    history = (await client.get(f"/v1/patients/{subject_id}/events", headers=bearer(token))).json()
    assert history["subject_id"] == subject_id
    assert [e["event_id"] for e in history["events"]][1:] == [first["event_id"], late["event_id"]]
    assert [e["stream_version"] for e in history["events"]] == [1, 2, 3]

    as_of = first["recorded_at"]
    then = await client.get(f"/v1/patients/{subject_id}/events", params={"as_of": as_of}, headers=bearer(token))
    assert [e["type"] for e in then.json()["events"]] == ["patient_enrolled", "icans"]
    before = await client.get(f"/v1/patients/{subject_id}/events", params={"as_of": "2000-01-01T00:00:00+00:00"},
                              headers=bearer(token))
    assert before.json()["events"] == []


async def test_as_of_must_carry_an_offset(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    subject_id = await enrol(client, tokens["admin"])
    naive = await client.get(f"/v1/patients/{subject_id}/events", params={"as_of": "2025-12-01T00:00:00"},
                             headers=bearer(tokens["admin"]))
    assert naive.status_code == 422 and paths(naive) == ["as_of"]
    garbage = await client.get(f"/v1/patients/{subject_id}/events", params={"as_of": "yesterday"},
                               headers=bearer(tokens["admin"]))
    assert garbage.status_code == 422 and paths(garbage) == ["as_of"]
    # An unescaped '+' arrives as a space; it is read back as the offset it was.
    raw = await client.get(f"/v1/patients/{subject_id}/events?as_of=2999-01-01T00:00:00+08:00",
                           headers=bearer(tokens["admin"]))
    assert raw.status_code == 200 and len(raw.json()["events"]) == 1


async def test_stopping_rules_list_each_rule(client: httpx.AsyncClient, protocol: object,
                                             tokens: dict[str, str]) -> None:
    await enrol(client, tokens["admin"])
    answer = await client.get("/v1/stopping-rules", headers=bearer(tokens["dsmb"]))
    assert answer.status_code == 200
    rules = answer.json()["rules"]
    assert [r["rule_id"] for r in rules] == [r.id for r in protocol.stopping_rules]  # type: ignore[attr-defined]
