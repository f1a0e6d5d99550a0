"""``trialwatch replay``: one pass over the log rebuilds what each patient's evaluation wrote."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.safety.handlers import SafetyMonitor
from shared.events import ALERT_TYPES, NewEvent, patient_stream
from shared.protocol import Protocol
from shared.store import eventstore
from shared.store.tables import due_checks, events, patient_failures, patient_projection, rule_inputs
from tests.integration.test_safety_monitor import Ward, day, open_ward


@pytest.fixture
async def trial_ward(own_engine: AsyncEngine, protocol: Protocol, tmp_path: Path) -> AsyncIterator[Ward]:
    async with open_ward(own_engine, protocol, tmp_path) as opened:
        yield opened


async def read_models(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        return {
            "rules": sorted(tuple(r) for r in await conn.execute(select(rule_inputs))),
            "states": sorted((r.subject_id, str(r.last_position)) for r in await conn.execute(select(patient_projection))),
            "due": sorted((r.subject_id, r.due_at) for r in await conn.execute(select(due_checks))),
            "alert events": await conn.scalar(select(func.count()).select_from(events).where(events.c.type.in_(ALERT_TYPES))),
        }


# 1: every patient replayed in this process; 2: the later half in a second one (PostgreSQL only:
# on SQLite the replay stays in one process, and the test holds all the same).
PROCESSES = pytest.mark.parametrize("processes", [1, 2])


@PROCESSES
async def test_replay_rebuilds_every_read_model_from_the_log_and_appends_nothing(trial_ward: Ward,
                                                                                  processes: int) -> None:
    ward = trial_ward
    subjects = [await ward.enrol() for _ in range(3)]
    ward.clock.set(day(6, 9))
    for n, subject in enumerate(subjects):
        await ward.treat(subject)
        await ward.record(subject, {"type": "crs", "occurred_at": day(2, 11).isoformat(), "grade": 1 + 2 * (n == 0)})
    ward.clock.set(day(20, 9))  # the 2-week windows have closed: rows count now, day14 is overdue
    for subject in subjects:
        await ward.monitor.check(subject)
    before = await read_models(ward.engine)
    assert before["rules"] and before["alert events"]

    async with ward.engine.begin() as conn:
        for table in (rule_inputs, patient_projection, due_checks):
            await conn.execute(delete(table))
    told: list[tuple[int, int]] = []
    assert await ward.monitor.replay(progress=lambda done, total: told.append((done, total)), processes=processes) == 3
    assert await read_models(ward.engine) == before
    # After each transaction of this process, then the second process's patients all at once.
    assert told[-1] == (3, 3) and all(total == 3 for _, total in told)
    assert [done for done, _ in told] == sorted({done for done, _ in told})  # each patient counted once
    if processes == 1 or ward.engine.dialect.name != "postgresql":
        assert told == [(3, 3)]


@PROCESSES
@pytest.mark.parametrize("broken_first", [True, False])
async def test_a_row_that_does_not_decode_sets_its_patient_aside_and_the_replay_goes_on(
        trial_ward: Ward, processes: int, broken_first: bool) -> None:
    ward = trial_ward
    broken, healthy = sorted([await ward.enrol(), await ward.enrol()], reverse=not broken_first)
    ward.clock.set(day(6, 9))
    for subject in (broken, healthy):
        await ward.treat(subject)
    # A row no StoredEvent can hold (its data is a list, not an object), planted past every check.
    planted = NewEvent.model_construct(event_id=uuid.uuid4(), type="lab", schema_version=1, subject_id=broken,
                                       occurred_at=day(3), recorded_by="a bad import",
                                       data=["not", "an", "object"],  # type: ignore[arg-type]
                                       correlation_id=None, causation_id=None)
    async with ward.engine.begin() as conn:
        await eventstore.append(conn, patient_stream(broken), [planted])
    async with ward.engine.begin() as conn:
        for table in (rule_inputs, patient_projection, due_checks):
            await conn.execute(delete(table))

    assert await ward.monitor.replay(processes=processes) == 2
    async with ward.engine.connect() as conn:
        failed = {r.subject_id: r.error for r in await conn.execute(select(patient_failures))}
        projected = set((await conn.execute(select(patient_projection.c.subject_id))).scalars())
    assert list(failed) == [broken] and "data" in failed[broken]
    assert projected == {healthy}


async def test_when_the_second_process_fails_the_first_replays_its_half(trial_ward: Ward) -> None:
    ward = trial_ward
    subjects = [await ward.enrol() for _ in range(4)]
    ward.clock.set(day(6, 9))
    for subject in subjects:
        await ward.treat(subject)
    ward.clock.set(day(20, 9))
    for subject in subjects:
        await ward.monitor.check(subject)
    before = await read_models(ward.engine)
    async with ward.engine.begin() as conn:
        for table in (rule_inputs, patient_projection, due_checks):
            await conn.execute(delete(table))

    # A clock that fails in any process but this one: the second process cannot write a thing.
    parent = os.getpid()

    def clock() -> datetime:
        if os.getpid() != parent:
            raise RuntimeError("no clock in the second process")
        return ward.clock()

    monitor = SafetyMonitor(ward.engine, ward.monitor.protocol, clock)
    assert await monitor.replay(processes=2) == 4
    assert await read_models(ward.engine) == before
    async with ward.engine.connect() as conn:
        assert not (await conn.execute(select(patient_failures))).first()
