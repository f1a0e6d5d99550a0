"""What no clinic writes is refused, naming the field, and nothing is stored (CONTRACT.md section 2).

The inputs are the ones an attacker tried (issue 9): non-finite and absurd numbers, dates in year 1
or 9999, control characters, duplicated keys, oversized headers. Each answer is a 4xx problem
naming the field, and the store (events, outbox, idempotency keys) is left exactly as it was.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import exc as sa
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest import problems as problems_module
from shared.store import eventstore
from shared.store.tables import events, idempotency_keys, outbox
from tests.support.api import PROBLEM, bearer, enrol, enrolment, paths, subject

AT = "2025-12-01T10:00:00+08:00"
Send = Callable[[], Awaitable[httpx.Response]]


async def _counts(engine: AsyncEngine) -> tuple[int, ...]:
    async with engine.connect() as conn:
        return tuple([(await conn.execute(select(func.count()).select_from(t))).scalar_one()
                      for t in (events, outbox, idempotency_keys)])


@pytest.fixture
async def refused(engine: AsyncEngine) -> AsyncIterator[Callable[[Send, str], Awaitable[httpx.Response]]]:
    """``await refused(send, path)``: sends, asserts a 4xx problem naming ``path``, nothing stored."""

    async def check(send: Send, path: str) -> httpx.Response:
        before = await _counts(engine)
        answer = await send()
        assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
        assert "retry-after" not in answer.headers
        assert path in paths(answer), answer.text
        assert await _counts(engine) == before
        return answer

    yield check


@pytest.fixture
async def patient(client: httpx.AsyncClient, tokens: dict[str, str]) -> str:
    return await enrol(client, tokens["staff_s01"])


def _raw(client: httpx.AsyncClient, token: str, url: str, content: str | bytes, **headers: str) -> Send:
    return lambda: client.post(url, content=content,
                               headers=bearer(token, **{"Content-Type": "application/json", **headers}))


# The attacker's bodies, written as raw JSON text (json.dumps would refuse most of them).
EVENT_BODIES = {
    "infinite DLI": (f'{{"type": "dli", "occurred_at": "{AT}", "mnc_per_kg": Infinity}}', "mnc_per_kg"),
    "1e400 DLI": (f'{{"type": "dli", "occurred_at": "{AT}", "mnc_per_kg": 1e400}}', "mnc_per_kg"),
    "-Infinity dose": (f'{{"type": "blinatumomab_dose", "occurred_at": "{AT}", "course": 1, "day": 1, '
                       '"dose_ug": -Infinity}', "dose_ug"),
    "1e12 µg dose": (f'{{"type": "blinatumomab_dose", "occurred_at": "{AT}", "course": 1, "day": 1, '
                     '"dose_ug": 1e12}', "dose_ug"),
    "NaN lab": (f'{{"type": "lab", "occurred_at": "{AT}", "test": "wbc", "value": NaN, "unit": "10^9/L"}}',
                "value"),
    "1e308 lab": (f'{{"type": "lab", "occurred_at": "{AT}", "test": "wbc", "value": 1e308, "unit": "10^9/L"}}',
                  "value"),
    "lab above its unit's range": (f'{{"type": "lab", "occurred_at": "{AT}", "test": "hemoglobin", "value": 95, '
                                   '"unit": "g/dL"}', "value"),
    "lab lln above its unit's range": (f'{{"type": "lab", "occurred_at": "{AT}", "test": "platelets", "value": 20, '
                                       '"unit": "10^9/L", "lln": 9000}', "lln"),
    "5000-digit grade": (f'{{"type": "infection", "occurred_at": "{AT}", "grade": {"9" * 5000}, "site": "lung"}}',
                         "grade"),
    "duplicated grade": (f'{{"type": "crs", "occurred_at": "{AT}", "grade": 4, "grade": 1}}', "grade"),
    "year 1": ('{"type": "relapse", "occurred_at": "0001-01-01T00:00:00+08:00"}', "occurred_at"),
    "year 9999": ('{"type": "relapse", "occurred_at": "9999-12-31T23:59:59-12:00"}', "occurred_at"),
    "before the study's era": ('{"type": "relapse", "occurred_at": "1999-12-31T23:00:00+08:00"}', "occurred_at"),
    "NUL in organism": (f'{{"type": "infection", "occurred_at": "{AT}", "grade": 2, "site": "lung", '
                        '"organism": "E. coli\\u0000"}', "organism"),
    "lone surrogate in organism": (f'{{"type": "infection", "occurred_at": "{AT}", "grade": 2, "site": "lung", '
                                   '"organism": "\\ud800"}', "organism"),
    "newline in site": (f'{{"type": "infection", "occurred_at": "{AT}", "grade": 2, "site": "lung\\nliver"}}',
                        "site"),
    "DEL in reason": (f'{{"type": "withdrawal", "occurred_at": "{AT}", "reason": "moved\\u007f"}}', "reason"),
    "C1 in reason": (f'{{"type": "withdrawal", "occurred_at": "{AT}", "reason": "moved\\u0085away"}}', "reason"),
    "control character in a key": (f'{{"type": "relapse", "occurred_at": "{AT}", "x\\u0000": 1}}', "'x\\x00'"),
    "Infinity in a correction's replacement": (
        f'{{"type": "correction", "occurred_at": "{AT}", "corrects_event_id": "6f1c2a5e-3b7d-4c1e-9a57-2d6f0b8e4c11", '
        f'"reason": "typo", "replacement": {{"type": "dli", "occurred_at": "{AT}", "mnc_per_kg": Infinity}}}}',
        "replacement.mnc_per_kg"),
}


@pytest.mark.parametrize("name", list(EVENT_BODIES))
async def test_an_event_no_clinic_writes_is_refused_naming_the_field(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str, refused: Any, name: str) -> None:
    body, path = EVENT_BODIES[name]
    answer = await refused(_raw(client, tokens["staff_s01"], f"/v1/patients/{patient}/events", body), path)
    assert answer.status_code == 422 and answer.json()["title"] == "Invalid request"


@pytest.mark.parametrize(("changes", "path"), [
    ({"site_id": "S01\u0000"}, "site_id"),
    ({"site_id": "S01\n"}, "site_id"),
    ({"transplant_date": "0001-01-01"}, "transplant_date"),
    ({"relapse_date": "9999-12-31"}, "relapse_date"),
    ({"relapse_date": "2099-06-01"}, "relapse_date"),  # inside the era, but in the future
    ({"enrolled_at": "0001-01-01T00:00:00+08:00"}, "enrolled_at"),
    ({"eligibility_override": {"reason": "ok", "approved_by": "dr\u0000x"}}, "eligibility_override.approved_by"),
])
async def test_an_enrolment_no_clinic_writes_is_refused_naming_the_field(
        client: httpx.AsyncClient, tokens: dict[str, str], refused: Any, changes: dict[str, Any], path: str) -> None:
    body = enrolment() | changes
    await refused(lambda: client.post("/v1/patients", json=body, headers=bearer(tokens["admin"])), path)


@pytest.mark.parametrize(("field", "literal"), [("weight_kg", "Infinity"), ("age_years", "NaN"),
                                                ("weight_kg", "1e400"), ("age_years", "1e308")])
async def test_an_enrolment_with_a_non_finite_number_is_refused(
        client: httpx.AsyncClient, tokens: dict[str, str], refused: Any, field: str, literal: str) -> None:
    text = json.dumps(enrolment() | {field: "@@"}).replace('"@@"', literal)
    await refused(_raw(client, tokens["admin"], "/v1/patients", text), field)


async def test_a_duplicated_key_is_refused_wherever_it_is(
        client: httpx.AsyncClient, tokens: dict[str, str], refused: Any) -> None:
    text = json.dumps(enrolment()).replace('"drug_allergy": false', '"drug_allergy": true, "drug_allergy": false')
    await refused(_raw(client, tokens["admin"], "/v1/patients", text), "eligibility.drug_allergy")


@pytest.mark.parametrize("content", [b'{"type": "relapse", "occurred_at": "\xff\xfe"}', b"[" * 5000 + b"]" * 5000,
                                     b'{"a":' * 40 + b"1" + b"}" * 40])
async def test_an_unreadable_body_is_a_422_not_a_server_error(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str, engine: AsyncEngine, content: bytes) -> None:
    before = await _counts(engine)
    answer = await _raw(client, tokens["staff_s01"], f"/v1/patients/{patient}/events", content)()
    assert answer.status_code == 422 and answer.headers["content-type"].startswith(PROBLEM), answer.text
    assert await _counts(engine) == before


async def test_a_nul_in_the_path_or_query_is_a_422_naming_subject_id(
        client: httpx.AsyncClient, tokens: dict[str, str], refused: Any) -> None:
    admin = bearer(tokens["admin"])
    follow_up = {"type": "follow_up", "occurred_at": AT}
    for send in (lambda: client.get("/v1/patients/S01%00x", headers=admin),
                 lambda: client.get("/v1/patients/S01%00x/events", headers=admin),
                 lambda: client.post("/v1/patients/S01%00x/events", json=follow_up, headers=admin),
                 lambda: client.get("/v1/alerts", params={"subject_id": "S01\u0000x"}, headers=admin)):
        await refused(send, "subject_id")


async def test_if_match_of_5000_digits_is_a_422_naming_it(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str, refused: Any) -> None:
    follow_up = {"type": "follow_up", "occurred_at": AT}
    for value in ("9" * 5000, "\u00b2".encode("latin-1")):  # ² is a digit to str.isdigit, not to int()
        await refused(lambda v=value: client.post(f"/v1/patients/{patient}/events", json=follow_up,
                                                  headers=bearer(tokens["staff_s01"], **{"If-Match": v})),
                      "If-Match")


@pytest.mark.parametrize("key", ["k" * 201, "tab\there", b"caf\xe9"])
async def test_an_idempotency_key_too_long_or_not_printable_ascii_is_a_422_naming_it(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str, refused: Any, key: str | bytes) -> None:
    follow_up = {"type": "follow_up", "occurred_at": AT}
    headers: dict[str, Any] = {**bearer(tokens["staff_s01"]), "Idempotency-Key": key}
    await refused(lambda: client.post(f"/v1/patients/{patient}/events", json=follow_up, headers=headers),
                  "Idempotency-Key")


async def test_values_at_the_edges_of_the_plausible_ranges_are_stored(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str) -> None:
    token = tokens["staff_s01"]
    for body in ({"type": "dli", "mnc_per_kg": 1e10}, {"type": "lab", "test": "wbc", "value": 5000, "unit": "10^9/L"},
                 {"type": "lab", "test": "hemoglobin", "value": 300, "unit": "g/L"},
                 {"type": "withdrawal", "reason": "moved away;\r\n\tfollowed elsewhere"}):
        answer = await client.post(f"/v1/patients/{patient}/events", json=body | {"occurred_at": AT},
                                   headers=bearer(token))
        assert answer.status_code == 201, answer.text
    s01 = await client.post("/v1/patients", json=enrolment(subject("S01"), transplant_date="1990-01-01",
                                                           relapse_date="2000-01-01"), headers=bearer(token))
    assert s01.status_code == 201, s01.text


# --------------------------------------------------------------------------- a data error is no outage

@pytest.mark.parametrize(("error", "status"), [
    (sa.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly")), 503),
    (sa.InterfaceError("SELECT 1", {}, Exception("connection is closed")), 503),
    (ConnectionRefusedError(111, "Connection refused"), 503),
    (TimeoutError(), 503),
    (sa.DataError("INSERT", {}, Exception("invalid byte sequence for encoding UTF8: 0x00")), 422),
    (sa.IntegrityError("INSERT", {}, Exception("duplicate key")), 500),
    (sa.ProgrammingError("INSERT", {}, Exception("syntax error")), 500),
])
async def test_only_a_store_that_is_away_answers_503(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str, monkeypatch: pytest.MonkeyPatch,
        error: Exception, status: int) -> None:
    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(eventstore, "read_stream", failing)
    answer = await client.get(f"/v1/patients/{patient}", headers=bearer(tokens["staff_s01"]))
    assert answer.status_code == status and answer.headers["content-type"].startswith(PROBLEM)
    assert ("retry-after" in answer.headers) == (status == 503)


async def test_the_stores_own_refusal_of_a_nul_is_classed_as_data_not_outage(engine: AsyncEngine) -> None:
    """What PostgreSQL answers for the NUL the issue put in a path (SQLite stores it quietly)."""
    try:
        async with engine.connect() as conn:
            await eventstore.read_stream(conn, "patient-S01\u0000x")
    except sa.SQLAlchemyError as exc:
        assert problems_module.store_refused_data(exc) and not problems_module.store_unavailable(exc)
    else:
        assert engine.dialect.name == "sqlite"


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+08:00", "9999-12-31T23:59:59-12:00"])
async def test_a_query_time_at_the_ends_of_the_calendar_is_no_server_error(
        client: httpx.AsyncClient, tokens: dict[str, str], patient: str, when: str) -> None:
    admin = bearer(tokens["admin"])
    for answer in (await client.get(f"/v1/patients/{patient}/events", params={"as_of": when}, headers=admin),
                   await client.get("/v1/alerts", params={"since": when}, headers=admin)):
        assert answer.status_code == 200, answer.text
