"""A stopping boundary crossed and un-crossed on real parts: HTTP → store → JetStream → safety →
notify → SMTP, with the bundled protocol's grade >= 3 CRS rule."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from shared.clinical.boundaries import Boundary, pocock
from shared.events import ALERT_TYPES
from shared.protocol import load_protocol
from shared.store import eventstore
from shared.store.tables import patient_projection
from tests.support.clinical import SHANGHAI, at, crs, dose, enrolment, subject_id
from tests.support.system import DSMB, INVESTIGATORS, RunningSystem, eventually

pytestmark = pytest.mark.e2e

RULE_ID = "crs_grade_3_plus"
RECIPIENTS = [*INVESTIGATORS, *DSMB]
# Course 1 began a month ago: every 2-week window below has closed.
START = (datetime.now(SHANGHAI) - timedelta(days=30)).replace(hour=0, minute=0, second=0, microsecond=0)
# Alerts on what is missing (these patients' day-14 assessments) and new crossings wait this long
# after the latest record; "quiet" must outlast it to mean nothing more is coming.
SETTLED_S = load_protocol().entry.settle_seconds + 1.5


def crs_boundary() -> Boundary:
    rule = load_protocol().rule(RULE_ID)
    assert rule is not None and rule.method == "pocock"
    return pocock(rule.p0, rule.p1, rule.n_max, rule.cp0, rule.looks)


def events_needed(boundary: Boundary) -> int:
    """The fewest patients who, all with the event, cross the boundary."""
    return next(n for n in range(1, boundary.looks[-1].n + 1)
                if (stop := boundary.stop_at(n)) is not None and stop <= n)


def stopping_mails(system: RunningSystem, label: str) -> list[EmailMessage]:
    return [m for m in system.capture.messages()
            if str(m["Subject"]).startswith(f"[TrialWatch] {label} stopping rule crossed")]


def text_of(mail: EmailMessage) -> str:
    return mail.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]


def one_each(mails: list[EmailMessage]) -> bool:
    return sorted(str(m["To"]) for m in mails) == sorted(RECIPIENTS)


async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(path, json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def treat(client: httpx.AsyncClient) -> str:
    """Enrol a blinatumomab + DLI patient and give course 1 day 1, a month ago."""
    subject = subject_id()
    await post(client, "/v1/patients", enrolment(subject, enrolled_at=at(0, start=START)))
    await post(client, f"/v1/patients/{subject}/events", dose(at(1, 9, start=START)))
    return subject


async def crs_rule(system: RunningSystem) -> dict[str, Any]:
    async with system.client("dsmb") as client:
        response = await client.get("/v1/stopping-rules")
    assert response.status_code == 200, response.text
    return next(r for r in response.json()["rules"] if r["rule_id"] == RULE_ID)


async def stopping_alerts(system: RunningSystem) -> list[dict[str, Any]]:
    async with system.client("investigator") as client:
        alerts = (await client.get("/v1/alerts")).json()["alerts"]
    return [a for a in alerts if a["kind"] == "stopping_boundary_crossed"]


async def alert_event_count(system: RunningSystem) -> int:
    async with system.engine.connect() as conn:
        return len(await eventstore.read_types(conn, ALERT_TYPES))


async def safety_has_seen(system: RunningSystem, subject: str, event_id: str) -> bool:
    async with system.engine.connect() as conn:
        event = await eventstore.get_event(conn, event_id)
        seen = (await conn.execute(select(patient_projection.c.last_position)
                                   .where(patient_projection.c.subject_id == subject))).scalar()
    return event is not None and seen is not None and seen >= event.position


async def quiet(system: RunningSystem, *, for_s: float = 1.5) -> int:
    """Wait until no mail has arrived for ``for_s`` seconds; return how many there are."""
    count = -1
    while (now := len(system.capture.messages())) != count:
        count = now
        await asyncio.sleep(for_s)
    return count


async def test_crossing_the_crs_boundary_alerts_investigators_and_dsmb_once_and_a_correction_withdraws_it(
    system: RunningSystem,
) -> None:
    boundary = crs_boundary()
    needed = events_needed(boundary)

    async with system.client("site_staff") as site:
        # One patient comes through the 2-week window without CRS ...
        calm = await treat(site)
        # ... then `needed` patients each have grade 3 CRS on day 2, an hour apart.
        crs_events = []
        for hour in range(needed):
            subject = await treat(site)
            crs_events.append((subject, await post(site, f"/v1/patients/{subject}/events",
                                                   crs(at(2, 8 + hour, start=START), 3))))

    # Each investigator and each DSMB member gets one urgent stopping-rule mail.
    raised = await eventually(lambda: one_each(stopping_mails(system, "URGENT")) and stopping_mails(system, "URGENT"))

    # The DSMB's report: the events reach the boundary at this look; crossed.
    evaluable = needed + 1
    rule = await crs_rule(system)
    assert (rule["evaluable"], rule["events"], rule["stop_at"], rule["crossed"]) == (
        evaluable, needed, boundary.stop_at(evaluable), True)
    assert rule["crossed_at_look"] == needed and rule["status"] == "crossed"

    # One trial-level alert, open.
    alerts = await stopping_alerts(system)
    assert [(a["rule"], a["status"], a["severity"], a["subject_id"]) for a in alerts] == [
        (RULE_ID, "open", "urgent", None)]
    facts = alerts[0]["facts"]
    assert (facts["events"], facts["evaluable"], facts["stop_at"]) == (needed, evaluable, boundary.stop_at(evaluable))

    # Every mail states events / evaluable and the boundary at this look.
    for mail in raised:
        body = text_of(mail)
        assert f"{needed} events / {evaluable} evaluable; stops at {boundary.stop_at(evaluable)} at this look" in body
        assert mail["Importance"] == "high"

    # The last CRS was mis-graded: a correction to grade 1.
    subject, stored = crs_events[-1]
    async with system.client("site_staff") as site:
        await post(site, f"/v1/patients/{subject}/events", {
            "type": "correction", "occurred_at": datetime.now(SHANGHAI).isoformat(),
            "corrects_event_id": stored["event_id"], "reason": "grade transcribed wrongly",
            "replacement": crs(stored["occurred_at"], 1),
        })

    # Everyone who had the crossing alert gets one "withdrawn" notice, threaded to it.
    withdrawn = await eventually(
        lambda: one_each(stopping_mails(system, "WITHDRAWN")) and stopping_mails(system, "WITHDRAWN"))
    first_by_recipient = {str(m["To"]): m["Message-ID"] for m in raised}
    for mail in withdrawn:
        assert str(mail["In-Reply-To"]).strip() == first_by_recipient[str(mail["To"])]  # folded: strip
        assert "grade transcribed wrongly" in text_of(mail)

    # The rule is no longer crossed; the alert is withdrawn, not deleted.
    rule = await crs_rule(system)
    assert (rule["evaluable"], rule["events"], rule["crossed"]) == (evaluable, needed - 1, False)
    assert [a["status"] for a in await stopping_alerts(system)] == ["withdrawn"]

    # Once everything has settled, an unrelated event (a follow-up contact) raises and sends nothing,
    # then or once it has settled in turn.
    mails_before = await quiet(system, for_s=SETTLED_S)
    alerts_before = await alert_event_count(system)
    async with system.client("site_staff") as site:
        contact = await post(site, f"/v1/patients/{calm}/events",
                             {"type": "follow_up", "occurred_at": at(20, start=START)})
    await eventually(lambda: safety_has_seen(system, calm, contact["event_id"]))
    await asyncio.sleep(SETTLED_S)
    assert await alert_event_count(system) == alerts_before
    assert len(system.capture.messages()) == mails_before
    assert len(stopping_mails(system, "URGENT")) == len(stopping_mails(system, "WITHDRAWN")) == len(RECIPIENTS)
    assert [a["status"] for a in await stopping_alerts(system)] == ["withdrawn"]
