"""A message the safety consumer cannot handle: retried, dead-lettered after ``max_deliver``
deliveries and acked; the operator lists it and replays it once the cause is fixed.

The consumer is the services' one-message subscriber (durable, config, ``Subscription``; the
safety service's batches fall back to it for a batch that fails) around a handler the test controls, on real NATS and the session's database.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runner import list_dead_letters, replay_dead_letter
from services.safety.app import make_broker
from shared.bus import ensure_stream
from shared.consuming import Subscription, durable_router, message_key, process_once
from shared.events import StoredEvent
from shared.settings import Settings
from shared.store.engine import make_engine
from shared.store.tables import dead_letters, delivery_failures
from tests.support.faults import bus_url, caught_up, consumer, fresh_names, names_of, processed, publish  # noqa: F401
from tests.support.system import eventually

DURABLE = "safety"
MAX_DELIVER = 3  # nak delays 2 s, then 4 s: a dead letter lands about 6 s after the first delivery


class Handler:
    """The safety consumer's work, with a fault the test can inject and remove."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.fault: str | None = None
        self.attempts = 0
        self.effects: list[str] = []

    async def __call__(self, event: StoredEvent) -> None:
        await process_once(self.engine, DURABLE, event, self.work)

    async def work(self, conn: AsyncConnection, event: StoredEvent) -> None:
        self.attempts += 1
        if self.fault:
            raise RuntimeError(self.fault)
        self.effects.append(str(event.event_id))


@pytest.fixture
def settings(tmp_path: Path, database_url: str, bus_url: str) -> Settings:  # noqa: F811
    names = fresh_names()
    return Settings(data_dir=tmp_path, database_url=database_url, nats_url=bus_url,
                    stream_name=names.stream, subject_prefix=names.prefix, max_deliver=MAX_DELIVER)


@pytest.fixture
async def handler(settings: Settings, engine: AsyncEngine) -> AsyncIterator[Handler]:
    handler = Handler(engine)
    await ensure_stream(settings.nats_url or "", names_of(settings))
    broker = make_broker(settings.nats_url or "")
    broker.include_router(durable_router(names_of(settings), Subscription(engine, DURABLE, handler,
                                                                          max_deliver=MAX_DELIVER), durable=DURABLE))
    await broker.start()
    try:
        yield handler
    finally:
        await broker.stop()


def crs_event() -> StoredEvent:
    now = datetime.now(UTC)
    return StoredEvent(position=1, event_id=uuid.uuid4(), stream_id="patient-S01-dl", stream_version=2, type="crs",
                       subject_id="S01-dl", occurred_at=now, recorded_at=now, recorded_by="test",
                       data={"grade": 3})


async def send(settings: Settings, payload: bytes, msg_id: str) -> int:
    subject = names_of(settings).subject("crs")
    return await publish(settings.nats_url or "", settings.stream_name, subject, payload, msg_id=msg_id)


async def letters(engine: AsyncEngine, settings: Settings) -> list[dict[str, Any]]:
    """This test's dead letters (the table is shared by the session; subjects are not)."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(dead_letters).where(
            dead_letters.c.subject.startswith(names_of(settings).prefix + ".")).order_by(dead_letters.c.id))
        return [dict(r._mapping) for r in rows]


async def listed(settings: Settings) -> list[dict[str, Any]]:
    """What ``trialwatch dead-letters list`` shows of this test's dead letters."""
    prefix = names_of(settings).prefix + "."
    return [r for r in await list_dead_letters(settings) if r["subject"].startswith(prefix)]


async def idle(settings: Settings) -> bool:
    return await caught_up(settings.nats_url or "", settings.stream_name, DURABLE)


async def test_a_message_that_always_fails_is_dead_lettered_after_max_deliver_deliveries_and_acked(
    settings: Settings, handler: Handler, engine: AsyncEngine
) -> None:
    # Three messages no consumer can read arrive on the subjects the safety service consumes.
    garbage = ["this is not JSON", '{"type": "crs", "grade": 3}', '{"event_id": "' + "x" * 40 + '"}']
    for n, payload in enumerate(garbage):
        await send(settings, payload.encode(), f"garbage-{n}")

    # Each is tried max_deliver times, then lands in dead_letters with its own payload (none of
    # them has an event id, and none is mistaken for a replay of another).
    found = await eventually(lambda: at_least(3, letters(engine, settings)), timeout=15)
    assert sorted(r["payload"] for r in found) == sorted(garbage)
    assert [(r["event_id"], r["deliveries"]) for r in found] == [(None, MAX_DELIVER)] * 3
    assert all(r["consumer"] == "safety" and r["replayed_at"] is None for r in found)
    assert handler.attempts == 0  # none got past parsing
    assert [r["id"] for r in await listed(settings)] == [r["id"] for r in found]

    # All are acked: nothing pending, nothing in flight, and the server delivered each exactly
    # max_deliver times (its own limit is unlimited, so only our ack stopped it).
    await eventually(lambda: idle(settings), timeout=5)
    info = await consumer(settings.nats_url or "", settings.stream_name, DURABLE)
    assert info.delivered is not None and info.delivered.consumer_seq == 3 * MAX_DELIVER


