"""The event store's contract, run against whichever database the session found."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.events import NewEvent, patient_stream
from shared.store import eventstore
from shared.store.tables import events, outbox


def new(type_: str = "follow_up", **data: object) -> NewEvent:
    return NewEvent(type=type_, subject_id="S-x", occurred_at=datetime(2025, 1, 1, tzinfo=UTC),
                    recorded_by="test", data=dict(data))


def stream() -> str:
    return patient_stream(f"S-{uuid.uuid4().hex[:10]}")


async def test_append_assigns_versions_and_queues_each_event_for_publishing(engine: AsyncEngine) -> None:
    sid = stream()
    async with engine.begin() as conn:
        stored = await eventstore.append(conn, sid, [new(), new()], expected_version=0)
    assert [e.stream_version for e in stored] == [1, 2]
    async with engine.connect() as conn:
        queued = (await conn.execute(select(outbox.c.event_id).where(
            outbox.c.event_id.in_([str(e.event_id) for e in stored])))).scalars().all()
        assert sorted(queued) == sorted(str(e.event_id) for e in stored)
        assert [e.event_id for e in await eventstore.read_stream(conn, sid)] == [e.event_id for e in stored]


async def test_wrong_expected_version_stores_nothing(engine: AsyncEngine) -> None:
    sid = stream()
    async with engine.begin() as conn:
        await eventstore.append(conn, sid, [new()], expected_version=0)
    with pytest.raises(eventstore.WrongExpectedVersion):
        async with engine.begin() as conn:
            await eventstore.append(conn, sid, [new()], expected_version=0)
    async with engine.connect() as conn:
        assert len(await eventstore.read_stream(conn, sid)) == 1


async def test_concurrent_writers_cannot_both_win_the_same_version(engine: AsyncEngine) -> None:
    sid = stream()

    async def write() -> str:
        try:
            async with engine.begin() as conn:
                await eventstore.append(conn, sid, [new()], expected_version=0)
            return "won"
        except (eventstore.WrongExpectedVersion, eventstore.DuplicateEvent):
            return "lost"

    results = await asyncio.gather(*(write() for _ in range(5)))
    assert sorted(results) == ["lost"] * 4 + ["won"]


async def test_the_same_event_id_is_stored_once(engine: AsyncEngine) -> None:
    event = new()
    async with engine.begin() as conn:
        await eventstore.append(conn, stream(), [event])
    with pytest.raises(eventstore.DuplicateEvent):
        async with engine.begin() as conn:
            await eventstore.append(conn, stream(), [event])


async def test_as_of_returns_what_was_recorded_by_then(engine: AsyncEngine) -> None:
    sid = stream()
    t0 = datetime.now(UTC)
    async with engine.begin() as conn:
        await eventstore.append(conn, sid, [new()], recorded_at=t0)
        await eventstore.append(conn, sid, [new()], recorded_at=t0 + timedelta(hours=1))
    async with engine.connect() as conn:
        assert len(await eventstore.read_stream(conn, sid, as_of=t0 + timedelta(minutes=1))) == 1
        assert len(await eventstore.read_stream(conn, sid)) == 2


async def test_verify_finds_the_first_tampered_event(engine: AsyncEngine) -> None:
    sid = stream()
    async with engine.begin() as conn:
        stored = await eventstore.append(conn, sid, [new(n=1), new(n=2)])
    async with engine.connect() as conn:
        checked, bad, _ = await eventstore.verify_chain(conn)
        assert bad is None and checked >= 2
    async with engine.begin() as conn:
        await conn.execute(update(events).where(events.c.event_id == str(stored[0].event_id)).values(data={"n": 99}))
    try:
        async with engine.connect() as conn:
            _, bad, why = await eventstore.verify_chain(conn)
        assert bad is not None and bad.event_id == stored[0].event_id
        assert "content" in why
    finally:  # put it back so later tests see a sound chain
        async with engine.begin() as conn:
            await conn.execute(update(events).where(events.c.event_id == str(stored[0].event_id)).values(data={"n": 1}))


async def test_verify_finds_events_deleted_from_the_end(own_engine: AsyncEngine) -> None:
    sid = stream()
    async with own_engine.begin() as conn:
        stored = await eventstore.append(conn, sid, [new(n=1), new(n=2), new(n=3)])
    async with own_engine.begin() as conn:
        await conn.execute(delete(events).where(events.c.event_id == str(stored[-1].event_id)))

    async with own_engine.connect() as conn:
        checked, bad, why = await eventstore.verify_chain(conn)

    assert (checked, bad) == (2, None)
    assert f"position {stored[-1].position}" in why and "deleted from the end" in why


async def test_positions_follow_the_chain_head_and_the_database_sequence_keeps_up(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        first = await eventstore.append(conn, stream(), [new(), new()])
        second = await eventstore.append(conn, stream(), [new()])
    assert [e.position for e in first + second] == list(range(first[0].position, first[0].position + 3))
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            last = await conn.scalar(text("select last_value from " + (await conn.scalar(
                text("select pg_get_serial_sequence('events', 'position')")))))
        assert last >= second[-1].position
