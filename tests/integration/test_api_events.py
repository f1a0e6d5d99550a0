"""Recording clinical events: every type, validation by path, time, If-Match, Idempotency-Key,
corrections and retractions (CONTRACT.md section 2)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.store import eventstore
from tests.support.api import bearer, enrol, enrolment, paths, post_event

AT = "2025-12-01T10:00:00+08:00"

# type: (a valid body, an invalid body, the path the 422 names)
BODIES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "blinatumomab_dose": ({"course": 1, "day": 1, "dose_ug": 9.0}, {"course": 1, "day": 29, "dose_ug": 9.0}, "day"),
    "dli": ({"mnc_per_kg": 7.5e7}, {"mnc_per_kg": -1}, "mnc_per_kg"),
    "crs": ({"grade": 2}, {"grade": 5}, "grade"),
    "icans": ({"grade": 1}, {"grade": 0}, "grade"),
    "gvhd": ({"form": "acute", "grade": 2}, {"form": "chronic"}, "severity"),
    "infection": ({"grade": 3, "site": "lung", "organism": "Aspergillus"}, {"grade": 3}, "site"),
    "lab": ({"test": "neutrophils", "value": 0.4, "unit": "10^9/L"},
            {"test": "neutrophils", "value": 0.4, "unit": "g/dL"}, "unit"),
    "disease_assessment": ({"mrd": "negative", "response": "cr"}, {"response": "great"}, "response"),
    "relapse": ({}, {"site": "bone marrow"}, "site"),
    "assessment_completed": ({"timepoint": "day14"}, {"timepoint": "day30"}, "timepoint"),
    "death": ({"cause": "other"}, {"cause": "unknown"}, "cause"),
    "follow_up": ({}, {"occurred_at": "2025-12-01T10:00:00"}, "occurred_at"),
    "withdrawal": ({"reason": "moved away"}, {"reason": ""}, "reason"),
    "retraction": ({"reason": "entered twice"}, {"retracts_event_id": "not-a-uuid", "reason": "x"},
                   "retracts_event_id"),
    "correction": ({"reason": "typo"}, {"reason": "typo", "replacement": {"type": "icans", "grade": 9,
                                                                           "occurred_at": AT}},
                   "replacement.grade"),
}


def body(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "occurred_at": AT} | fields


@pytest.fixture
async def patient(client: httpx.AsyncClient, tokens: dict[str, str]) -> str:
    return await enrol(client, tokens["staff_s01"])


async def test_every_event_type_is_accepted_and_stored(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    token = tokens["staff_s01"]
    target = (await post_event(client, token, patient, body("icans", {"grade": 1}))).json()
    spare = (await post_event(client, token, patient, body("icans", {"grade": 2}))).json()
    extra = {
        "correction": {"corrects_event_id": target["event_id"], "replacement": body("icans", {"grade": 2})},
        "retraction": {"retracts_event_id": spare["event_id"]},
    }
    for kind, (fields, _, _) in BODIES.items():
        answer = await post_event(client, token, patient, body(kind, fields | extra.get(kind, {})))
        assert answer.status_code == 201, (kind, answer.text)
        stored = answer.json()
        assert stored["type"] == kind and stored["subject_id"] == patient and stored["recorded_by"]
        assert "type" not in stored["data"] and "occurred_at" not in stored["data"]
        assert stored["occurred_at"] == AT  # the clinical time as entered, offset included
    history = (await client.get(f"/v1/patients/{patient}/events", headers=bearer(token))).json()["events"]
    assert {e["type"] for e in history} == set(BODIES) | {"patient_enrolled", "icans"}
    assert {e["occurred_at"] for e in history if e["type"] != "patient_enrolled"} == {AT}


@pytest.mark.parametrize("kind", list(BODIES))
async def test_an_invalid_body_of_each_type_is_422_naming_the_bad_field(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str, kind: str) -> None:
    fields = BODIES[kind][1]
    if kind == "correction":
        fields = fields | {"corrects_event_id": str(uuid.uuid4())}
    answer = await post_event(client, tokens["staff_s01"], patient, body(kind, fields))
    assert answer.status_code == 422, answer.text
    assert BODIES[kind][2] in paths(answer)
    problem = answer.json()
    assert problem["status"] == 422 and problem["title"] and problem["detail"] and problem["type"]


async def test_every_bad_field_is_named_and_an_unknown_type_names_type(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    answer = await post_event(client, tokens["staff_s01"], patient,
                              {"type": "blinatumomab_dose", "occurred_at": "soon", "course": 3, "day": 0})
    assert sorted(paths(answer)) == ["course", "day", "dose_ug", "occurred_at"]
    unknown = await post_event(client, tokens["staff_s01"], patient, {"type": "haircut", "occurred_at": AT})
    assert unknown.status_code == 422 and paths(unknown) == ["type"]
    missing = await post_event(client, tokens["staff_s01"], patient, {"occurred_at": AT})
    assert missing.status_code == 422 and paths(missing) == ["type"]


async def test_derived_grades_are_stored_beside_the_observations(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    token = tokens["staff_s01"]
    crs = await post_event(client, token, patient, body("crs", {"max_temp_c": 39.2, "hypotension": True,
                                                                "vasopressors": 1, "oxygen": "none"}))
    assert crs.status_code == 201
    assert crs.json()["data"].items() >= {"grade": 3, "scale": "ASTCT-2019", "max_temp_c": 39.2}.items()
    lab = await post_event(client, token, patient, body("lab", {"test": "platelets", "value": 20, "unit": "10^9/L"}))
    assert lab.json()["data"]["grade"] == 4 and lab.json()["data"]["scale"] == "CTCAE-5.0"
    gvhd = await post_event(client, token, patient, body("gvhd", {"form": "acute", "skin_bsa_pct": 60}))
    assert gvhd.json()["data"]["scale"] == "MAGIC-2016" and "stages" in gvhd.json()["data"]


async def test_a_grade_contradicting_the_observations_is_422_naming_grade(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str], patient: str) -> None:
    answer = await post_event(client, tokens["staff_s01"], patient,
                              body("crs", {"grade": 1, "max_temp_c": 39.0, "hypotension": True, "vasopressors": 2,
                                           "oxygen": "none"}))
    assert answer.status_code == 422 and paths(answer) == ["grade"]
    assert "derive" in answer.json()["errors"][0]["message"]
    async with engine.connect() as conn:
        assert len(await eventstore.read_stream(conn, f"patient-{patient}")) == 1


async def test_times_need_an_offset_and_may_not_lie_ahead(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    token = tokens["staff_s01"]
    naive = await post_event(client, token, patient, {"type": "relapse", "occurred_at": "2025-12-01T10:00:00"})
    assert naive.status_code == 422 and paths(naive) == ["occurred_at"]
    ahead = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    future = await post_event(client, token, patient, {"type": "relapse", "occurred_at": ahead})
    assert future.status_code == 422 and paths(future) == ["occurred_at"]
    skew = (datetime.now(UTC) + timedelta(minutes=2)).isoformat()
    assert (await post_event(client, token, patient, {"type": "relapse", "occurred_at": skew})).status_code == 201


async def test_an_event_for_an_unknown_patient_is_404(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    answer = await post_event(client, tokens["admin"], "S01-nobody", body("relapse", {}))
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("application/problem+json")


async def test_if_match_makes_the_post_conditional(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str], patient: str) -> None:
    token = tokens["staff_s01"]
    matched = await post_event(client, token, patient, body("relapse", {}), **{"If-Match": "1"})
    assert matched.status_code == 201 and matched.json()["stream_version"] == 2
    quoted = await post_event(client, token, patient, body("follow_up", {}), **{"If-Match": '"2"'})
    assert quoted.status_code == 201
    stale = await post_event(client, token, patient, body("follow_up", {}), **{"If-Match": "2"})
    assert stale.status_code == 412
    assert stale.headers["content-type"].startswith("application/problem+json")
    async with engine.connect() as conn:
        assert len(await eventstore.read_stream(conn, f"patient-{patient}")) == 3
    junk = await post_event(client, token, patient, body("follow_up", {}), **{"If-Match": "latest"})
    assert junk.status_code == 422 and paths(junk) == ["If-Match"]


async def test_an_idempotency_key_replays_the_first_answer_and_stores_once(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str], patient: str) -> None:
    token, key = tokens["staff_s01"], {"Idempotency-Key": uuid.uuid4().hex}
    first = await post_event(client, token, patient, body("infection", {"grade": 2, "site": "lung"}), **key)
    # Same body, keys in another order: the same request.
    again = await client.post(f"/v1/patients/{patient}/events", headers=bearer(token, **key,
                              **{"Content-Type": "application/json"}),
                              content=f'{{"site": "lung", "grade": 2, "occurred_at": "{AT}", "type": "infection"}}')
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    async with engine.connect() as conn:
        assert [e.type for e in await eventstore.read_stream(conn, f"patient-{patient}")] == \
            ["patient_enrolled", "infection"]


async def test_an_idempotency_key_reused_for_another_request_is_422(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    token, key = tokens["staff_s01"], {"Idempotency-Key": uuid.uuid4().hex}
    assert (await post_event(client, token, patient, body("relapse", {}), **key)).status_code == 201
    other_body = await post_event(client, token, patient, body("follow_up", {}), **key)
    assert other_body.status_code == 422 and paths(other_body) == ["Idempotency-Key"]
    other_path = await client.post("/v1/patients", json=enrolment(), headers=bearer(token, **key))
    assert other_path.status_code == 422 and paths(other_path) == ["Idempotency-Key"]


async def test_an_idempotency_key_belongs_to_its_token(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    mine = await post_event(client, tokens["staff_s01"], patient, body("follow_up", {}), **key)
    theirs = await post_event(client, tokens["admin"], patient, body("follow_up", {}), **key)
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["event_id"] != theirs.json()["event_id"]


async def test_a_refused_request_is_not_remembered_by_its_key(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    token, key = tokens["staff_s01"], {"Idempotency-Key": uuid.uuid4().hex}
    first = await post_event(client, token, patient, body("relapse", {}), **key, **{"If-Match": "7"})
    assert first.status_code == 412
    retried = await post_event(client, token, patient, body("relapse", {}), **key, **{"If-Match": "1"})
    assert retried.status_code == 201


async def test_enrolment_with_an_idempotency_key_is_stored_once(
        client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    headers = bearer(tokens["admin"], **{"Idempotency-Key": "enrol-" + uuid.uuid4().hex})
    body_ = enrolment()
    first = await client.post("/v1/patients", json=body_, headers=headers)
    again = await client.post("/v1/patients", json=body_, headers=headers)
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    without_key = await client.post("/v1/patients", json=body_, headers=bearer(tokens["admin"]))
    assert without_key.status_code == 409


# --------------------------------------------------------------------------- corrections and retractions


async def test_a_correction_replaces_an_observation_of_the_same_type(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    token = tokens["staff_s01"]
    crs = (await post_event(client, token, patient, body("crs", {"grade": 1}))).json()
    corrected = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": crs["event_id"], "reason": "grade was 3",
        "replacement": body("crs", {"max_temp_c": 39.0, "hypotension": True, "vasopressors": 1})}))
    assert corrected.status_code == 201
    assert corrected.json()["data"]["replacement"]["grade"] == 3
    other_type = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": crs["event_id"], "reason": "x", "replacement": body("icans", {"grade": 1})}))
    assert other_type.status_code == 422 and paths(other_type) == ["replacement.type"]
    conflict = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": crs["event_id"], "reason": "x",
        "replacement": body("crs", {"grade": 1, "max_temp_c": 39.0, "vasopressors": 2})}))
    assert conflict.status_code == 422 and paths(conflict) == ["replacement.grade"]
    ahead = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    future = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": crs["event_id"], "reason": "x",
        "replacement": {"type": "crs", "grade": 2, "occurred_at": ahead}}))
    assert future.status_code == 422 and paths(future) == ["replacement.occurred_at"]


async def test_amendments_must_target_a_live_observation_of_this_patient(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    token = tokens["staff_s01"]
    other_patient = await enrol(client, token)
    theirs = (await post_event(client, token, other_patient, body("relapse", {}))).json()
    mine = (await post_event(client, token, patient, body("relapse", {}))).json()
    history = (await client.get(f"/v1/patients/{patient}/events", headers=bearer(token))).json()["events"]
    enrolled_id = history[0]["event_id"]

    async def retract(target: str) -> httpx.Response:
        return await post_event(client, token, patient, body("retraction", {"retracts_event_id": target,
                                                                            "reason": "wrong"}))

    for target in (theirs["event_id"], str(uuid.uuid4()), enrolled_id):
        refused = await retract(target)
        assert refused.status_code == 422 and paths(refused) == ["retracts_event_id"], target
    assert (await retract(mine["event_id"])).status_code == 201
    twice = await retract(mine["event_id"])
    assert twice.status_code == 422 and "already retracted" in twice.json()["errors"][0]["message"]
    correcting_retracted = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": mine["event_id"], "reason": "x", "replacement": body("relapse", {})}))
    assert correcting_retracted.status_code == 422 and paths(correcting_retracted) == ["corrects_event_id"]
    retraction_id = (await client.get(f"/v1/patients/{patient}/events", headers=bearer(token))).json()["events"][-1]
    assert retraction_id["type"] == "retraction"
    of_a_retraction = await retract(retraction_id["event_id"])
    assert of_a_retraction.status_code == 422 and paths(of_a_retraction) == ["retracts_event_id"]
    of_someone_elses = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": theirs["event_id"], "reason": "x", "replacement": body("relapse", {})}))
    assert of_someone_elses.status_code == 422 and paths(of_someone_elses) == ["corrects_event_id"]


async def test_concurrent_retries_with_one_key_store_one_event(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str], patient: str) -> None:
    import asyncio

    key = {"Idempotency-Key": uuid.uuid4().hex}
    answers = await asyncio.gather(*(post_event(client, tokens["staff_s01"], patient, body("relapse", {}), **key)
                                     for _ in range(5)))
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["event_id"] for a in answers}) == 1
    async with engine.connect() as conn:
        assert [e.type for e in await eventstore.read_stream(conn, f"patient-{patient}")] == \
            ["patient_enrolled", "relapse"]


async def test_concurrent_enrolments_of_one_subject_store_one(
        client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    import asyncio

    body_ = enrolment()
    answers = await asyncio.gather(*(client.post("/v1/patients", json=body_, headers=bearer(tokens["admin"]))
                                     for _ in range(4)))
    assert sorted(a.status_code for a in answers) == [201, 409, 409, 409]
