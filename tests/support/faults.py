"""Faults on real parts (issue 2): a NATS server of the test's own, to stop and start; a look at
the broker's books (what a stream holds, how far a consumer got); a safety service that dies in
the middle of a message."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from faststream.nats import NatsBroker
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.safety.app import SafetyService
from services.safety.consumer import DURABLE as SAFETY
from shared.bus import BusNames
from shared.consuming import Subscription, durable_router
from shared.embedded_nats import EmbeddedNats
from shared.events import StoredEvent
from shared.settings import Settings
from shared.store.tables import deliveries, outbox, processed_messages
from tests.support.system import RunningSystem, nats_url_from_env

NOTIFY = "notify"


def fresh_names() -> BusNames:
    tag = uuid.uuid4().hex[:10]
    return BusNames(stream=f"TWF_{tag}", prefix=f"twf{tag}")


def names_of(settings: Settings) -> BusNames:
    return BusNames(settings.stream_name, settings.subject_prefix)


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="session")
def bus_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """NATS for integration tests: TRIALWATCH_TEST_NATS_URL, else a nats-server child process."""
    url = nats_url_from_env()
    if url:
        yield url
        return
    server = EmbeddedNats(tmp_path_factory.mktemp("bus")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server only this test uses, so it may stop it (even when the session has a shared one)."""
    server = EmbeddedNats(tmp_path / "own-nats").start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- the broker's books


@asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def messages_on(url: str, stream: str, subject: str) -> list[dict[str, Any]]:
    """The payloads the stream holds on ``subject``, oldest first."""
    found: list[dict[str, Any]] = []
    async with jetstream(url) as js:
        seq = 1
        while True:
            try:
                msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
            except NotFoundError:
                return found
            found.append(json.loads(msg.data or b"null"))
            seq = (msg.seq or seq) + 1


async def publish(url: str, stream: str, subject: str, payload: bytes, *, msg_id: str) -> int:
    """Publish as an outside party (a replay, a broker redelivery past its window); the stream sequence."""
    async with jetstream(url) as js:
        ack = await js.publish(subject, payload, stream=stream, headers={"Nats-Msg-Id": msg_id})
        return ack.seq


async def consumer(url: str, stream: str, durable: str) -> ConsumerInfo:
    async with jetstream(url) as js:
        return await js.consumer_info(stream, durable)


async def caught_up(url: str, stream: str, durable: str) -> bool:
    """Every message of the stream is delivered to ``durable`` and acked; nothing in flight."""
    async with jetstream(url) as js:
        last = (await js.stream_info(stream)).state.last_seq
        info = await js.consumer_info(stream, durable)
    assert info.ack_floor is not None
    return info.ack_floor.stream_seq == last and info.num_pending == 0 and info.num_ack_pending == 0


async def declare_consumer(url: str, names: BusNames, durable: str, *, ack_wait: float, max_deliver: int) -> None:
    """Create the durable before the service starts; the service binds to it as it finds it."""
    async with jetstream(url) as js:
        await js.add_consumer(names.stream, ConsumerConfig(
            durable_name=durable, filter_subject=names.all_events, deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait, max_deliver=max_deliver,
        ))


# --------------------------------------------------------------------------- the database's books


async def processed(engine: AsyncEngine, consumer_name: str, event_id: object) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(processed_messages).where(
            processed_messages.c.consumer == consumer_name, processed_messages.c.event_id == str(event_id))) or 0)


async def settled(system: RunningSystem) -> bool:
    """Nothing left to do: the outbox is empty, both consumers acked the whole stream, every mail sent."""
    async with system.engine.connect() as conn:
        unpublished = await conn.scalar(select(func.count()).select_from(outbox))
        unsent = await conn.scalar(select(func.count()).select_from(deliveries).where(deliveries.c.status != "sent"))
    if unpublished or unsent:
        return False
    url, stream = system.settings.nats_url or "", system.settings.stream_name
    return await caught_up(url, stream, SAFETY) and await caught_up(url, stream, NOTIFY)


# --------------------------------------------------------------------------- a safety service that dies


async def stop_safety(system: RunningSystem) -> None:
    await system._apps[0].stop()  # type: ignore[attr-defined]


async def restart_safety(system: RunningSystem) -> None:
    """A new safety process: new objects, the same settings, database and durable consumer."""
    service = SafetyService(system.settings, nats_url=system.settings.nats_url or "", engine=system.engine)
    app = service.app()
    await app.start()
    system.safety = service
    system._apps = (app, system._apps[1])  # type: ignore[attr-defined]


class DyingSafety:
    """The safety consumer of a process that dies on the first message of ``event_type``.

    ``killed_at`` is "before commit" (it dies on receipt) or "after commit" (the safety service's
    own handler ran and committed; the process dies before the ack). It dies by ``kill()``: the
    broker goes away with the message in flight, never acked nor nak'ed.
    """

    def __init__(self, system: RunningSystem, *, event_type: str, killed_at: str) -> None:
        settings = system.settings
        # Only its handler is used: the real work, on the real database.
        self.work = SafetyService(settings, nats_url=settings.nats_url or "", engine=system.engine,
                                  broker=NatsBroker())
        self.event_type, self.killed_at = event_type, killed_at
        self.reached = asyncio.Event()
        # No graceful shutdown: a killed process does not wait for the message in its hands.
        self.broker = NatsBroker(settings.nats_url or "", graceful_timeout=None)
        subscription = Subscription(system.engine, SAFETY, self.handle, max_deliver=settings.max_deliver)
        self.broker.include_router(durable_router(names_of(settings), subscription, durable=SAFETY))

    async def handle(self, event: StoredEvent) -> None:
        if event.type != self.event_type:
            await self.work.handle(event)
            return
        if self.killed_at == "after commit":
            await self.work.handle(event)
        self.reached.set()
        await asyncio.Event().wait()  # stuck here until the process is killed

    async def start(self) -> DyingSafety:
        await self.broker.start()
        return self

    async def kill(self) -> None:
        await self.broker.stop()
