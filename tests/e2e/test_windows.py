"""Time alone raises alerts: due checks across restarts and while running; window edges (CONTRACT.md section 4).

A day14 assessment falls overdue at a trial-zone midnight, so these stories put course 1 day 1
twenty days back and run the services on a clock the test sets: the wall clock shifted back so
that the deadline (the midnight starting day 18) lies just ahead of "now". The clock only ever
lags the wall clock, so what is stored as "now" is never in the future.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.notify.capture import MailCapture
from shared.events import ALERT_RAISED, ALERT_TYPES
from shared.store import eventstore
from shared.store.eventstore import utc
from shared.store.tables import due_checks
from tests.support.clinical import crs, dose, enrolment, subject_id
from tests.support.system import (
    INVESTIGATORS,
    RunningSystem,
    equals,
    eventually,
    session_settings,
    start_system,
    stop_system,
)

pytestmark = pytest.mark.e2e

SHANGHAI = ZoneInfo("Asia/Shanghai")


class Clock:
    """The wall clock shifted by an offset the test sets; it keeps running."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def set(self, when: datetime) -> None:
        self.offset = when - datetime.now(UTC)


def course_start() -> date:
    """Course 1 day 1: twenty trial-zone days ago (so every window below is in the wall clock's past)."""
    return datetime.now(SHANGHAI).date() - timedelta(days=20)


def on(day1: date, day: int, hour: int = 10, minute: int = 0) -> datetime:
    return datetime.combine(day1 + timedelta(days=day - 1), time(hour, minute), tzinfo=SHANGHAI)


def overdue_from(day1: date) -> datetime:
    return on(day1, 18, 0).astimezone(UTC)


Start = Callable[[Clock], Awaitable[RunningSystem]]


@pytest.fixture
async def start(tmp_path: Path, own_engine: AsyncEngine, nats_url: str,
                capture: MailCapture) -> AsyncIterator[Start]:
    """Start the whole system, again and again on the same store and stream (a restart)."""
    settings = session_settings(tmp_path, nats_url, capture.url)
    running: list[RunningSystem] = []

    async def starter(clock: Clock) -> RunningSystem:
        system = await start_system(settings, own_engine, capture, clock=clock)
        running.append(system)
        return system

    yield starter
    for system in running:
        if not system.server.should_exit:
            await stop_system(system)


async def treat(system: RunningSystem, day1: date) -> str:
    """An MRD-positive patient dosed on days 1 and 5 (a course long enough: no deviation).

    Between the two posts the course is one dose given weeks ago, a finished course too short;
    the safety service may fold the history just then, and holds that alert until the entry has
    settled (protocol ``entry``), by when day 5 is in."""
    subject = subject_id()
    async with system.client("site_staff") as client:
        body = enrolment(subject, cohort="mrd_positive", enrolled_at=on(day1, 0, 9).isoformat())
        response = await client.post("/v1/patients", json=body)
        assert response.status_code == 201, response.text
        for day in (1, 5):
            response = await client.post(f"/v1/patients/{subject}/events",
                                         json=dose(on(day1, day).isoformat(), day=day, dose_ug=28.0))
            assert response.status_code == 201, response.text
    return subject


async def due_at(system: RunningSystem, subject: str) -> datetime | None:
    async with system.engine.connect() as conn:
        due = await conn.scalar(select(due_checks.c.due_at).where(due_checks.c.subject_id == subject))
    return utc(due) if due is not None else None


async def alerts(system: RunningSystem, subject: str) -> list[dict[str, Any]]:
    async with system.client("investigator") as client:
        answer = await client.get("/v1/alerts", params={"subject_id": subject})
    assert answer.status_code == 200, answer.text
    return answer.json()["alerts"]  # type: ignore[no-any-return]


def mails_about(system: RunningSystem, subject: str) -> list[Any]:
    return [m for m in system.capture.messages() if subject in str(m["Subject"])]


async def one_overdue_mail_each(system: RunningSystem, subject: str) -> None:
    mails = await eventually(lambda: len(mails_about(system, subject)) >= len(INVESTIGATORS)
                             and mails_about(system, subject))
    assert sorted(str(m["To"]) for m in mails) == sorted(INVESTIGATORS)
    assert all("HIGH" in str(m["Subject"]) for m in mails)


