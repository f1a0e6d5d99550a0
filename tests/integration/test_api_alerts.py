"""Alerts: listing, filters, site visibility and acknowledgement (CONTRACT.md section 2)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.events import ALERT_WITHDRAWN, NewEvent, alert_stream
from shared.store import eventstore
from tests.support.api import bearer, enrol, paths, raise_alert, subject


async def _alerts(client: httpx.AsyncClient, token: str, **params: str) -> list[dict[str, object]]:
    answer = await client.get("/v1/alerts", params=params, headers=bearer(token))
    assert answer.status_code == 200, answer.text
    return answer.json()["alerts"]  # type: ignore[no-any-return]


async def test_alerts_newest_first_filtered_by_subject_and_since(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str]) -> None:
    subject_id, now = subject(), datetime.now(UTC)
    older = await raise_alert(engine, subject_id, "S01", kind="crs_low_grade", recorded_at=now - timedelta(hours=2))
    newer = await raise_alert(engine, subject_id, "S01", kind="relapse", recorded_at=now - timedelta(hours=1))
    elsewhere = await raise_alert(engine, subject(), "S01")
    token = tokens["investigator"]

    mine = await _alerts(client, token, subject_id=subject_id)
    assert [a["alert_id"] for a in mine] == [str(newer), str(older)]
    assert mine[0]["kind"] == "relapse" and mine[0]["status"] == "open" and mine[0]["acknowledged"] is False
    everything = [a["alert_id"] for a in await _alerts(client, token)]
    assert str(elsewhere) in everything
    raised = [datetime.fromisoformat(str(a["raised_at"])) for a in await _alerts(client, token)]
    assert raised == sorted(raised, reverse=True)

    since = (now - timedelta(minutes=90)).isoformat()
    assert [a["alert_id"] for a in await _alerts(client, token, subject_id=subject_id, since=since)] == [str(newer)]
    naive = await client.get("/v1/alerts", params={"since": "2025-01-01T00:00:00"}, headers=bearer(token))
    assert naive.status_code == 422 and paths(naive) == ["since"]


async def test_site_staff_see_only_their_sites_alerts(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str]) -> None:
    s01, s02 = await raise_alert(engine, subject("S01"), "S01"), await raise_alert(engine, subject("S02"), "S02")
    trial_wide = await raise_alert(engine, None, None, kind="stopping_boundary_crossed")
    # An alert naming an enrolled patient but no site takes the patient's site.
    s02_patient = await enrol(client, tokens["staff_s02"], "S02")
    implied = await raise_alert(engine, s02_patient, None)

    seen_by_s01 = {a["alert_id"] for a in await _alerts(client, tokens["staff_s01"])}
    assert str(s01) in seen_by_s01 and not {str(s02), str(trial_wide), str(implied)} & seen_by_s01
    seen_by_s02 = {a["alert_id"] for a in await _alerts(client, tokens["staff_s02"])}
    assert {str(s02), str(implied)} <= seen_by_s02 and str(s01) not in seen_by_s02
    seen_by_investigator = {a["alert_id"] for a in await _alerts(client, tokens["investigator"])}
    assert {str(s01), str(s02), str(trial_wide), str(implied)} <= seen_by_investigator


async def test_an_investigator_acknowledges_an_alert_once(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str]) -> None:
    alert_id = await raise_alert(engine, subject(), "S01")
    path = f"/v1/alerts/{alert_id}/acknowledge"
    first = await client.post(path, json={"note": "seen, patient on ICU"}, headers=bearer(tokens["investigator"]))
    assert first.status_code == 200
    view = first.json()
    assert view["alert_id"] == str(alert_id) and view["acknowledged"] is True and view["acknowledged_by"]
    again = await client.post(path, headers=bearer(tokens["admin"]))
    assert again.status_code == 200 and again.json()["acknowledged_by"] == view["acknowledged_by"]
    async with engine.connect() as conn:
        stream = await eventstore.read_stream(conn, alert_stream(alert_id))
    assert [e.type for e in stream] == ["safety_alert_raised", "alert_acknowledged"]
    assert stream[1].data == {"alert_id": str(alert_id), "note": "seen, patient on ICU"}
    listed = await _alerts(client, tokens["investigator"], subject_id=str(view["subject_id"]))
    assert listed[0]["acknowledged"] is True


async def test_acknowledging_an_unknown_alert_is_404(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    answer = await client.post(f"/v1/alerts/{uuid.uuid4()}/acknowledge", headers=bearer(tokens["investigator"]))
    assert answer.status_code == 404 and answer.headers["content-type"].startswith("application/problem+json")
    not_an_id = await client.post("/v1/alerts/42/acknowledge", headers=bearer(tokens["investigator"]))
    assert not_an_id.status_code == 422 and paths(not_an_id) == ["alert_id"]


async def test_acknowledge_with_an_idempotency_key(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str]) -> None:
    alert_id = await raise_alert(engine, subject(), "S01")
    headers = bearer(tokens["investigator"], **{"Idempotency-Key": uuid.uuid4().hex})
    first = await client.post(f"/v1/alerts/{alert_id}/acknowledge", json={"note": "ok"}, headers=headers)
    again = await client.post(f"/v1/alerts/{alert_id}/acknowledge", json={"note": "ok"}, headers=headers)
    assert first.json() == again.json() and again.headers["idempotent-replayed"] == "true"
    other = await client.post(f"/v1/alerts/{alert_id}/acknowledge", json={"note": "changed"}, headers=headers)
    assert other.status_code == 422 and paths(other) == ["Idempotency-Key"]


async def test_withdrawn_alerts_are_listed_with_their_status_and_not_open_on_the_patient(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str]) -> None:
    subject_id = await enrol(client, tokens["admin"])
    alert_id = await raise_alert(engine, subject_id, "S01")
    withdrawn = NewEvent(type=ALERT_WITHDRAWN, subject_id=subject_id, occurred_at=datetime.now(UTC),
                         recorded_by="safety", data={"alert_id": str(alert_id), "kind": "crs_grade_3_plus",
                                                     "severity": "urgent", "title": "t", "reason": "corrected"})
    async with engine.begin() as conn:
        await eventstore.append(conn, alert_stream(alert_id), [withdrawn])
    listed = await _alerts(client, tokens["investigator"], subject_id=subject_id)
    assert [(a["status"], a["withdrawn_reason"]) for a in listed] == [("withdrawn", "corrected")]
    assert await _alerts(client, tokens["investigator"], subject_id=subject_id, status="open") == []
    patient = (await client.get(f"/v1/patients/{subject_id}", headers=bearer(tokens["investigator"]))).json()
    assert patient["open_alerts"] == []
