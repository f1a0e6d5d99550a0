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


async def test_a_grade_contradicting_the_observations_is_422_naming_grade_and_observations(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str], patient: str) -> None:
    answer = await post_event(client, tokens["staff_s01"], patient,
                              body("crs", {"grade": 1, "max_temp_c": 39.0, "hypotension": True, "vasopressors": 2,
                                           "oxygen": "none"}))
    assert answer.status_code == 422
    assert paths(answer) == ["grade", "max_temp_c", "hypotension", "vasopressors", "oxygen"]
    grade = answer.json()["errors"][0]["message"]
    assert "derive grade 4" in grade and "max_temp_c, hypotension, vasopressors, oxygen" in grade
    # Acute GVHD: the organ findings given are named beside the grade (stage-3 skin alone is grade II).
    gvhd = await post_event(client, tokens["staff_s01"], patient,
                            body("gvhd", {"form": "acute", "grade": 3, "skin_bsa_pct": 60, "upper_gi": False}))
    assert gvhd.status_code == 422 and paths(gvhd) == ["grade", "skin_bsa_pct", "upper_gi"]
    async with engine.connect() as conn:
        assert len(await eventstore.read_stream(conn, f"patient-{patient}")) == 1


async def test_a_grade_derived_from_observations_needs_every_observation(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str], patient: str) -> None:
    token = tokens["staff_s01"]
    fever_only = await post_event(client, token, patient, body("crs", {"max_temp_c": 38.5}))
    assert fever_only.status_code == 422
    assert paths(fever_only) == ["hypotension", "vasopressors", "oxygen"]
    # vasopressin and anticytokine_given are optional; max_temp_c is not, even under tocilizumab.
    treated = await post_event(client, token, patient, body("crs", {"anticytokine_given": True, "hypotension": False,
                                                                    "vasopressors": 0, "oxygen": "none"}))
    assert treated.status_code == 422 and paths(treated) == ["max_temp_c"]
    complete = await post_event(client, token, patient, body("crs", {"max_temp_c": 38.5, "hypotension": False,
                                                                     "vasopressors": 0, "oxygen": "none"}))
    assert complete.status_code == 201 and complete.json()["data"]["grade"] == 1
    # A disease assessment has both its fields.
    for given, missing in (({"mrd": "negative"}, ["response"]), ({"response": "cr"}, ["mrd"]),
                           ({}, ["mrd", "response"])):
        answer = await post_event(client, token, patient, body("disease_assessment", given))
        assert answer.status_code == 422 and sorted(paths(answer)) == missing, given
    async with engine.connect() as conn:
        assert len(await eventstore.read_stream(conn, f"patient-{patient}")) == 2


# Lax input pydantic would coerce: (type, fields, the path named).
LAX = [
    ("relapse", {"occurred_at": 1762300000}, "occurred_at"),
    ("relapse", {"occurred_at": 1762300000.5}, "occurred_at"),
    ("relapse", {"occurred_at": "1762300000"}, "occurred_at"),
    ("relapse", {"occurred_at": "2025-12-01"}, "occurred_at"),
    ("blinatumomab_dose", {"course": True, "day": 1, "dose_ug": 9.0}, "course"),
    ("blinatumomab_dose", {"course": 1, "day": "3", "dose_ug": 9.0}, "day"),
    ("blinatumomab_dose", {"course": 1, "day": 3.0, "dose_ug": 9.0}, "day"),
    ("blinatumomab_dose", {"course": 1, "day": 3, "dose_ug": "9.0"}, "dose_ug"),
    ("blinatumomab_dose", {"course": 1, "day": 3, "dose_ug": True}, "dose_ug"),
    ("dli", {"mnc_per_kg": "7.5e7"}, "mnc_per_kg"),
    ("crs", {"grade": "2"}, "grade"),
    ("crs", {"grade": True}, "grade"),
    ("crs", {"max_temp_c": "38.5", "hypotension": False, "vasopressors": 0, "oxygen": "none"}, "max_temp_c"),
    ("crs", {"max_temp_c": 38.5, "hypotension": "yes", "vasopressors": 0, "oxygen": "none"}, "hypotension"),
    ("crs", {"max_temp_c": 38.5, "hypotension": 0, "vasopressors": 0, "oxygen": "none"}, "hypotension"),
    ("icans", {"grade": "1"}, "grade"),
    ("gvhd", {"form": "acute", "skin_bsa_pct": "60"}, "skin_bsa_pct"),
    ("infection", {"grade": False, "site": "lung"}, "grade"),
    ("lab", {"test": "neutrophils", "value": "0.4", "unit": "10^9/L"}, "value"),
    ("lab", {"test": "neutrophils", "value": 0.4, "unit": "10^9/L", "lln": "1.8"}, "lln"),
]