async def test_a_deadline_passed_while_the_service_was_down_alerts_once_after_any_number_of_restarts(
        start: Start) -> None:
    day1 = course_start()
    deadline = overdue_from(day1)
    clock = Clock()
    clock.set(deadline - timedelta(minutes=1))

    # The patient is treated; the safety service waits for the day14 deadline.
    first = await start(clock)
    subject = await treat(first, day1)
    assert await eventually(lambda: equals(due_at(first, subject), deadline), timeout=10)
    assert await alerts(first, subject) == []

    # It is stopped before the deadline and started again after it.
    await stop_system(first)
    clock.set(deadline + timedelta(seconds=1))
    second = await start(clock)

    # One overdue alert, one mail to each investigator.
    [overdue] = await eventually(lambda: alerts(second, subject))
    assert (overdue["kind"], overdue["severity"], overdue["status"]) == ("assessment_overdue", "high", "open")
    await one_overdue_mail_each(second, subject)
    await stop_system(second)

    # A second restart: still that one alert, those two mails.
    third = await start(clock)
    await asyncio.sleep(1.5)
    assert [a["alert_id"] for a in await alerts(third, subject)] == [overdue["alert_id"]]
    assert len(await _alert_events(third, subject)) == 1
    assert len(mails_about(third, subject)) == len(INVESTIGATORS)


async def test_a_deadline_passing_while_running_raises_the_alert_with_nothing_recorded(start: Start) -> None:
    day1 = course_start()
    deadline = overdue_from(day1)
    clock = Clock()
    system = await start(clock)

    # Shortly before the deadline the patient's history is in; nothing is overdue yet. (The lead
    # leaves room for a slow machine to record the history before the deadline.)
    clock.set(deadline - timedelta(seconds=10))
    subject = await treat(system, day1)
    assert await eventually(lambda: equals(due_at(system, subject), deadline), timeout=9)
    assert clock() < deadline and await alerts(system, subject) == []

    # Nothing more is recorded. The scheduler's check raises the alert once the deadline passes.
    [overdue] = await eventually(lambda: alerts(system, subject), timeout=30)
    assert clock() >= deadline
    assert overdue["kind"] == "assessment_overdue"
    # Raised by the due check, not in answer to an event.
    [raised] = await _alert_events(system, subject)
    assert raised.type == ALERT_RAISED and raised.causation_id is None
    await one_overdue_mail_each(system, subject)


async def test_grade_3_crs_at_day_14_2359_counts_in_the_2_week_window_and_at_day_15_0000_does_not(
        start: Start) -> None:
    system = await start(Clock())  # the wall clock: both windows closed a week ago
    day1 = course_start()

    # Two patients, each with grade 3 CRS either side of the midnight that ends day 14.
    inside, outside = await treat(system, day1), await treat(system, day1)
    async with system.client("site_staff") as client:
        for subject, when in ((inside, on(day1, 14, 23, 59)), (outside, on(day1, 15, 0, 0))):
            response = await client.post(f"/v1/patients/{subject}/events", json=crs(when.isoformat(), 3))
            assert response.status_code == 201, response.text

    # Each gets its urgent CRS alert; only the day-14 one counts toward the 2-week incidence.
    async def crs_alert(subject: str) -> dict[str, Any] | None:
        return next((a for a in await alerts(system, subject) if a["kind"] == "crs_grade_3_plus"), None)

    counted = {s: (await eventually(lambda s=s: crs_alert(s)))["facts"]["counts_toward"] for s in (inside, outside)}
    assert "crs_grade_3_plus_2w" in counted[inside] and "crs_grade_3_plus_2w" not in counted[outside]

    # The stopping rule on it: both patients evaluable (their windows closed), one event.
    async with system.client("investigator") as client:
        rules = (await client.get("/v1/stopping-rules")).json()["rules"]
        view = (await client.get(f"/v1/patients/{inside}")).json()
    [rule] = [r for r in rules if r["rule_id"] == "crs_grade_3_plus"]
    assert (rule["evaluable"], rule["events"]) == (2, 1)
    assert view["windows"]["day14"]["end"] == on(day1, 14).date().isoformat()



async def _alert_events(system: RunningSystem, subject: str) -> list[Any]:
    async with system.engine.connect() as conn:
        return await eventstore.read_types(conn, ALERT_TYPES, subject_id=subject)
