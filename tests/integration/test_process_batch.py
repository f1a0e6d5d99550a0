"""``process_batch``: a batch's work sees exactly the events this consumer has not processed yet."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.consuming import process_batch
from shared.events import StoredEvent


def event() -> StoredEvent:
    now = datetime.now(UTC)
    return StoredEvent(position=1, event_id=uuid.uuid4(), stream_id="patient-S01-pb", stream_version=1, type="lab",
                       subject_id="S01-pb", occurred_at=now, recorded_at=now, recorded_by="test", data={})


async def test_a_batch_works_on_the_new_events_once_each_and_a_redelivery_on_nothing(engine: AsyncEngine) -> None:
    consumer = f"test-{uuid.uuid4().hex[:8]}"
    a, b, c = event(), event(), event()
    seen: list[list[str]] = []

    async def work(conn: AsyncConnection, batch: list[StoredEvent]) -> None:
        seen.append([str(e.event_id) for e in batch])

    assert await process_batch(engine, consumer, [a, b], work) == [a, b]
    assert await process_batch(engine, consumer, [b, c, c], work) == [c]  # b was done; c twice in one fetch
    assert await process_batch(engine, consumer, [a, b, c], work) == []  # a redelivery of it all
    assert seen == [[str(a.event_id), str(b.event_id)], [str(c.event_id)]]
    other = f"test-{uuid.uuid4().hex[:8]}"
    assert await process_batch(engine, other, [a], work) == [a]  # another consumer's rows are its own