@pytest.mark.parametrize("kind,fields,path", LAX)
async def test_lax_input_is_422_naming_the_field(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str, kind: str, fields: dict[str, Any],
        path: str) -> None:
    answer = await post_event(client, tokens["staff_s01"], patient, body(kind, fields))
    assert answer.status_code == 422, answer.text
    assert paths(answer) == [path]
    # The same field inside a correction's replacement is named under it.
    fix = await post_event(client, tokens["staff_s01"], patient, body("correction", {
        "corrects_event_id": str(uuid.uuid4()), "reason": "x", "replacement": body(kind, fields)}))
    assert fix.status_code == 422 and paths(fix) == [f"replacement.{path}"]


async def test_json_numbers_and_iso_times_stay_accepted(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    token = tokens["staff_s01"]
    dose = await post_event(client, token, patient, body("blinatumomab_dose", {"course": 1, "day": 1, "dose_ug": 9}))
    assert dose.status_code == 201 and dose.json()["data"]["dose_ug"] == 9.0
    dli = await post_event(client, token, patient, {"type": "dli", "occurred_at": "2025-12-01 10:00:00Z",
                                                    "mnc_per_kg": 75000000})
    assert dli.status_code == 201 and dli.json()["data"]["mnc_per_kg"] == 7.5e7


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
        "replacement": body("crs", {"max_temp_c": 39.0, "hypotension": True, "vasopressors": 1, "oxygen": "none"})}))
    assert corrected.status_code == 201
    assert corrected.json()["data"]["replacement"]["grade"] == 3
    other_type = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": crs["event_id"], "reason": "x", "replacement": body("icans", {"grade": 1})}))
    assert other_type.status_code == 422 and paths(other_type) == ["replacement.type"]
    conflict = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": crs["event_id"], "reason": "x",
        "replacement": body("crs", {"grade": 1, "max_temp_c": 39.0, "vasopressors": 2})}))
    assert conflict.status_code == 422
    assert paths(conflict) == ["replacement.grade", "replacement.max_temp_c", "replacement.vasopressors"]
    incomplete = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": crs["event_id"], "reason": "x", "replacement": body("crs", {"max_temp_c": 39.0})}))
    assert incomplete.status_code == 422
    assert paths(incomplete) == ["replacement.hypotension", "replacement.vasopressors", "replacement.oxygen"]
    ahead = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    future = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": crs["event_id"], "reason": "x",
        "replacement": {"type": "crs", "grade": 2, "occurred_at": ahead}}))
    assert future.status_code == 422 and paths(future) == ["replacement.occurred_at"]


