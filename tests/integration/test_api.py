"""The ingest HTTP API (CONTRACT.md section 2): roles, problems, health, metrics, digests.

Fixtures are in conftest.py, helpers in tests/support/api.py. Every test makes its own random
subject ids, so all of them share the session's database (SQLite or PostgreSQL).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.ingest.app import create_app
from services.ingest.auth import create_token
from shared.protocol import Protocol
from shared.settings import Settings
from shared.store import eventstore
from tests.support.api import PROBLEM, bearer, enrol, enrolment, new_token, post_event, raise_alert, subject

# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/patients"), ("POST", "/v1/patients/S01-x/events"), ("GET", "/v1/patients/S01-x"),
    ("GET", "/v1/patients/S01-x/events"), ("GET", "/v1/alerts"),
    ("POST", f"/v1/alerts/{uuid.uuid4()}/acknowledge"), ("GET", "/v1/stopping-rules"), ("POST", "/v1/digests"),
])
async def test_no_token_or_an_unknown_one_is_401_with_a_bearer_challenge(
        client: httpx.AsyncClient, method: str, path: str) -> None:
    for headers in ({}, bearer("not-a-token"), {"Authorization": "Basic dXNlcjpwYXNz"}):
        answer = await client.request(method, path, headers=headers)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert answer.headers["content-type"].startswith(PROBLEM)
        assert {"type", "title", "status", "detail"} <= answer.json().keys()


async def test_a_revoked_token_is_401(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    from sqlalchemy import update

    from services.ingest.auth import token_hash
    from shared.store.tables import api_tokens

    token = await new_token(engine, "admin")  # revoked before its first use: nothing cached yet
    async with engine.begin() as conn:
        await conn.execute(update(api_tokens).where(api_tokens.c.token_hash == token_hash(token))
                           .values(revoked_at=datetime.now(UTC)))
    assert (await client.get("/v1/alerts", headers=bearer(token))).status_code == 401


async def test_only_the_hash_of_a_token_is_stored(engine: AsyncEngine) -> None:
    from sqlalchemy import select

    from shared.store.tables import api_tokens

    token = await new_token(engine, "investigator")
    async with engine.connect() as conn:
        stored = [tuple(r) for r in (await conn.execute(select(api_tokens))).all()]
    assert not any(token in str(value) for row in stored for value in row)


async def test_a_site_staff_token_needs_a_site_and_roles_are_known(engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="site"):
        await new_token(engine, "site_staff")
    with pytest.raises(ValueError, match="role"):
        await new_token(engine, "nurse")


# --------------------------------------------------------------------------- authorisation


ALLOWED = {
    # action: roles that may (admin may everything)
    "enrol": {"staff_s01", "admin"},
    "record": {"staff_s01", "admin"},
    "read_patient": {"staff_s01", "investigator", "admin"},
    "read_events": {"staff_s01", "investigator", "admin"},
    "alerts": {"staff_s01", "investigator", "admin"},
    "acknowledge": {"investigator", "admin"},
    "stopping_rules": {"investigator", "dsmb", "admin"},
    "digest": {"admin"},
}


async def _attempt(client: httpx.AsyncClient, engine: AsyncEngine, action: str, token: str, subject_id: str) -> int:
    headers = bearer(token)
    if action == "enrol":
        return (await client.post("/v1/patients", json=enrolment(), headers=headers)).status_code
    if action == "record":
        body = {"type": "follow_up", "occurred_at": "2025-12-01T10:00:00+08:00"}
        return (await post_event(client, token, subject_id, body)).status_code
    if action == "read_patient":
        return (await client.get(f"/v1/patients/{subject_id}", headers=headers)).status_code
    if action == "read_events":
        return (await client.get(f"/v1/patients/{subject_id}/events", headers=headers)).status_code
    if action == "alerts":
        return (await client.get("/v1/alerts", headers=headers)).status_code
    if action == "acknowledge":
        alert_id = await raise_alert(engine, subject_id, "S01")
        return (await client.post(f"/v1/alerts/{alert_id}/acknowledge", headers=headers)).status_code
    if action == "stopping_rules":
        return (await client.get("/v1/stopping-rules", headers=headers)).status_code
    assert action == "digest"
    return (await client.post("/v1/digests", headers=headers)).status_code


@pytest.mark.parametrize("action", list(ALLOWED))
@pytest.mark.parametrize("role", ["staff_s01", "investigator", "dsmb", "admin"])
async def test_each_role_may_do_what_its_role_allows_and_is_403_otherwise(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str], role: str, action: str) -> None:
    allowed = role in ALLOWED[action]
    subject_id = await enrol(client, tokens["admin"], "S01")
    status = await _attempt(client, engine, action, tokens[role], subject_id)
    assert status == ({"enrol": 201, "record": 201, "digest": 202}.get(action, 200) if allowed else 403)


async def test_another_sites_patient_answers_exactly_as_an_unknown_one(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str]) -> None:
    """So subject ids cannot be probed across sites (CONTRACT.md section 2)."""
    s02_patient = await enrol(client, tokens["staff_s02"], "S02")
    await raise_alert(engine, s02_patient, "S02")
    unknown = subject("S02")
    s01 = tokens["staff_s01"]
    follow_up = {"type": "follow_up", "occurred_at": "2025-12-01T10:00:00+08:00"}

    async def ask(subject_id: str) -> list[httpx.Response]:
        return [
            await client.get(f"/v1/patients/{subject_id}", headers=bearer(s01)),
            await client.get(f"/v1/patients/{subject_id}/events", headers=bearer(s01)),
            await post_event(client, s01, subject_id, follow_up),
            await post_event(client, s01, subject_id, follow_up, **{"If-Match": "1"}),
            await client.get("/v1/alerts", params={"subject_id": subject_id}, headers=bearer(s01)),
        ]

    def shape(answer: httpx.Response, subject_id: str) -> tuple[int, str, str]:
        return answer.status_code, answer.headers["content-type"], answer.text.replace(subject_id, "<subject>")

    theirs, nobodys = await ask(s02_patient), await ask(unknown)
    assert [a.status_code for a in theirs] == [404, 404, 404, 404, 200]
    assert [shape(a, s02_patient) for a in theirs] == [shape(a, unknown) for a in nobodys]
    assert theirs[-1].json() == {"alerts": []}
    # Enrolling at another site names that site, probes nothing: still refused as such.
    other_site = await client.post("/v1/patients", json=enrolment(site="S02"), headers=bearer(s01))
    assert other_site.status_code == 403 and other_site.headers["content-type"].startswith(PROBLEM)
    # S02's own staff may.
    assert (await post_event(client, tokens["staff_s02"], s02_patient, follow_up)).status_code == 201
    history = await client.get(f"/v1/patients/{s02_patient}/events", headers=bearer(tokens["staff_s02"]))
    assert [e["type"] for e in history.json()["events"]] == ["patient_enrolled", "follow_up"]
    assert len((await client.get("/v1/alerts", params={"subject_id": s02_patient},
                                 headers=bearer(tokens["staff_s02"]))).json()["alerts"]) == 1


async def test_recorded_by_is_the_tokens_user(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        token = await create_token(conn, user="dr.wang", role="site_staff", site_id="S01")
    subject_id = await enrol(client, token)
    answer = await post_event(client, token, subject_id, {"type": "relapse", "occurred_at": "2025-12-01T10:00:00Z"})
    assert answer.json()["recorded_by"] == "dr.wang"


# --------------------------------------------------------------------------- problems


async def test_unknown_routes_and_methods_are_problems(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    missing = await client.get("/v1/nothing-here", headers=bearer(tokens["admin"]))
    assert missing.status_code == 404 and missing.headers["content-type"].startswith(PROBLEM)
    wrong_method = await client.delete("/v1/alerts", headers=bearer(tokens["admin"]))
    assert wrong_method.status_code == 405 and wrong_method.headers["content-type"].startswith(PROBLEM)
    assert wrong_method.json()["status"] == 405 and "GET" in wrong_method.headers["allow"]


async def test_malformed_json_is_422(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    answer = await client.post("/v1/patients", content=b"{not json",
                               headers=bearer(tokens["admin"], **{"Content-Type": "application/json"}))
    assert answer.status_code == 422 and answer.headers["content-type"].startswith(PROBLEM)


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
async def test_a_json_body_without_a_json_content_type_is_422_saying_so(
        client: httpx.AsyncClient, tokens: dict[str, str], content_type: str | None) -> None:
    subject_id = await enrol(client, tokens["admin"])
    headers = bearer(tokens["admin"], **({"Content-Type": content_type} if content_type else {}))
    sent = b'{"type": "relapse", "occurred_at": "2025-12-01T10:00:00+08:00"}'  # what curl -d sends
    answer = await client.post(f"/v1/patients/{subject_id}/events", content=sent, headers=headers)
    assert answer.status_code == 422 and answer.headers["content-type"].startswith(PROBLEM)
    problem = answer.json()
    assert "Content-Type: application/json" in problem["detail"]
    assert [e["path"] for e in problem["errors"]] == [""]
    assert (content_type or "no Content-Type") in problem["errors"][0]["message"]
    # The same bytes as JSON are recorded; a +json type or a charset is JSON too.
    for json_type in ("application/json", "application/json; charset=utf-8"):
        stored = await client.post(f"/v1/patients/{subject_id}/events", content=sent,
                                   headers=bearer(tokens["admin"], **{"Content-Type": json_type}))
        assert stored.status_code == 201


async def test_a_store_that_cannot_be_reached_is_503_not_a_stack_trace(
        settings: Settings, protocol: Protocol, tmp_path: Any) -> None:
    broken = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/db.sqlite")
    app = create_app(settings, engine=broken, protocol=protocol)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
        answer = await client.get("/v1/alerts", headers=bearer("whatever"))
        ready = await client.get("/readyz")
    await broken.dispose()
    assert answer.status_code == 503 and answer.headers["content-type"].startswith(PROBLEM)
    assert answer.json()["title"] == "Store unavailable" and "Traceback" not in answer.text
    assert ready.status_code == 503 and ready.json()["failed"] == ["store"]


# --------------------------------------------------------------------------- health, readiness, metrics


async def test_healthz_and_readyz_need_no_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"store": "ok"}


async def test_a_failing_readiness_check_makes_readyz_503_naming_it(
        settings: Settings, engine: AsyncEngine, protocol: Protocol) -> None:
    async def nats_down() -> None:
        raise ConnectionRefusedError("nats://127.0.0.1:4222")

    async def fine() -> None:
        return None

    app = create_app(settings, engine=engine, protocol=protocol, readiness_checks={"nats": nats_down, "other": fine})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
        answer = await client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json()["failed"] == ["nats"]
    assert answer.json()["checks"]["store"] == "ok" and answer.json()["checks"]["other"] == "ok"
    assert "ConnectionRefusedError" in answer.json()["checks"]["nats"]


async def test_metrics_count_requests_by_route_and_events_by_type(
        client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    subject_id = await enrol(client, tokens["admin"])
    await post_event(client, tokens["admin"], subject_id, {"type": "relapse", "occurred_at": "2025-12-01T10:00:00Z"})
    await client.get(f"/v1/patients/{subject_id}/events", headers=bearer(tokens["admin"]))
    answer = await client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    assert 'trialwatch_http_requests_total{method="POST",route="/v1/patients",status="201"} 1.0' in text
    assert 'route="/v1/patients/{subject_id}/events",status="200"' in text
    assert 'trialwatch_events_recorded_total{type="patient_enrolled"} 1.0' in text
    assert 'trialwatch_events_recorded_total{type="relapse"} 1.0' in text
    assert "trialwatch_http_request_duration_seconds_bucket" in text


async def test_two_apps_keep_their_own_metrics(settings: Settings, engine: AsyncEngine, protocol: Protocol) -> None:
    first, second = (create_app(settings, engine=engine, protocol=protocol) for _ in range(2))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=first), base_url="http://a") as client:
        await client.get("/healthz")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://b") as client:
        text = (await client.get("/metrics")).text
    assert 'route="/healthz"' not in text


async def test_openapi_describes_the_api(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert {"/v1/patients", "/v1/patients/{subject_id}/events", "/v1/alerts", "/v1/digests"} <= schema["paths"].keys()


async def test_openapi_gives_each_write_its_headers_and_the_bearer_token(client: httpx.AsyncClient) -> None:
    # The writes read their headers themselves (not as FastAPI parameters): their documentation
    # is written out beside the routes, and must not drift from what they take.
    schema = (await client.get("/openapi.json")).json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    writes = {("/v1/patients", ()), ("/v1/patients/{subject_id}/events", ("If-Match",)),
              ("/v1/alerts/{alert_id}/acknowledge", ()), ("/v1/digests", ())}
    for path, extra in writes:
        operation = schema["paths"][path]["post"]
        headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
        assert headers == {"Idempotency-Key", *extra}, path
        assert operation["security"] == [{"HTTPBearer": []}], path


async def test_lifespan_runs_background_tasks_and_cancels_them(
        settings: Settings, engine: AsyncEngine, protocol: Protocol) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def relay() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    app = create_app(settings, engine=engine, protocol=protocol, lifespan_tasks=[relay])
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(started.wait(), 2)
        assert not cancelled.is_set()
    assert cancelled.is_set()


# --------------------------------------------------------------------------- digests


async def test_an_admin_requests_a_digest_and_gets_202_with_the_request_event(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str]) -> None:
    answer = await client.post("/v1/digests", headers=bearer(tokens["admin"]))
    assert answer.status_code == 202
    assert answer.json()["status"] == "accepted"
    async with engine.connect() as conn:
        stored = await eventstore.get_event(conn, answer.json()["request_id"])
    assert stored is not None and stored.type == "digest_requested" and stored.stream_id == "digests"
    assert stored.data == {"requested_by": stored.recorded_by}
    for role in ("investigator", "dsmb", "staff_s01"):
        assert (await client.post("/v1/digests", headers=bearer(tokens[role]))).status_code == 403


async def test_a_digest_request_with_an_idempotency_key_is_stored_once(
        client: httpx.AsyncClient, engine: AsyncEngine, tokens: dict[str, str]) -> None:
    headers = bearer(tokens["admin"], **{"Idempotency-Key": uuid.uuid4().hex})
    first = await client.post("/v1/digests", headers=headers)
    again = await client.post("/v1/digests", headers=headers)
    assert again.status_code == 202 and again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true"
