"""The outbox relay on a real JetStream: nothing skipped, nothing doubled, nothing lost."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.errors import TimeoutError as NatsTimeout
from nats.js.client import JetStreamContext
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runner import ingest_app
from services.safety.app import make_broker
from shared.bus import OutboxRelay, ensure_stream
from shared.embedded_nats import EmbeddedNats
from shared.events import PATIENT_ENROLLED, NewEvent, StoredEvent, patient_stream
from shared.store import eventstore
from shared.store.tables import outbox
from tests.support.api import enrol, new_token
from tests.support.faults import bus_url, fresh_names, jetstream, messages_on, names_of, own_nats  # noqa: F401 - fixtures
from tests.support.system import eventually, session_settings

PROBE = "relay_probe"  # a type of its own: other tests' leftover rows land on other subjects


async def append_probe(engine: AsyncEngine) -> StoredEvent:
    event = NewEvent(type=PROBE, occurred_at=datetime.now(UTC), recorded_by="test", data={})
    async with engine.begin() as conn:
        [stored] = await eventstore.append(conn, patient_stream("relay"), [event])
    return stored


async def outbox_row(engine: AsyncEngine, event: StoredEvent) -> dict[str, Any]:
    async with engine.connect() as conn:
        return dict((await conn.execute(select(outbox).where(outbox.c.position == event.position))).one()._mapping)


async def take_outbox_row(engine: AsyncEngine, event: StoredEvent) -> dict[str, Any]:
    row = await outbox_row(engine, event)
    async with engine.begin() as conn:
        await conn.execute(delete(outbox).where(outbox.c.position == event.position))
    return row


async def put_outbox_row(engine: AsyncEngine, row: dict[str, Any]) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(outbox).values(**row))


async def waiting(engine: AsyncEngine, *stored: StoredEvent) -> dict[str, int]:
    """Outbox rows still waiting for these events: event id → failed attempts."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(outbox.c.event_id, outbox.c.attempts).where(
            outbox.c.event_id.in_([str(e.event_id) for e in stored])))
        return {r.event_id: r.attempts for r in rows}


@asynccontextmanager
async def relay_to(engine: AsyncEngine, url: str) -> AsyncIterator[OutboxRelay]:
    """A relay onto a fresh stream; rows other tests left behind are published there first."""
    names = fresh_names()
    await ensure_stream(url, names)
    broker = make_broker(url)
    await broker.connect()
    relay = OutboxRelay(engine, broker, names)
    try:
        while await relay.publish_pending():
            pass
        yield relay
    finally:
        await broker.stop()


async def published(url: str, relay: OutboxRelay) -> list[str]:
    return [m["event_id"] for m in await messages_on(url, relay.names.stream, relay.names.subject(PROBE))]


@pytest.fixture
async def relay(engine: AsyncEngine, bus_url: str) -> AsyncIterator[OutboxRelay]:  # noqa: F811
    async with relay_to(engine, bus_url) as relay:
        yield relay


async def test_a_row_committed_after_a_higher_position_was_published_is_still_published(
    engine: AsyncEngine, relay: OutboxRelay, bus_url: str  # noqa: F811
) -> None:
    # Two events are appended; the older one's transaction has not committed yet, so its outbox
    # row is not there to see (PostgreSQL hands out positions before commit).
    older = await append_probe(engine)
    newer = await append_probe(engine)
    late_row = await take_outbox_row(engine, older)

    # The relay publishes what it sees: the newer event.
    assert await relay.publish_pending() == 1
    assert await published(bus_url, relay) == [str(newer.event_id)]

    # The older transaction commits now, below a position already published. A relay that
    # read "rows after the last position seen" would never look back; this one publishes it.
    await put_outbox_row(engine, late_row)
    assert await relay.publish_pending() == 1
    assert await published(bus_url, relay) == [str(newer.event_id), str(older.event_id)]
    assert await waiting(engine, older, newer) == {}


async def test_an_event_published_twice_is_one_message_in_the_stream(
    engine: AsyncEngine, relay: OutboxRelay, bus_url: str  # noqa: F811
) -> None:
    event = await append_probe(engine)
    row = await outbox_row(engine, event)
    assert await relay.publish_pending() == 1

    # The relay dies after the server's ack but before deleting the row: the row is back.
    await put_outbox_row(engine, row)
    assert await relay.publish_pending() == 1

    # The second publish carried the same Nats-Msg-Id; the server dropped it.
    assert await published(bus_url, relay) == [str(event.event_id)]
    assert await waiting(engine, event) == {}


async def test_while_the_broker_is_down_the_row_waits_and_is_published_once_it_is_back(
    engine: AsyncEngine, own_nats: EmbeddedNats  # noqa: F811
) -> None:
    async with relay_to(engine, own_nats.url) as relay:
        event = await append_probe(engine)

        # The broker goes down: publishing fails, the row stays, one failed attempt counted.
        own_nats.stop()
        with pytest.raises(NatsTimeout):
            await relay.publish_pending()
        assert await waiting(engine, event) == {str(event.event_id): 1}

        # The broker comes back on the same port and store: the relay publishes it and lets go.
        own_nats.start()
        await eventually(lambda: _publishes(relay), timeout=30)
        assert await waiting(engine, event) == {}
        assert await published(own_nats.url, relay) == [str(event.event_id)]


async def _publishes(relay: OutboxRelay) -> bool:
    try:
        await relay.publish_pending()
    except NatsTimeout:
        return False
    return True


