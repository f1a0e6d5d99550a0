"""Faults on the whole path (issue 2): a delivery past the broker's duplicate window, a burst of
events, a broker restart, a safety service killed in the middle of a message. Each time every
event takes effect exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.notify.capture import MailCapture
from services.notify.deliveries import MAILED_TYPES
from shared.bus import ensure_stream
from shared.embedded_nats import EmbeddedNats
from shared.events import ALERT_RAISED, StoredEvent
from shared.patients import PATIENT_TYPES
from shared.store import eventstore
from shared.store.tables import dead_letters, deliveries, events, processed_messages
from tests.support.clinical import at, crs, dose, enrolment, subject_id
from tests.support.faults import (
    NOTIFY,
    SAFETY,
    DyingSafety,
    consumer,
    declare_consumer,
    names_of,
    own_nats,  # noqa: F401 - fixture
    processed,
    publish,
    restart_safety,
    settled,
    stop_safety,
)
from tests.support.system import INVESTIGATORS, RunningSystem, eventually, session_settings, start_system, stop_system

pytestmark = pytest.mark.e2e


# --------------------------------------------------------------------------- the story's steps


async def post(system: RunningSystem, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with system.client("site_staff") as client:
        response = await client.post(path, json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def enrol_and_dose(system: RunningSystem, subject: str) -> None:
    await post(system, "/v1/patients", enrolment(subject, enrolled_at=at(0)))
    await post(system, f"/v1/patients/{subject}/events", dose(at(1)))


def follow_up(occurred_at: str) -> dict[str, Any]:
    return {"type": "follow_up", "occurred_at": occurred_at}


def mails_about(system: RunningSystem, subject: str) -> list[str]:
    """The addressees of every alert mail naming ``subject``, one entry per mail."""
    return sorted(str(m["To"]) for m in system.capture.messages() if subject in str(m["Subject"]))


async def alerts_raised(system: RunningSystem, subject: str) -> list[StoredEvent]:
    async with system.engine.connect() as conn:
        return await eventstore.read_types(conn, [ALERT_RAISED], subject_id=subject)


async def stored(system: RunningSystem, event_id: str) -> StoredEvent:
    async with system.engine.connect() as conn:
        event = await eventstore.get_event(conn, event_id)
    assert event is not None
    return event


async def quiet(system: RunningSystem, timeout: float = 20) -> None:
    """Wait until nothing is left to do: the positive signal before counting what happened."""
    await eventually(lambda: settled(system), timeout=timeout, interval=0.2)


async def dead_lettered(system: RunningSystem) -> int:
    async with system.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(dead_letters)) or 0)


async def ready(system: RunningSystem) -> tuple[int, list[str]]:
    async with system.client() as client:
        response = await client.get("/readyz")
    return response.status_code, response.json()["failed"]


# --------------------------------------------------------------------------- systems


@pytest.fixture
async def system_on_own_nats(
    tmp_path: Path, own_engine: AsyncEngine, own_nats: EmbeddedNats, capture: MailCapture  # noqa: F811
) -> AsyncIterator[tuple[RunningSystem, EmbeddedNats]]:
    settings = session_settings(tmp_path, own_nats.url, capture.url)
    running = await start_system(settings, own_engine, capture)
    try:
        yield running, own_nats
    finally:
        await stop_system(running)


@pytest.fixture
async def system_with_short_ack_wait(
    tmp_path: Path, own_engine: AsyncEngine, nats_url: str, capture: MailCapture
) -> AsyncIterator[RunningSystem]:
    """The safety consumer is declared with a 2 s ack wait (the service binds to it as it finds
    it), so a message a dead process held comes back in 2 s rather than the service's 60."""
    settings = session_settings(tmp_path, nats_url, capture.url)
    await ensure_stream(nats_url, names_of(settings))
    await declare_consumer(nats_url, names_of(settings), SAFETY, ack_wait=2, max_deliver=-1)
    running = await start_system(settings, own_engine, capture)
    try:
        yield running
    finally:
        await stop_system(running)


# --------------------------------------------------------------------------- the stories


async def test_an_event_delivered_again_after_the_duplicate_window_changes_nothing_in_the_store(
    system: RunningSystem,
) -> None:
    subject = subject_id()
    await enrol_and_dose(system, subject)
    posted = await post(system, f"/v1/patients/{subject}/events", crs(at(2), 3))
    await eventually(lambda: len(mails_about(system, subject)) == len(INVESTIGATORS))
    await quiet(system)
    [alert] = await alerts_raised(system, subject)

    # The broker delivers the CRS event again under a new Nats-Msg-Id, as it would once its
    # duplicate window (minutes) has passed: the JetStream dedupe cannot catch it.
    crs_event = await stored(system, posted["event_id"])
    settings = system.settings
    await publish(settings.nats_url or "", settings.stream_name, names_of(settings).subject("crs"),
                  crs_event.model_dump_json().encode(), msg_id=f"after-the-window-{crs_event.event_id}")

    # Both consumers take and ack it; the store holds one processed row and the one alert.
    await quiet(system)
    assert await processed(system.engine, SAFETY, crs_event.event_id) == 1
    assert await alerts_raised(system, subject) == [alert]
    assert mails_about(system, subject) == sorted(INVESTIGATORS)
    assert await dead_lettered(system) == 0