async def test_retracting_a_correction_reverts_the_event_to_the_version_before_it(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    token = tokens["staff_s01"]
    crs = (await post_event(client, token, patient, body("crs", {"grade": 2}))).json()
    fix = (await post_event(client, token, patient, body("correction", {
        "corrects_event_id": crs["event_id"], "reason": "misread", "replacement": body("crs", {"grade": 3})}))).json()

    async def crs_max() -> int:
        return (await client.get(f"/v1/patients/{patient}", headers=bearer(token))).json()["grades"]["crs_max"]
    assert await crs_max() == 3

    undone = await post_event(client, token, patient, body("retraction", {"retracts_event_id": fix["event_id"],
                                                                          "reason": "the correction was wrong"}))
    assert undone.status_code == 201, undone.text
    assert await crs_max() == 2
    again = await post_event(client, token, patient, body("retraction", {"retracts_event_id": fix["event_id"],
                                                                         "reason": "twice"}))
    assert again.status_code == 422 and "already retracted" in again.json()["errors"][0]["message"]


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


# --------------------------------------------------------------------------- death


async def test_nothing_clinical_is_accepted_after_the_recorded_death(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    token = tokens["staff_s01"]
    death = (await post_event(client, token, patient, body("death", {"cause": "infection"}))).json()

    # A second death, and clinical events after the death, are refused naming the recorded death.
    again = await post_event(client, token, patient, body("death", {"cause": "other"}))
    assert again.status_code == 422 and paths(again) == ["type"]
    assert death["event_id"] in again.json()["detail"] and "2025-12-01" in again.json()["detail"]
    for kind, fields in (("crs", {"grade": 1}), ("follow_up", {}), ("lab", {"test": "wbc", "value": 5, "unit": "10^9/L"})):
        later = await post_event(client, token, patient, {"type": kind, "occurred_at": "2025-12-02T10:00:00+08:00",
                                                          **fields})
        assert later.status_code == 422 and paths(later) == ["occurred_at"], kind
        assert death["event_id"] in later.json()["detail"]

    # Late entries from before the death (or its very moment) are still welcome.
    before = await post_event(client, token, patient, {"type": "crs", "grade": 2,
                                                       "occurred_at": "2025-11-30T10:00:00+08:00"})
    assert before.status_code == 201
    assert (await post_event(client, token, patient, body("infection", {"grade": 5, "site": "lung"}))).status_code == 201
    # Corrections and retractions are always let through: they fix the record.
    regraded = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": before.json()["event_id"], "reason": "regraded",
        "replacement": {"type": "crs", "grade": 3, "occurred_at": "2025-11-30T10:00:00+08:00"}}))
    assert regraded.status_code == 201

    # The death was two days later: what happened before the corrected date is now acceptable.
    moved = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": death["event_id"], "reason": "wrong date",
        "replacement": {"type": "death", "cause": "infection", "occurred_at": "2025-12-03T10:00:00+08:00"}}))
    assert moved.status_code == 201
    seen = await post_event(client, token, patient, {"type": "follow_up", "occurred_at": "2025-12-02T10:00:00+08:00"})
    assert seen.status_code == 201
    after = await post_event(client, token, patient, {"type": "follow_up", "occurred_at": "2025-12-04T10:00:00+08:00"})
    assert after.status_code == 422 and "2025-12-03" in after.json()["detail"]
    assert death["event_id"] in after.json()["detail"]

    # A retracted death no longer counts: later events, and a death, are accepted again.
    retracted = await post_event(client, token, patient, body("retraction", {
        "retracts_event_id": death["event_id"], "reason": "wrong patient"}))
    assert retracted.status_code == 201
    assert (await post_event(client, token, patient, {"type": "follow_up",
                                                      "occurred_at": "2025-12-04T10:00:00+08:00"})).status_code == 201
    assert (await post_event(client, token, patient, body("death", {"cause": "relapse"}))).status_code == 201


async def test_concurrent_deaths_store_one(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str], patient: str) -> None:
    import asyncio

    answers = await asyncio.gather(*(post_event(client, tokens["staff_s01"], patient, body("death", {"cause": "other"}))
                                     for _ in range(4)))
    assert sorted(a.status_code for a in answers) == [201, 422, 422, 422]
    async with engine.connect() as conn:
        assert [e.type for e in await eventstore.read_stream(conn, f"patient-{patient}")] == \
            ["patient_enrolled", "death"]
