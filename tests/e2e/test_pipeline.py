"""The whole path on real parts: HTTP → event store → JetStream → safety → notify → SMTP."""

from __future__ import annotations

import asyncio

import pytest

from shared.events import StoredEvent
from tests.support.clinical import at, crs, dose, enrolment, subject_id
from tests.support.system import INVESTIGATORS, RunningSystem, eventually

pytestmark = pytest.mark.e2e


def mails_about(system: RunningSystem, subject: str) -> list:
    return [m for m in system.capture.messages() if subject in str(m["Subject"])]


async def enrol_and_dose(system: RunningSystem, subject: str) -> None:
    async with system.client("site_staff") as client:
        response = await client.post("/v1/patients", json=enrolment(subject, enrolled_at=at(0)))
        assert response.status_code == 201, response.text
        response = await client.post(f"/v1/patients/{subject}/events", json=dose(at(1)))
        assert response.status_code == 201, response.text


async def test_grade_3_crs_posted_over_http_reaches_each_investigator_by_email(system: RunningSystem) -> None:
    subject = subject_id()
    await enrol_and_dose(system, subject)

    # A site nurse records grade 3 CRS on day 2.
    async with system.client("site_staff") as client:
        response = await client.post(f"/v1/patients/{subject}/events", json=crs(at(2), 3))
    assert response.status_code == 201, response.text

    # Each investigator receives one urgent mail naming the subject.
    mails = await eventually(lambda: len(mails_about(system, subject)) >= len(INVESTIGATORS) and mails_about(system, subject))
    assert sorted(str(m["To"]) for m in mails) == sorted(INVESTIGATORS)
    assert all("URGENT" in str(m["Subject"]) and "CRS" in str(m["Subject"]) for m in mails)

    # The alert is listed, open, for the investigators to acknowledge.
    async with system.client("investigator") as client:
        alerts = (await client.get("/v1/alerts", params={"subject_id": subject})).json()["alerts"]
        assert [a["kind"] for a in alerts] == ["crs_grade_3_plus"]
        ack = await client.post(f"/v1/alerts/{alerts[0]['alert_id']}/acknowledge")
        assert ack.status_code == 200


async def test_icans_graded_3_from_bedside_findings_is_mailed_and_its_correction_to_grade_1_withdrawn(
        system: RunningSystem) -> None:
    subject = subject_id()
    await enrol_and_dose(system, subject)

    # A nurse records what she found: ICE 1/10, awakens only to voice -> ASTCT grade 3.
    findings = {"type": "icans", "occurred_at": at(2), "ice_score": 1, "consciousness": "awakens_to_voice"}
    async with system.client("site_staff") as client:
        response = await client.post(f"/v1/patients/{subject}/events", json=findings)
        assert response.status_code == 201 and response.json()["data"]["grade"] == 3, response.text
        urgent = await eventually(lambda: len(mails_about(system, subject)) >= len(INVESTIGATORS)
                                  and mails_about(system, subject))
        assert all("URGENT" in str(m["Subject"]) and "Grade 3 ICANS" in str(m["Subject"]) for m in urgent)

        # The ICE score was recounted: 8/10 and alert -> grade 1. The urgent alert is withdrawn by mail.
        correction = {"type": "correction", "occurred_at": at(2, 12), "reason": "ICE recounted",
                      "corrects_event_id": response.json()["event_id"],
                      "replacement": findings | {"ice_score": 8, "consciousness": "alert"}}
        fixed = await client.post(f"/v1/patients/{subject}/events", json=correction)
        assert fixed.status_code == 201, fixed.text

    def withdrawn() -> list:
        return [m for m in mails_about(system, subject) if "WITHDRAWN" in str(m["Subject"])]
    mails = await eventually(lambda: len(withdrawn()) >= len(INVESTIGATORS) and withdrawn())
    assert all("Grade 3 ICANS" in str(m["Subject"]) for m in mails)
    async with system.client("investigator") as client:
        alerts = (await client.get("/v1/alerts", params={"subject_id": subject})).json()["alerts"]
    assert sorted((a["kind"], a["status"]) for a in alerts) == [("icans_grade_3_plus", "withdrawn"),
                                                                 ("icans_low_grade", "open")]


async def test_a_redelivered_message_sends_no_second_email(system: RunningSystem) -> None:
    subject = subject_id()
    await enrol_and_dose(system, subject)
    async with system.client("site_staff") as client:
        stored = (await client.post(f"/v1/patients/{subject}/events", json=crs(at(2), 4))).json()
    await eventually(lambda: len(mails_about(system, subject)) == len(INVESTIGATORS))

    # The same messages arrive again, past the broker's duplicate window (a new Nats-Msg-Id):
    # the CRS event itself and the alert event the safety service raised for it.
    async with system.client("admin") as client:
        alerts = (await client.get("/v1/alerts", params={"subject_id": subject})).json()["alerts"]
    alert_events = [e for e in await _alert_events(system, alerts[0]["alert_id"])]
    crs_event = await _stored(system, stored["event_id"])
    broker = system.safety.broker
    for event in [crs_event, *alert_events]:
        await broker.publish(event.to_message(), system.safety.names.subject(event.type),
                             headers={"Nats-Msg-Id": f"again-{event.event_id}"}, stream=system.settings.stream_name)

    # Give both consumers time to see them; still one mail per investigator, one alert.
    await asyncio.sleep(3)
    assert len(mails_about(system, subject)) == len(INVESTIGATORS)
    async with system.client("admin") as client:
        assert len((await client.get("/v1/alerts", params={"subject_id": subject})).json()["alerts"]) == 1


async def test_smtp_down_delays_the_alert_mail_and_loses_nothing(system: RunningSystem) -> None:
    subject = subject_id()
    await enrol_and_dose(system, subject)
    await system.capture.stop()

    async with system.client("site_staff") as client:
        response = await client.post(f"/v1/patients/{subject}/events", json=crs(at(2), 3))
    assert response.status_code == 201

    # The alert is raised, but its mails cannot go out yet.
    async with system.client("admin") as client:
        await eventually(lambda: _has_alert(client, subject))
    await asyncio.sleep(1.5)
    assert mails_about(system, subject) == []

    # The SMTP server comes back on the same port: each investigator gets the mail, once.
    await system.capture.start()
    await eventually(lambda: len(mails_about(system, subject)) >= len(INVESTIGATORS), timeout=30)
    await asyncio.sleep(2)
    assert sorted(str(m["To"]) for m in mails_about(system, subject)) == sorted(INVESTIGATORS)


async def _has_alert(client, subject: str) -> bool:  # type: ignore[no-untyped-def]
    return bool((await client.get("/v1/alerts", params={"subject_id": subject})).json()["alerts"])


async def _stored(system: RunningSystem, event_id: str) -> StoredEvent:
    from shared.store import eventstore

    async with system.engine.connect() as conn:
        event = await eventstore.get_event(conn, event_id)
    assert event is not None
    return event


async def _alert_events(system: RunningSystem, alert_id: str) -> list[StoredEvent]:
    from shared.events import alert_stream
    from shared.store import eventstore

    async with system.engine.connect() as conn:
        return await eventstore.read_stream(conn, alert_stream(alert_id))