async def test_a_burst_of_events_is_processed_exactly_once_by_each_consumer(system: RunningSystem) -> None:
    # Three patients, ten events each, posted at once; one patient has grade 3 CRS.
    subjects = [subject_id() for _ in range(3)]

    async def history(subject: str, *, crs_grade_3: bool) -> None:
        await post(system, "/v1/patients", enrolment(subject, enrolled_at=at(0)))
        await post(system, f"/v1/patients/{subject}/events", dose(at(1)))
        for minute in range(7):
            await post(system, f"/v1/patients/{subject}/events", follow_up(at(1, 12, minute)))
        await post(system, f"/v1/patients/{subject}/events", crs(at(2), 3) if crs_grade_3 else follow_up(at(2)))

    await asyncio.gather(*(history(s, crs_grade_3=s == subjects[0]) for s in subjects))
    await quiet(system, timeout=30)

    # Every stored event was published once and delivered once to each consumer, no redelivery.
    async with system.engine.connect() as conn:
        types = Counter((await conn.execute(select(events.c.type))).scalars())
        done = dict((await conn.execute(select(processed_messages.c.consumer, func.count())
                                        .group_by(processed_messages.c.consumer))).all())
        queued = await conn.scalar(select(func.count()).select_from(deliveries))
    total = sum(types.values())
    assert total >= 30
    for durable in (SAFETY, NOTIFY):
        info = await consumer(system.settings.nats_url or "", system.settings.stream_name, durable)
        assert info.delivered is not None and info.delivered.consumer_seq == info.delivered.stream_seq == total
    assert done[SAFETY] == sum(n for t, n in types.items() if t in PATIENT_TYPES)  # the rest acked unread
    assert done[NOTIFY] == sum(n for t, n in types.items() if t in MAILED_TYPES)

    # One alert, for the grade 3 CRS; each mail once, each investigator once.
    assert [len(await alerts_raised(system, s)) for s in subjects] == [1, 0, 0]
    assert mails_about(system, subjects[0]) == sorted(INVESTIGATORS)
    ids = Counter(str(m["Message-ID"]) for m in system.capture.messages())
    assert sum(ids.values()) == len(ids) == queued
    assert await dead_lettered(system) == 0


async def test_after_a_broker_restart_the_alert_mail_arrives_once(
    system_on_own_nats: tuple[RunningSystem, EmbeddedNats],
) -> None:
    system, broker = system_on_own_nats
    subject = subject_id()
    await enrol_and_dose(system, subject)
    await quiet(system)

    # The broker goes down. The API still records the grade 3 CRS (it is in the store, its
    # outbox row waits) and says it is not ready.
    broker.stop()
    posted = await post(system, f"/v1/patients/{subject}/events", crs(at(2), 3))
    assert await ready(system) == (503, ["bus"])

    # The broker comes back on the same port and store: relay and consumers carry on.
    broker.start()
    await eventually(lambda: len(mails_about(system, subject)) >= len(INVESTIGATORS), timeout=30)
    await quiet(system, timeout=30)
    assert await processed(system.engine, SAFETY, posted["event_id"]) == 1  # it came over the bus
    assert len(await alerts_raised(system, subject)) == 1
    assert mails_about(system, subject) == sorted(INVESTIGATORS)
    assert await dead_lettered(system) == 0
    assert await ready(system) == (200, [])


@pytest.mark.parametrize("killed_at", ["before commit", "after commit"])
async def test_a_safety_service_killed_mid_message_raises_the_alert_once_after_restart(
    system_with_short_ack_wait: RunningSystem, killed_at: str
) -> None:
    system = system_with_short_ack_wait
    subject = subject_id()
    await enrol_and_dose(system, subject)
    await quiet(system)

    # The safety service is replaced by one that dies in the middle of the next CRS message.
    await stop_safety(system)
    dying = await DyingSafety(system, event_type="crs", killed_at=killed_at).start()
    posted = await post(system, f"/v1/patients/{subject}/events", crs(at(2), 3))
    await asyncio.wait_for(dying.reached.wait(), timeout=10)
    committed = await processed(system.engine, SAFETY, posted["event_id"])
    assert committed == (1 if killed_at == "after commit" else 0)
    await dying.kill()  # the message is neither acked nor nak'ed

    # The safety service starts again; the broker hands it the message once the ack wait runs out.
    await restart_safety(system)
    await eventually(lambda: len(mails_about(system, subject)) >= len(INVESTIGATORS), timeout=20)
    await quiet(system)
    assert await processed(system.engine, SAFETY, posted["event_id"]) == 1  # the redelivery, not the start-up sweep
    assert len(await alerts_raised(system, subject)) == 1
    assert mails_about(system, subject) == sorted(INVESTIGATORS)
    assert await dead_lettered(system) == 0