async def test_a_dead_letter_replayed_after_the_fault_is_fixed_takes_effect_once(
    settings: Settings, handler: Handler, engine: AsyncEngine
) -> None:
    # A valid event meets a fault on every delivery.
    handler.fault = "the projection table is locked"
    event = crs_event()
    await send(settings, event.model_dump_json().encode(), str(event.event_id))
    [letter] = await eventually(lambda: at_least(1, letters(engine, settings)), timeout=15)
    assert (letter["event_id"], letter["deliveries"]) == (str(event.event_id), MAX_DELIVER)
    assert "the projection table is locked" in letter["error"]
    assert handler.attempts == MAX_DELIVER and handler.effects == []
    assert await processed(engine, DURABLE, event.event_id) == 0
    await eventually(lambda: idle(settings), timeout=5)

    # The operator fixes the cause and replays it: it takes effect.
    handler.fault = None
    await replay_dead_letter(settings, letter["id"])
    await eventually(lambda: handler.effects, timeout=10)
    [letter] = await listed(settings)
    assert letter["replayed_at"] is not None

    # A second replay (a double click) is delivered and acked, and changes nothing.
    await replay_dead_letter(settings, letter["id"])
    await eventually(lambda: idle(settings), timeout=10)
    info = await consumer(settings.nats_url or "", settings.stream_name, DURABLE)
    assert info.ack_floor is not None and info.ack_floor.stream_seq == 3
    assert handler.effects == [str(event.event_id)]
    assert await processed(engine, DURABLE, event.event_id) == 1


async def at_least(n: int, rows: Awaitable[list[dict[str, Any]]]) -> list[dict[str, Any]] | None:
    found = await rows
    return found if len(found) >= n else None


class Delivery:
    """One delivery of a JetStream message as the subscriber sees it, with the server's count
    set by the test, and what the subscriber answered."""

    def __init__(self, payload: bytes, *, stream: str, sequence: int, num_delivered: int) -> None:
        self.raw_message = SimpleNamespace(
            subject=f"{stream.lower()}.events.crs", data=payload,
            metadata=SimpleNamespace(stream=stream, sequence=SimpleNamespace(stream=sequence),
                                     num_delivered=num_delivered),
            ack=self.ack, nak=self.nak)
        self.answer: tuple[str, float | None] | None = None

    async def ack(self) -> None:
        self.answer = ("ack", None)

    async def nak(self, delay: float | None = None) -> None:
        self.answer = ("nak", delay)


async def deliver(subscription: Subscription, payload: bytes, *, stream: str, sequence: int = 7,
                  num_delivered: int = 1) -> Delivery:
    delivery = Delivery(payload, stream=stream, sequence=sequence, num_delivered=num_delivered)
    await subscription.handle(payload.decode(), delivery)  # type: ignore[arg-type]
    return delivery


async def failures_of(engine: AsyncEngine, delivery: Delivery) -> int | None:
    async with engine.connect() as conn:
        return await conn.scalar(select(delivery_failures.c.failures).where(
            delivery_failures.c.consumer == DURABLE, delivery_failures.c.message == message_key(delivery.raw_message)))


async def test_failures_are_counted_by_the_consumer_when_the_server_count_starts_again_at_one(
    engine: AsyncEngine,
) -> None:
    # The server's delivery count has been seen to restart at 1 after a delayed nak; a message
    # that always fails must still reach the dead letters after max_deliver failures, no more.
    handler = Handler(engine)
    handler.fault = "the projection table is locked"
    subscription = Subscription(engine, DURABLE, handler, max_deliver=MAX_DELIVER)
    stream, event = fresh_names().stream, crs_event()
    payload = event.model_dump_json().encode()

    answers = [(await deliver(subscription, payload, stream=stream)).answer for _ in range(MAX_DELIVER)]

    assert answers == [("nak", 2.0), ("nak", 4.0), ("ack", None)]
    async with engine.connect() as conn:
        [letter] = (await conn.execute(select(dead_letters).where(
            dead_letters.c.event_id == str(event.event_id)))).mappings().all()
    assert letter["deliveries"] == MAX_DELIVER and "the projection table is locked" in letter["error"]
    assert handler.attempts == MAX_DELIVER


async def test_a_message_that_succeeds_after_failing_leaves_no_failure_count_behind(engine: AsyncEngine) -> None:
    handler = Handler(engine)
    handler.fault = "a passing fault"
    subscription = Subscription(engine, DURABLE, handler, max_deliver=MAX_DELIVER)
    stream, event = fresh_names().stream, crs_event()
    payload = event.model_dump_json().encode()

    failed = await deliver(subscription, payload, stream=stream, num_delivered=1)
    assert failed.answer == ("nak", 2.0) and await failures_of(engine, failed) == 1

    handler.fault = None
    done = await deliver(subscription, payload, stream=stream, num_delivered=2)
    assert done.answer == ("ack", None) and await failures_of(engine, done) is None
    assert handler.effects == [str(event.event_id)]


async def test_a_failure_the_database_cannot_record_is_retried_and_never_dead_lettered(tmp_path: Path) -> None:
    # The database is gone (its directory does not exist): the failure cannot be counted, so the
    # message waits and comes back, however often the server has delivered it.
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'gone' / 'trialwatch.db'}")
    try:
        handler = Handler(engine)
        subscription = Subscription(engine, DURABLE, handler, max_deliver=MAX_DELIVER)
        event = crs_event()
        for num_delivered in (1, MAX_DELIVER, 10 * MAX_DELIVER):
            delivery = await deliver(subscription, event.model_dump_json().encode(), stream="GONE",
                                     num_delivered=num_delivered)
            assert delivery.answer == ("nak", 30.0)
    finally:
        await engine.dispose()