async def test_a_window_of_rows_is_published_together_in_order_and_deleted_once_acked(
    engine: AsyncEngine, bus_url: str  # noqa: F811
) -> None:
    async with relay_to(engine, bus_url) as relay:
        relay.batch, relay.window = 10, 4
        stored = [await append_probe(engine) for _ in range(25)]

        rounds = [await relay.publish_pending() for _ in range(4)]

        assert rounds == [10, 10, 5, 0]
        assert await published(bus_url, relay) == [str(e.event_id) for e in stored]
        assert await waiting(engine, *stored) == {}


async def test_a_message_carries_the_event_id_as_its_correlation_id(
    engine: AsyncEngine, relay: OutboxRelay, bus_url: str  # noqa: F811
) -> None:
    event = await append_probe(engine)
    assert await relay.publish_pending() == 1
    async with jetstream(bus_url) as js:
        msg = await js.get_msg(relay.names.stream, seq=1, subject=relay.names.subject(PROBE), next=True)
    # Not a random id drawn per message: the event's own (it has no correlation id of its own).
    assert msg.headers is not None
    assert msg.headers["correlation_id"] == msg.headers["Nats-Msg-Id"] == str(event.event_id)
    assert msg.headers["content-type"] == "application/json"


class CountingRelay(OutboxRelay):
    """A relay that notes each event it publishes, slowly enough for two to overlap."""

    def __init__(self, *args: Any, seen: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = seen

    async def _send(self, js: JetStreamContext, event: StoredEvent) -> asyncio.Future[Any]:
        self.seen.append(str(event.event_id))
        await asyncio.sleep(0.02)
        return await super()._send(js, event)


async def test_two_relays_at_once_publish_each_row_once_between_them(engine: AsyncEngine, bus_url: str) -> None:  # noqa: F811
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer and no row locks: its relays may both send a row (the server drops the copy)")
    async with relay_to(engine, bus_url) as first:
        stored = [await append_probe(engine) for _ in range(12)]
        seen: list[str] = []
        relays = [CountingRelay(engine, first.broker, first.names, window=4, seen=seen) for _ in range(2)]
        await asyncio.gather(*(relay.publish_pending() for relay in relays))
        assert sorted(seen) == sorted(str(e.event_id) for e in stored)  # each once, by one relay or the other
        assert await waiting(engine, *stored) == {}
        assert sorted(await published(bus_url, first)) == sorted(str(e.event_id) for e in stored)


async def test_on_sqlite_the_relay_publishes_on_while_its_last_delete_waits_for_the_write_lock(
    engine: AsyncEngine, bus_url: str  # noqa: F811
) -> None:
    """SQLite's delete of the published rows waits for the one write lock; ``run`` leaves it behind
    (``settle_behind``) and publishes what came meanwhile, never the rows still being deleted."""
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL deletes the rows in the transaction that read them FOR UPDATE")
    async with relay_to(engine, bus_url) as relay:
        relay.batch = 1
        first, second = await append_probe(engine), await append_probe(engine)
        holder = sqlite3.connect(str(engine.url.database), isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock throughout
            rounds = [await asyncio.wait_for(relay.publish_pending(settle_behind=True), 5) for _ in range(3)]
            assert rounds == [1, 1, 0]
            assert await published(bus_url, relay) == [str(first.event_id), str(second.event_id)]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await asyncio.wait_for(relay.settled(), 30)
        assert await waiting(engine, first, second) == {}
        assert await relay.publish_pending() == 0  # deleted, not published again


async def test_a_poke_while_a_round_publishes_starts_the_next_round_at_once(relay: OutboxRelay) -> None:
    # A commit lands (and pokes) while the relay is in the middle of a round: the round read the
    # outbox before that commit, so the next one must follow at once, not an interval later.
    rounds: list[float] = []
    publish = relay.publish_pending

    async def publish_pending(**options: Any) -> int:
        rounds.append(asyncio.get_running_loop().time())
        if len(rounds) == 1:
            relay.poke()
        return await publish(**options)

    relay.publish_pending = publish_pending  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop, interval=60.0))
    try:
        await eventually(lambda: len(rounds) >= 2, timeout=10.0)
    finally:
        stop.set()
        relay.poke()
        await running


async def test_the_apis_relay_publishes_a_recorded_event_without_waiting_for_its_interval(
    engine: AsyncEngine, bus_url: str, tmp_path: Path  # noqa: F811
) -> None:
    # trialwatch ingest's relay polls every relay_interval_s; on PostgreSQL each commit of the API
    # pokes it, so an urgent event goes onto the bus at once, not up to an interval later. SQLite
    # keeps to the interval (runner.ingest_app says why): there the event comes with the next round.
    polled = engine.dialect.name != "postgresql"
    settings = session_settings(tmp_path, bus_url, "smtp://127.0.0.1:1", relay_interval_s=1.0 if polled else 60.0)
    names = names_of(settings)
    await ensure_stream(bus_url, names)
    app = ingest_app(settings, engine, bus_url)
    token = await new_token(engine, "admin")
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
        await asyncio.sleep(0.5)  # the relay's first round (the outbox of earlier tests) is behind it
        subject_id = await enrol(client, token)

        async def on_the_bus() -> bool:
            found = await messages_on(bus_url, names.stream, names.subject(PATIENT_ENROLLED))
            return any(m["subject_id"] == subject_id for m in found)

        await eventually(on_the_bus, timeout=10.0)
