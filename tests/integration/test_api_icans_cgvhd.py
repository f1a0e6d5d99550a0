"""ICANS from bedside findings (ASTCT 2019) and chronic GVHD from organ scores (NIH 2014) through the
API: what is stored, and the 422s that name the fields (CONTRACT.md section 2)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.store import eventstore
from tests.support.api import bearer, enrol, paths, post_event

AT = "2025-12-01T10:00:00+08:00"


def body(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "occurred_at": AT} | fields


@pytest.fixture
async def patient(client: httpx.AsyncClient, tokens: dict[str, str]) -> str:
    return await enrol(client, tokens["staff_s01"])


async def stored_count(engine: AsyncEngine, patient: str) -> int:
    async with engine.connect() as conn:
        return len(await eventstore.read_stream(conn, f"patient-{patient}"))


async def test_icans_from_findings_stores_grade_and_scale_beside_the_findings(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    findings = {"ice_score": 0, "consciousness": "awakens_to_touch", "seizure": "resolved",
                "motor_weakness": False, "raised_icp": "none"}
    answer = await post_event(client, tokens["staff_s01"], patient, body("icans", findings))
    assert answer.status_code == 201, answer.text
    assert answer.json()["data"] == findings | {"grade": 3, "scale": "ASTCT-2019"}
    # No ICANS: ICE 10, alert, nothing else -> grade 0, stored as such.
    none = await post_event(client, tokens["staff_s01"], patient,
                            body("icans", {"ice_score": 10, "consciousness": "alert"}))
    assert none.status_code == 201 and none.json()["data"]["grade"] == 0
    state = (await client.get(f"/v1/patients/{patient}", headers=bearer(tokens["staff_s01"]))).json()
    assert state["grades"]["icans_max"] == 3


async def test_a_posted_icans_grade_alone_still_works(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    answer = await post_event(client, tokens["staff_s01"], patient, body("icans", {"grade": 2}))
    assert answer.status_code == 201 and answer.json()["data"] == {"grade": 2, "scale": "ASTCT-2019"}


async def test_an_icans_grade_the_findings_contradict_is_422_naming_grade_and_findings(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str], patient: str) -> None:
    answer = await post_event(client, tokens["staff_s01"], patient,
                              body("icans", {"grade": 1, "ice_score": 2, "consciousness": "alert"}))
    assert answer.status_code == 422
    assert paths(answer) == ["grade", "ice_score", "consciousness"]
    assert "derive grade 3" in answer.json()["errors"][0]["message"]
    # Findings missing the ICE score or consciousness: each missing one is named.
    missing = await post_event(client, tokens["staff_s01"], patient, body("icans", {"seizure": "resolved"}))
    assert missing.status_code == 422 and paths(missing) == ["ice_score", "consciousness"]
    # Unarousable goes with ICE 0 only.
    unarousable = await post_event(client, tokens["staff_s01"], patient,
                                   body("icans", {"ice_score": 6, "consciousness": "unarousable"}))
    assert unarousable.status_code == 422 and paths(unarousable) == ["ice_score"]
    # Acute-only fields on chronic GVHD name the field that does not belong.
    acute_field = await post_event(client, tokens["staff_s01"], patient,
                                   body("gvhd", {"form": "chronic", "severity": "mild", "bilirubin_mg_dl": 3.0}))
    assert acute_field.status_code == 422 and paths(acute_field) == ["bilirubin_mg_dl"]
    assert await stored_count(engine, patient) == 1


async def test_an_unarousable_patient_needs_no_ice_score(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    """ASTCT ICE row, grade 4: "0 (patient is unarousable and unable to perform ICE)"."""
    answer = await post_event(client, tokens["staff_s01"], patient, body("icans", {"consciousness": "unarousable"}))
    assert answer.status_code == 201, answer.text
    assert answer.json()["data"] == {"consciousness": "unarousable", "grade": 4, "scale": "ASTCT-2019"}


async def test_chronic_gvhd_from_organ_scores_stores_severity_and_scale_beside_the_scores(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    scores = {"skin": 1, "mouth": 1, "eyes": 0, "gi": 0, "liver": 0, "lungs": 2, "joints_fascia": 0, "genital": 0}
    answer = await post_event(client, tokens["staff_s01"], patient,
                              body("gvhd", {"form": "chronic", "organ_scores": scores}))
    assert answer.status_code == 201, answer.text
    assert answer.json()["data"] == {"form": "chronic", "organ_scores": scores, "severity": "severe",
                                     "scale": "NIH-2014"}
    state = (await client.get(f"/v1/patients/{patient}", headers=bearer(tokens["staff_s01"]))).json()
    assert state["grades"]["cgvhd_severity"] == "severe"


async def test_a_chronic_severity_the_organ_scores_contradict_is_422_naming_both(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str], patient: str) -> None:
    answer = await post_event(client, tokens["staff_s01"], patient,
                              body("gvhd", {"form": "chronic", "severity": "mild", "organ_scores": {"lungs": 1}}))
    assert answer.status_code == 422
    assert paths(answer) == ["severity", "organ_scores"]
    assert "derive severity moderate" in answer.json()["errors"][0]["message"]
    nothing = await post_event(client, tokens["staff_s01"], patient,
                               body("gvhd", {"form": "chronic", "organ_scores": {"skin": 0}}))
    assert nothing.status_code == 422 and paths(nothing) == ["organ_scores"]
    out_of_range = await post_event(client, tokens["staff_s01"], patient,
                                    body("gvhd", {"form": "chronic", "organ_scores": {"lungs": 4}}))
    assert out_of_range.status_code == 422 and paths(out_of_range) == ["organ_scores.lungs"]
    assert await stored_count(engine, patient) == 1


async def test_a_correction_is_graded_and_checked_like_a_new_event(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    token = tokens["staff_s01"]
    first = (await post_event(client, token, patient, body("icans", {"grade": 1}))).json()
    fixed = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": first["event_id"], "reason": "ICE recounted",
        "replacement": body("icans", {"ice_score": 1, "consciousness": "awakens_to_voice"})}))
    assert fixed.status_code == 201
    assert fixed.json()["data"]["replacement"]["grade"] == 3
    conflict = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": first["event_id"], "reason": "x",
        "replacement": body("icans", {"grade": 2, "ice_score": 1, "consciousness": "alert"})}))
    assert conflict.status_code == 422
    assert paths(conflict) == ["replacement.grade", "replacement.ice_score", "replacement.consciousness"]
    incomplete = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": first["event_id"], "reason": "x", "replacement": body("icans", {"ice_score": 4})}))
    assert incomplete.status_code == 422 and paths(incomplete) == ["replacement.consciousness"]
    cgvhd = (await post_event(client, token, patient, body("gvhd", {"form": "chronic", "severity": "mild"}))).json()
    rescored = await post_event(client, token, patient, body("correction", {
        "corrects_event_id": cgvhd["event_id"], "reason": "scored at clinic",
        "replacement": body("gvhd", {"form": "chronic", "organ_scores": {"mouth": 2}})}))
    assert rescored.status_code == 201 and rescored.json()["data"]["replacement"]["severity"] == "moderate"
    state = (await client.get(f"/v1/patients/{patient}", headers=bearer(token))).json()
    assert state["grades"]["cgvhd_severity"] == "moderate" and state["grades"]["icans_max"] == 3
