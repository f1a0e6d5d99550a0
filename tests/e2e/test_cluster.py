"""The three services on a three-node NATS JetStream cluster (a replicated stream), one node
killed under load: nothing acknowledged is lost, every urgent alert is mailed once to each
investigator, nothing is dead-lettered."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.children import ServiceChildren
from services.ingest.auth import create_token
from services.notify.capture import MailCapture
from services.notify.deliveries import MAILED_TYPES
from shared.bus import BusNames, ensure_stream
from shared.embedded_nats import free_port
from shared.events import ALERT_RAISED
from shared.patients import PATIENT_TYPES
from shared.store.tables import dead_letters, deliveries, events, outbox, processed_messages
from tests.support.clinical import at, dose, enrolment, subject_id
from tests.support.faults import NOTIFY, SAFETY, caught_up
from tests.support.nats_cluster import NatsCluster
from tests.support.system import INVESTIGATORS, eventually

pytestmark = pytest.mark.e2e

PATIENTS = 50  # six events each: enrolment, a dose, four follow-ups
URGENT = 5  # of them, with a grade 3 ICANS on top (urgent; no stopping rule counts it)
SENDERS = 8  # requests in flight at once


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "cluster").start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
async def services(
    cluster: NatsCluster, own_database_url: str, capture: MailCapture, tmp_path: Path
) -> AsyncIterator[ServiceChildren]:
    """``trialwatch ingest|safety|notify``, each its own process, given all three nodes' URLs
    (not restarted if one exits: they are to ride out the loss of a node by themselves)."""
    await cluster.ready()
    tag = uuid.uuid4().hex[:10]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALWATCH_")}
    env.update(
        TRIALWATCH_DATA_DIR=str(tmp_path / "var"), TRIALWATCH_DATABASE_URL=own_database_url,
        TRIALWATCH_NATS_URL=cluster.url, TRIALWATCH_SMTP_URL=capture.url, TRIALWATCH_STREAM_REPLICAS="3",
        TRIALWATCH_STREAM_NAME=f"TWC_{tag}", TRIALWATCH_SUBJECT_PREFIX=f"twc{tag}",
        TRIALWATCH_HTTP_PORT=str(free_port()), TRIALWATCH_INVESTIGATOR_EMAILS=",".join(INVESTIGATORS),
    )
    async with ServiceChildren(env) as children:
        base = f"http://127.0.0.1:{env['TRIALWATCH_HTTP_PORT']}"
        await eventually(lambda: _ready(base), timeout=90, interval=0.5)
        yield children


async def _ready(base: str) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{base}/readyz", timeout=2)).status_code == 200
    except httpx.HTTPError:
        return False


def follow_up(occurred_at: str) -> dict[str, Any]:
    return {"type": "follow_up", "occurred_at": occurred_at}


async def _led(cluster: NatsCluster, stream: str) -> Any:
    info = await cluster.stream_info(stream)
    return info if info.cluster is not None and info.cluster.leader else None


def icans(occurred_at: str, grade: int) -> dict[str, Any]:
    return {"type": "icans", "occurred_at": occurred_at, "grade": grade}


async def test_a_node_killed_under_load_loses_nothing_and_mails_each_urgent_alert_once(
    cluster: NatsCluster, services: ServiceChildren, own_engine: AsyncEngine, capture: MailCapture
) -> None:
    env = services.children[0].env
    stream = env["TRIALWATCH_STREAM_NAME"]
    # Three copies: a leader and two replicas (right after creation, or under load, the leader
    # may still be being elected: wait for it).
    info = await eventually(lambda: _led(cluster, stream), timeout=30, interval=0.5)
    assert info.config.num_replicas == 3
    assert info.cluster is not None and len(info.cluster.replicas or []) == 2
    # A service that does not know the setting (the safety service's own start-up) leaves it so.
    await ensure_stream(cluster.url, BusNames(stream, env["TRIALWATCH_SUBJECT_PREFIX"]))
    assert (await cluster.stream_info(stream)).config.num_replicas == 3

    async with own_engine.begin() as conn:
        token = await create_token(conn, user="nurse", role="site_staff", site_id="S01")
    subjects = [subject_id() for _ in range(PATIENTS)]
    urgent = set(subjects[:URGENT])
    requests: list[tuple[str, dict[str, Any]]] = []
    for subject in subjects:
        requests.append(("/v1/patients", enrolment(subject, enrolled_at=at(0))))
    for subject in subjects:
        path = f"/v1/patients/{subject}/events"
        requests.append((path, dose(at(1))))
        requests.extend((path, follow_up(at(1, 12, minute))) for minute in range(4))
        if subject in urgent:
            requests.append((path, icans(at(2), 3)))

    # Everything is posted, eight requests at a time; a third of the way in, the node leading
    # the stream is killed outright.
    acknowledged: list[str] = []
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    for request in requests[:PATIENTS]:  # enrolments first: an event needs its patient
        queue.put_nowait(request)
    killed: list[str] = []

    async def sender(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            path, body = queue.get_nowait()
            response = await client.post(path, json=body)
            assert response.status_code == 201, response.text
            acknowledged.append(response.json()["event_id"])
            if len(acknowledged) == len(requests) // 3 and not killed:
                killed.append("")  # claimed: the other senders go on posting meanwhile
                led = await eventually(lambda: _led(cluster, stream), timeout=30, interval=0.2)
                cluster.kill(led.cluster.leader)
                killed[0] = led.cluster.leader

    base = f"http://127.0.0.1:{env['TRIALWATCH_HTTP_PORT']}"
    async with httpx.AsyncClient(base_url=base, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        await asyncio.gather(*(sender(client) for _ in range(SENDERS)))
        for request in requests[PATIENTS:]:
            queue.put_nowait(request)
        await asyncio.gather(*(sender(client) for _ in range(SENDERS)))
    assert killed and len(acknowledged) == len(requests)

    # The two nodes left carry on: everything is published, consumed and mailed.
    async def settled() -> bool:
        async with own_engine.connect() as conn:
            unpublished = await conn.scalar(select(func.count()).select_from(outbox))
            unsent = await conn.scalar(select(func.count()).select_from(deliveries).where(deliveries.c.status != "sent"))
        if unpublished or unsent:
            return False
        try:
            return all([await caught_up(cluster.live_url.split(",")[0], stream, durable) for durable in (SAFETY, NOTIFY)])
        except nats.errors.Error:  # a consumer's leader is still being elected
            return False

    await eventually(settled, timeout=180, interval=0.5)

    async with own_engine.connect() as conn:
        stored = set((await conn.execute(select(events.c.event_id))).scalars())
        types = dict((await conn.execute(select(events.c.event_id, events.c.type))).all())
        done = set((await conn.execute(select(processed_messages.c.consumer, processed_messages.c.event_id))).all())
        alerted = set((await conn.execute(select(events.c.subject_id).where(events.c.type == ALERT_RAISED))).scalars())
        dead = await conn.scalar(select(func.count()).select_from(dead_letters))

    # Every acknowledged event is stored; every stored patient event was processed by safety (the
    # rest it acks unread), every mailed one by notify (a processed row is the effect's own: once,
    # by its primary key).
    assert set(acknowledged) <= stored
    assert {event_id for (consumer, event_id) in done if consumer == SAFETY} == {
        event_id for event_id, kind in types.items() if kind in PATIENT_TYPES}
    assert {event_id for (consumer, event_id) in done if consumer == NOTIFY} == {
        event_id for event_id, kind in types.items() if kind in MAILED_TYPES}

    # Each urgent alert mailed once to each investigator, and only those; nothing dead-lettered.
    def about(line: str) -> str:
        return next((subject for subject in subjects if subject in line), line)

    assert alerted == urgent
    mails = Counter((about(str(m["Subject"])), str(m["To"])) for m in capture.messages() if "URGENT" in str(m["Subject"]))
    assert mails == Counter({(subject, investigator): 1 for subject in urgent for investigator in INVESTIGATORS})
    assert dead == 0
    assert all(child.running for child in services.children)  # none of them fell over meanwhile
