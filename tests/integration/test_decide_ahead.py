"""On SQLite the safety service decides a batch's patients before the batch's write transaction.

SQLite has one write lock; reading and folding a batch's patients inside the transaction held it
while the ingest and the notifier waited. So the patients are decided from a snapshot first
(``SafetyMonitor.decide_ahead``, no lock), and the transaction only checks that nothing happened
to them since: a patient with a newer event is read and decided again under the lock. PostgreSQL
locks patients, not the store, and decides inside the transaction as before.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.safety.handlers import Ahead, Decision, Known
from shared.events import StoredEvent
from shared.protocol import Protocol
from shared.store.tables import patient_projection
from tests.integration.test_safety_bulkhead import crs3
from tests.integration.test_safety_monitor import Ward, day, open_ward


@pytest.fixture
async def trial_ward(own_engine: AsyncEngine, protocol: Protocol, tmp_path: Path) -> AsyncIterator[Ward]:
    async with open_ward(own_engine, protocol, tmp_path) as opened:
        yield opened


def lab(study_day: int) -> dict[str, object]:
    return {"type": "lab", "occurred_at": day(study_day, 8).isoformat(), "test": "neutrophils",
            "value": 4.0, "unit": "10^9/L"}


async def two_patients(ward: Ward) -> tuple[str, str, list[StoredEvent]]:
    """Two treated patients and a batch: a grade 3 CRS of the first, a normal lab of the second."""
    first, second = await ward.enrol(), await ward.enrol()
    ward.clock.set(day(6, 9))
    for subject in (first, second):
        await ward.treat(subject)
    return first, second, [await ward.record(first, crs3(2)), await ward.record(second, lab(3))]


async def projected_up_to(ward: Ward, subject: str) -> int:
    """The last position of the patient's stream its read model was written from."""
    async with ward.engine.connect() as conn:
        return int(await conn.scalar(select(patient_projection.c.last_position)
                                     .where(patient_projection.c.subject_id == subject)))


async def decided_ahead(ward: Ward) -> tuple[str, str, list[StoredEvent], Ahead] | None:
    """``two_patients`` and their batch decided ahead; None on PostgreSQL, which decides nothing
    ahead (checked here)."""
    first, second, batch = await two_patients(ward)
    ahead = await ward.monitor.decide_ahead(batch)
    if ward.engine.dialect.name != "sqlite":
        assert ahead is None
        return None
    assert ahead is not None
    return first, second, batch, ahead


def spy_on_decide(ward: Ward) -> list[str]:
    """The patients the monitor decides from now on, in order."""
    decided: list[str] = []
    decide = ward.monitor.decide

    def spied(known: Known, cause: StoredEvent | None = None) -> Decision | None:
        decided.append(known.history[0].subject_id or "")
        return decide(known, cause)

    ward.monitor.decide = spied  # type: ignore[method-assign]
    return decided


async def test_patients_are_decided_without_the_write_lock_and_not_again_inside_the_transaction(
        trial_ward: Ward) -> None:
    ward = trial_ward
    first, second, batch = await two_patients(ward)
    if ward.engine.dialect.name != "sqlite":  # PostgreSQL decides in the transaction, as before
        assert await ward.monitor.decide_ahead(batch) is None
        return

    # Another writer holds SQLite's one write lock the whole time the batch is decided.
    holder = sqlite3.connect(str(ward.engine.url.database), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        ahead = await asyncio.wait_for(ward.monitor.decide_ahead(batch), timeout=10)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert ahead is not None and sorted(ahead.decisions) == sorted([first, second])

    decided = spy_on_decide(ward)
    async with ward.engine.begin() as conn:
        await ward.monitor.on_batch(conn, batch, ahead=ahead)
    assert decided == []  # nothing read or folded while the lock was held
    assert [a["severity"] for a in await ward.alerts(first, "crs_grade_3_plus")] == ["urgent"]
    assert await ward.alerts(second, "crs_grade_3_plus") == []
    assert await projected_up_to(ward, second) == batch[1].position


async def test_a_patient_with_an_event_after_the_snapshot_is_decided_again_under_the_lock(
        trial_ward: Ward) -> None:
    ward = trial_ward
    if (found := await decided_ahead(ward)) is None:
        return
    first, second, batch, ahead = found
    late = await ward.record(second, crs3(3))  # after the snapshot, before the batch's transaction

    decided = spy_on_decide(ward)
    async with ward.engine.begin() as conn:
        await ward.monitor.on_batch(conn, batch, ahead=ahead)

    # The second patient's snapshot decision (a normal lab: nothing to say) was stale: it was
    # decided again from its whole stream, and its grade 3 CRS is alerted; the first was not.
    assert decided == [second]
    assert [a["severity"] for a in await ward.alerts(second, "crs_grade_3_plus")] == ["urgent"]
    assert [a["severity"] for a in await ward.alerts(first, "crs_grade_3_plus")] == ["urgent"]
    assert await projected_up_to(ward, second) == late.position


async def test_a_decision_made_for_another_cause_is_made_again(trial_ward: Ward) -> None:
    """A batch redelivered in part (some events already processed) names other causes than the
    ones decided ahead: those patients are decided again, their withdrawals citing the right event."""
    ward = trial_ward
    if (found := await decided_ahead(ward)) is None:
        return
    first, second, batch, ahead = found
    decided = spy_on_decide(ward)
    async with ward.engine.begin() as conn:
        await ward.monitor.on_batch(conn, [batch[0]], ahead=ahead)  # the second patient's event was done
    assert decided == []
    ahead_of_one = await ward.monitor.decide_ahead([batch[1]])
    assert ahead_of_one is not None and decided == [second]
    decided.clear()
    async with ward.engine.begin() as conn:
        await ward.monitor.on_batch(conn, [batch[0], batch[1]], ahead=ahead_of_one)
    assert decided == [first]  # decided ahead only for the second patient
