"""``trialwatch replay``: one pass over the log rebuilds what each patient's evaluation wrote."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.events import ALERT_TYPES
from shared.protocol import Protocol
from shared.store.tables import due_checks, events, patient_projection, rule_inputs
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


async def test_replay_rebuilds_every_read_model_from_the_log_and_appends_nothing(trial_ward: Ward) -> None:
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
    assert await ward.monitor.replay(progress=lambda done, total: told.append((done, total))) == 3
    assert await read_models(ward.engine) == before
    assert told == [(3, 3)]
