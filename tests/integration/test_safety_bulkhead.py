"""One patient's record that the clinical rules cannot fold must not silence anybody else.

The bad record is planted straight into the store (as if something slipped past ingest one day):
the monitor sets that patient aside — its own failure row, one urgent alert naming it — and goes
on evaluating every other patient, in a batch, at start-up (the sweep) and in the stopping rules,
which say whom they could not count. Fixing the record (a retraction) brings the patient back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.safety.domain.set_aside import KIND as SET_ASIDE
from shared.events import NewEvent, StoredEvent, patient_stream
from shared.protocol import Protocol
from shared.store import eventstore
from shared.store.tables import patient_failures
from tests.integration.test_safety_monitor import Ward, day, dose, open_ward


@pytest.fixture
async def trial_ward(own_engine: AsyncEngine, protocol: Protocol, tmp_path: Path) -> AsyncIterator[Ward]:
    async with open_ward(own_engine, protocol, tmp_path) as opened:
        yield opened


def crs3(study_day: int) -> dict[str, Any]:
    return {"type": "crs", "occurred_at": day(study_day, 11).isoformat(), "grade": 3}


async def plant_unfoldable(ward: Ward, subject: str) -> StoredEvent:
    """A DLI whose cell dose is not a number: stored past every check, fatal to the fold."""
    async with ward.engine.begin() as conn:
        [event] = await eventstore.append(conn, patient_stream(subject), [NewEvent(
            type="dli", subject_id=subject, occurred_at=day(3), recorded_by="a bad import",
            data={"mnc_per_kg": "lots"})])
    return event


async def failures(ward: Ward) -> dict[str, int]:
    async with ward.engine.connect() as conn:
        return {r.subject_id: r.failures for r in await conn.execute(select(patient_failures))}


async def test_a_record_that_cannot_be_folded_sets_its_patient_aside_and_everybody_else_is_alerted(
        trial_ward: Ward) -> None:
    ward = trial_ward
    poisoned, healthy = await ward.enrol(), await ward.enrol()
    ward.clock.set(day(6, 9))
    for subject in (poisoned, healthy):
        await ward.treat(subject)
    bad = await plant_unfoldable(ward, poisoned)

    # One batch holds the bad record and the healthy patient's grade 3 CRS.
    answer = await ward.client.post(f"/v1/patients/{healthy}/events", json=crs3(2))
    assert answer.status_code == 201, answer.text
    crs = await ward.stored(answer.json()["event_id"])
    async with ward.engine.begin() as conn:
        await ward.monitor.on_batch(conn, [bad, crs])

    # The healthy patient's urgent alert is raised; the poisoned one is set aside, loudly, once.
    assert [a["severity"] for a in await ward.alerts(healthy, "crs_grade_3_plus")] == ["urgent"]
    [aside] = await ward.alerts(poisoned, SET_ASIDE)
    assert (aside["severity"], aside["status"]) == ("urgent", "open")
    assert poisoned in aside["title"] and "lots" in aside["detail"]
    assert await failures(ward) == {poisoned: 1}

    # The stopping rules cannot count the patient and say so.
    rules = (await ward.client.get("/v1/stopping-rules")).json()["rules"]
    assert {r["status"] for r in rules} == {"incomplete"}
    assert all(r["uncounted_subjects"] == [poisoned] for r in rules)

    # At start-up (the sweep) the same: nobody else is held up, and no second alert is raised.
    await ward.monitor.sweep()
    assert await failures(ward) == {poisoned: 2}
    assert len(await ward.alerts(poisoned, SET_ASIDE)) == 1
    assert len(await ward.alerts(healthy, "crs_grade_3_plus")) == 1

    # And `trialwatch replay`, which writes many patients at once, sets it aside the same way.
    assert await ward.monitor.replay() == 2
    assert await failures(ward) == {poisoned: 3}
    assert len(await ward.alerts(poisoned, SET_ASIDE)) == 1

    # Retracting the bad record brings the patient back: the alert is withdrawn, the row goes.
    await ward.record(poisoned, {"type": "retraction", "occurred_at": day(3, 12).isoformat(),
                                 "retracts_event_id": str(bad.event_id), "reason": "imported in error"})
    assert [a["status"] for a in await ward.alerts(poisoned, SET_ASIDE)] == ["withdrawn"]
    assert await failures(ward) == {}
    rules = (await ward.client.get("/v1/stopping-rules")).json()["rules"]
    assert all(r["uncounted_subjects"] == [] and r["status"] != "incomplete" for r in rules)


async def test_a_patient_whose_evaluation_fails_does_not_stop_a_later_patient_in_the_same_batch(
        trial_ward: Ward) -> None:
    ward = trial_ward
    subjects = sorted([await ward.enrol() for _ in range(3)])
    first, later = subjects[0], subjects[-1]  # evaluated in subject order: the bad one goes first
    ward.clock.set(day(6, 9))
    for subject in (first, later):
        await ward.record(subject, dose(day(1), 1))
    bad = await plant_unfoldable(ward, first)
    answer = await ward.client.post(f"/v1/patients/{later}/events", json=crs3(2))
    crs = await ward.stored(answer.json()["event_id"])
    async with ward.engine.begin() as conn:
        await ward.monitor.on_batch(conn, [crs, bad])
    assert len(await ward.alerts(later, "crs_grade_3_plus")) == 1
    assert list(await failures(ward)) == [first]


async def test_a_patient_whose_read_model_cannot_be_written_fails_the_batch_write_and_only_that_patient_is_set_aside(
        trial_ward: Ward, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's patients are written together; when that write fails, they are taken one by one
    behind their savepoints, so only the patient whose row cannot be stored is set aside."""
    ward = trial_ward
    unwritable, healthy, quiet = sorted([await ward.enrol() for _ in range(3)])
    ward.clock.set(day(6, 9))
    for subject in (unwritable, healthy, quiet):
        await ward.record(subject, dose(day(1), 1))
    decide = ward.monitor.decide

    def decide_with_an_unstorable_projection(known: Any, cause: Any = None) -> Any:
        decision = decide(known, cause)
        if decision is not None and decision.subject_id == unwritable:
            decision.projection["state"] = {"not json": object()}  # the write, not the fold, fails
        return decision

    monkeypatch.setattr(ward.monitor, "decide", decide_with_an_unstorable_projection)
    events = []
    for subject in (unwritable, healthy):
        answer = await ward.client.post(f"/v1/patients/{subject}/events", json=crs3(2))
        events.append(await ward.stored(answer.json()["event_id"]))
    async with ward.engine.begin() as conn:
        await ward.monitor.on_batch(conn, events)

    assert len(await ward.alerts(healthy, "crs_grade_3_plus")) == 1
    assert list(await failures(ward)) == [unwritable]
    [aside] = await ward.alerts(unwritable, SET_ASIDE)
    assert aside["severity"] == "urgent" and "TypeError" in aside["detail"]
