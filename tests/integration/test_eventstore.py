"""The event store's contract, run against whichever database the session found."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.events import NewEvent, patient_stream
from shared.store import eventstore
from shared.store.tables import chain_head, events, events_appended, outbox


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


# --------------------------------------------------------------------------- an attacker with database access


async def rehash_from(conn: AsyncConnection, position: int, data: dict[str, object]) -> None:
    """What someone with write access to the database can do: change an event's data, then
    recompute every later hash and the chain head, so that every link checks out again."""
    await conn.execute(update(events).where(events.c.position == position).values(data=data))
    prev = eventstore.GENESIS
    for row in (await conn.execute(select(events).order_by(events.c.position))).all():
        m = dict(row._mapping)
        if m["position"] >= position:
            m["prev_hash"], m["hash"] = prev, eventstore.chain_hash(prev, m)
            await conn.execute(update(events).where(events.c.position == m["position"])
                               .values(prev_hash=m["prev_hash"], hash=m["hash"]))
        prev, last = m["hash"], m["position"]
    await conn.execute(update(chain_head).where(chain_head.c.id == 1).values(position=last, hash=prev))


async def test_a_history_rewritten_and_rehashed_passes_plain_verify_but_not_the_anchor(own_engine: AsyncEngine) -> None:
    async with own_engine.begin() as conn:
        early = await eventstore.append(conn, stream(), [new(grade=3), new(n=2)])
    async with own_engine.connect() as conn:  # a DSMB summary is cut here and mailed
        anchor = await eventstore.anchor_at(conn, eventstore.now_utc())
    assert anchor == (early[-1].position, (await read_hash(own_engine, early[-1].position)))
    async with own_engine.begin() as conn:
        await eventstore.append(conn, stream(), [new(n=3), new(n=4)])
    async with own_engine.connect() as conn:
        assert await eventstore.verify_chain(conn, anchor=anchor) == (4, None, "")

    # The grade 3 becomes a grade 1, and everything after it is re-hashed.
    async with own_engine.begin() as conn:
        await rehash_from(conn, early[0].position, {"grade": 1})

    async with own_engine.connect() as conn:
        assert await eventstore.verify_chain(conn) == (4, None, "")  # every link sound
        checked, bad, why = await eventstore.verify_chain(conn, anchor=anchor)
    assert bad is not None and bad.position == anchor[0] and checked == 1
    assert "rewritten" in why and anchor[1] in why


async def test_an_anchor_past_the_end_of_the_chain_fails(own_engine: AsyncEngine) -> None:
    async with own_engine.connect() as conn:
        assert await eventstore.anchor_at(conn, eventstore.now_utc()) == (0, eventstore.GENESIS)
        assert await eventstore.verify_chain(conn, anchor=(0, eventstore.GENESIS)) == (0, None, "")
    async with own_engine.begin() as conn:
        [only] = await eventstore.append(conn, stream(), [new()])
    async with own_engine.connect() as conn:
        _, bad, why = await eventstore.verify_chain(conn, anchor=(only.position + 1, "a" * 64))
    assert bad is None and f"before the anchor's position {only.position + 1}" in why


async def test_a_deleted_tail_with_the_head_rewound_to_match_is_caught(own_engine: AsyncEngine) -> None:
    async with own_engine.begin() as conn:
        stored = await eventstore.append(conn, stream(), [new(n=1), new(n=2), new(n=3)])
    kept = stored[0]
    async with own_engine.begin() as conn:
        await conn.execute(delete(events).where(events.c.position > kept.position))
        await conn.execute(delete(outbox))  # long published by the relay
        await conn.execute(update(chain_head).where(chain_head.c.id == 1)
                           .values(position=kept.position, hash=await read_hash(own_engine, kept.position, conn)))

    async with own_engine.connect() as conn:
        checked, bad, why = await eventstore.verify_chain(conn)
    assert (checked, bad) == (1, None)
    assert "3 events were appended" in why and f"position {stored[-1].position}" in why

    # Appending again does not hide it (SQLite hands the freed positions out again).
    async with own_engine.begin() as conn:
        await eventstore.append(conn, stream(), [new(n=4), new(n=5)])
    async with own_engine.connect() as conn:
        _, _, why = await eventstore.verify_chain(conn)
    assert "5 events were appended" in why and "3 are stored" in why


async def test_an_append_rolled_back_is_not_counted_as_appended(own_engine: AsyncEngine) -> None:
    sid = stream()
    async with own_engine.begin() as conn:
        await eventstore.append(conn, sid, [new()])
    with pytest.raises(eventstore.WrongExpectedVersion):
        async with own_engine.begin() as conn:
            await eventstore.append(conn, stream(), [new(), new()])
            await eventstore.append(conn, sid, [new()], expected_version=0)  # fails: the whole transaction goes
    with pytest.raises(eventstore.DuplicateEvent):
        async with own_engine.begin() as conn:
            await eventstore.append(conn, stream(), [new(), new()])
            twice = new()
            await eventstore.append(conn, stream(), [twice, twice])  # the same event id: refused
    async with own_engine.connect() as conn:
        assert await eventstore.verify_chain(conn) == (1, None, "")


async def read_hash(engine: AsyncEngine, position: int, conn: AsyncConnection | None = None) -> str:
    if conn is not None:
        return str(await conn.scalar(select(events.c.hash).where(events.c.position == position)))
    async with engine.connect() as own:
        return str(await own.scalar(select(events.c.hash).where(events.c.position == position)))


# --------------------------------------------------------------------------- one append, one statement


async def test_what_the_server_hashes_verifies(engine: AsyncEngine) -> None:
    awkward = {"stream_version": 0, "note": '"stream_version":0,"subject_id":', "ü": "日本 \\ \"", "x": [1.5, None]}
    sid = stream()
    async with engine.begin() as conn:
        await eventstore.append(conn, sid, [new(**awkward), new(n=2), new(n=3)])
        await eventstore.append(conn, stream(), [new()])
    async with engine.connect() as conn:
        checked, bad, why = await eventstore.verify_chain(conn)
        read = await eventstore.read_stream(conn, sid)
    assert (bad, why) == (None, "") and checked >= 4
    assert read[0].data == new(**awkward).data and [e.data for e in read[1:]] == [new(n=2).data, new(n=3).data]


async def test_concurrent_appends_to_one_stream_each_follow_the_last(engine: AsyncEngine) -> None:
    # Each append reads the stream's version after it holds the chain head: none may see a version
    # from before the one ahead of it committed (it would collide with it and fail).
    sid = stream()

    async def write(k: int) -> None:
        async with engine.begin() as conn:
            await eventstore.append(conn, sid, [new(k=k)])

    await asyncio.gather(*(write(k) for k in range(8)))
    async with engine.connect() as conn:
        assert [e.stream_version for e in await eventstore.read_stream(conn, sid)] == list(range(1, 9))


async def test_every_event_of_a_many_row_insert_is_counted(own_engine: AsyncEngine) -> None:
    async with own_engine.begin() as conn:
        await eventstore.append(conn, stream(), [new(n=k) for k in range(5)])
        await eventstore.append(conn, stream(), [new()])
    async with own_engine.connect() as conn:
        appended = (await conn.execute(select(events_appended))).one()._mapping
        assert (appended["count"], appended["last_position"]) == (6, 6)
        assert await eventstore.verify_chain(conn) == (6, None, "")


async def test_appending_nothing_writes_nothing(own_engine: AsyncEngine) -> None:
    async with own_engine.begin() as conn:
        assert await eventstore.append(conn, stream(), []) == []
        with pytest.raises(eventstore.WrongExpectedVersion):
            await eventstore.append(conn, stream(), [], expected_version=3)
    async with own_engine.connect() as conn:
        assert await eventstore.verify_chain(conn) == (0, None, "")


async def test_what_an_append_answers_is_what_is_read_back(engine: AsyncEngine) -> None:
    sid = stream()
    shanghai = timezone(timedelta(hours=8))
    event = NewEvent(type="lab", subject_id="S-x", occurred_at=datetime(2025, 1, 1, 8, tzinfo=shanghai),
                     recorded_by="test", data={"test": "neutrophils", "value": 0.4}, correlation_id=uuid.uuid4())
    async with engine.begin() as conn:
        answered = await eventstore.append(conn, sid, [event, new()])
    async with engine.connect() as conn:
        read = await eventstore.read_stream(conn, sid)
    assert answered == read
    assert [e.model_dump(mode="json") for e in answered] == [e.model_dump(mode="json") for e in read]
    assert answered[0].occurred_at.utcoffset() == timedelta(hours=8)
    assert answered[0].model_fields_set == read[0].model_fields_set
