"""Helpers for the ingest API tests: bodies, bearer headers, problem paths, a seeded alert."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.auth import create_token
from shared.events import ALERT_RAISED, AlertRaised, NewEvent, alert_id_for, alert_stream
from shared.store import eventstore

PROBLEM = "application/problem+json"


async def new_token(engine: AsyncEngine, role: str, site: str | None = None) -> str:
    async with engine.begin() as conn:
        return await create_token(conn, user=f"{role}-{site or 'all'}-{uuid.uuid4().hex[:4]}", role=role, site_id=site)


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def subject(site: str = "S01") -> str:
    return f"{site}-{uuid.uuid4().hex[:8]}"


def enrolment(subject_id: str | None = None, site: str = "S01", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "subject_id": subject_id or subject(site), "site_id": site, "arm": "blinatumomab_dli",
        "enrolled_at": "2025-11-24T09:30:00+08:00", "age_years": 34, "weight_kg": 61.5,
        "cohort": "hematologic_relapse", "transplant_date": "2025-03-02", "relapse_date": "2025-11-20",
        "eligibility": {"stable_vital_signs": True, "severe_infection": False, "gvhd_grade_2_to_4": False,
                        "organ_failure": False, "cns_leukemia": False, "drug_allergy": False},
        "eligibility_override": None,
    }
    return body | changes


async def enrol(client: httpx.AsyncClient, token: str, site: str = "S01", **changes: Any) -> str:
    body = enrolment(site=site, **changes)
    answer = await client.post("/v1/patients", json=body, headers=bearer(token))
    assert answer.status_code == 201, answer.text
    return str(body["subject_id"])


async def post_event(client: httpx.AsyncClient, token: str, subject_id: str, body: dict[str, Any],
                     **headers: str) -> httpx.Response:
    return await client.post(f"/v1/patients/{subject_id}/events", json=body, headers=bearer(token, **headers))


def paths(answer: httpx.Response) -> list[str]:
    assert answer.headers["content-type"].startswith(PROBLEM), answer.text
    return [e["path"] for e in answer.json().get("errors", [])]


async def raise_alert(engine: AsyncEngine, subject_id: str | None, site: str | None, *, kind: str = "crs_grade_3_plus",
                      recorded_at: datetime | None = None) -> uuid.UUID:
    """What the safety service would do: a ``safety_alert_raised`` event in the alert's own stream."""
    alert_id = alert_id_for(subject_id, kind, uuid.uuid4())
    data = AlertRaised(alert_id=alert_id, kind=kind, severity="urgent", subject_id=subject_id, site_id=site,
                       title=f"{kind} for {subject_id}", detail="seeded by a test", rule=kind).model_dump(mode="json")
    event = NewEvent(type=ALERT_RAISED, subject_id=subject_id, occurred_at=datetime.now(UTC),
                     recorded_by="safety", data=data)
    async with engine.begin() as conn:
        await eventstore.append(conn, alert_stream(alert_id), [event], recorded_at=recorded_at)
    return alert_id
