"""The safety monitor on a real store, with a clock the test moves (CONTRACT.md section 4).

Events go in through the ingest API in-process (so they are stored as the API stores them); the
monitor is then driven the way its two callers drive it: ``on_event`` as the bus consumer does
after each event, ``check`` as the scheduler does when a due moment comes.

Trial time: course 1 day 1 is 2025-12-01 in Asia/Shanghai. The day14 window covers days 1-14,
closes at the midnight starting day 15, and the assessment falls overdue at the midnight starting
day 18 (day 14 + 3 days grace).
"""

from __future__ import annotations

import contextlib
import json
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.app import create_app
from services.ingest.auth import create_token
from services.safety.handlers import SafetyMonitor
from shared.clinical.patient import fold_patient
from shared.events import (
    ALERT_RAISED,
    ALERT_TYPES,
    ALERT_WITHDRAWN,
    STOPPING_BOUNDARY_CROSSED,
    StoredEvent,
    patient_stream,
)
from shared.protocol import Protocol, load_protocol
from shared.settings import Settings
from shared.store import eventstore
from shared.store.eventstore import utc
from shared.store.tables import due_checks, patient_projection, stopping_rule_state

SHANGHAI = ZoneInfo("Asia/Shanghai")
DAY1 = datetime(2025, 12, 1, tzinfo=SHANGHAI).date()


def day(n: int, hour: int = 10, minute: int = 0) -> datetime:
    """Trial-zone time on study day ``n`` (day 1 = 2025-12-01)."""
    return datetime.combine(DAY1 + timedelta(days=n - 1), time(hour, minute), tzinfo=SHANGHAI)


CLOSES = day(15, 0)  # the 2-week window closes
OVERDUE = day(18, 0)  # the day14 assessment is overdue from here
SETTLE = timedelta(seconds=load_protocol().entry.settle_seconds)  # alerts on what is missing wait this long


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now.astimezone(UTC)

    def __call__(self) -> datetime:
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when.astimezone(UTC)


def dose(when: datetime, study_day: int) -> dict[str, Any]:
    return {"type": "blinatumomab_dose", "occurred_at": when.isoformat(), "course": 1, "day": study_day,
            "dose_ug": 28.0}


@dataclass
class Ward:
    """The API and the safety monitor on one store, both reading one clock."""

    client: httpx.AsyncClient
    monitor: SafetyMonitor
    engine: AsyncEngine
    clock: Clock

    async def enrol(self) -> str:
        subject = f"S01-{uuid.uuid4().hex[:8]}"
        body = {
            "subject_id": subject, "site_id": "S01", "arm": "blinatumomab_dli", "cohort": "mrd_positive",
            "enrolled_at": day(0, 9).isoformat(), "age_years": 34, "weight_kg": 61.5,
            "transplant_date": "2025-03-02", "relapse_date": "2025-11-20",
            "eligibility": {"stable_vital_signs": True, "severe_infection": False, "gvhd_grade_2_to_4": False,
                            "organ_failure": False, "cns_leukemia": False, "drug_allergy": False},
        }
        answer = await self.client.post("/v1/patients", json=body)
        assert answer.status_code == 201, answer.text
        await self.deliver(await self.stored(answer.json()["event_id"]))
        return subject

    async def record(self, subject: str, body: dict[str, Any]) -> StoredEvent:
        """Record one event through the API, then let the monitor see it (as the consumer would)."""
        answer = await self.client.post(f"/v1/patients/{subject}/events", json=body)
        assert answer.status_code == 201, answer.text
        stored = await self.stored(answer.json()["event_id"])
        await self.deliver(stored)
        return stored

    async def treat(self, subject: str, first_dose_day: int = 1) -> StoredEvent:
        """Course 1 on days 1 and 5 (MRD-positive: 5 days is long enough, no deviation)."""
        first = await self.record(subject, dose(day(first_dose_day), 1))
        await self.record(subject, dose(day(first_dose_day + 4), 5))
        return first

    async def deliver(self, event: StoredEvent) -> None:
        async with self.engine.begin() as conn:
            await self.monitor.on_event(conn, event)

    async def stored(self, event_id: str) -> StoredEvent:
        async with self.engine.connect() as conn:
            event = await eventstore.get_event(conn, event_id)
        assert event is not None
        return event

    async def history(self, subject: str) -> list[StoredEvent]:
        async with self.engine.connect() as conn:
            return await eventstore.read_stream(conn, patient_stream(subject))

    async def alert_events(self, subject: str) -> list[StoredEvent]:
        async with self.engine.connect() as conn:
            return await eventstore.read_types(conn, ALERT_TYPES, subject_id=subject)

    async def alerts(self, subject: str, kind: str | None = None) -> list[dict[str, Any]]:
        answer = await self.client.get("/v1/alerts", params={"subject_id": subject})
        assert answer.status_code == 200, answer.text
        return [a for a in answer.json()["alerts"] if kind is None or a["kind"] == kind]

    async def patient(self, subject: str) -> dict[str, Any]:
        answer = await self.client.get(f"/v1/patients/{subject}")
        assert answer.status_code == 200, answer.text
        return answer.json()  # type: ignore[no-any-return]

    async def due_at(self, subject: str) -> datetime | None:
        async with self.engine.connect() as conn:
            due = await conn.scalar(select(due_checks.c.due_at).where(due_checks.c.subject_id == subject))
        return utc(due) if due is not None else None


@contextlib.asynccontextmanager
async def open_ward(engine: AsyncEngine, protocol: Protocol, tmp_path: Path) -> AsyncIterator[Ward]:
    clock = Clock(day(0, 9, 5))
    app = create_app(Settings(data_dir=tmp_path), engine=engine, protocol=protocol)
    app.state.clock = clock
    async with engine.begin() as conn:
        token = await create_token(conn, user=f"monitor-test-{uuid.uuid4().hex[:4]}", role="admin", site_id=None)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest",
                                 headers=headers) as client:
        yield Ward(client, SafetyMonitor(engine, protocol, clock), engine, clock)


@pytest.fixture
async def ward(engine: AsyncEngine, protocol: Protocol, tmp_path: Path) -> AsyncIterator[Ward]:
    async with open_ward(engine, protocol, tmp_path) as opened:
        yield opened


@pytest.fixture
async def trial_ward(own_engine: AsyncEngine, protocol: Protocol, tmp_path: Path) -> AsyncIterator[Ward]:
    """A ward on a database of its own: the stopping rules see this test's patients alone."""
    async with open_ward(own_engine, protocol, tmp_path) as opened:
        yield opened


OVERDUE_KIND = "assessment_overdue"


async def test_an_unassessed_day14_falls_overdue_at_the_deadline_once_and_a_late_entry_withdraws_it(
        ward: Ward, protocol: Protocol, engine: AsyncEngine) -> None:
    subject = await ward.enrol()
    ward.clock.set(day(5, 12))
    await ward.treat(subject)

    # One second before the midnight that starts day 18 the scheduler's check finds nothing due.
    ward.clock.set(OVERDUE - timedelta(seconds=1))
    await ward.monitor.check(subject)
    assert await ward.alerts(subject) == []
    assert (await ward.patient(subject))["windows"]["day14"]["status"] == "awaiting_assessment"

    # At the deadline: one high assessment_overdue alert.
    ward.clock.set(OVERDUE)
    await ward.monitor.check(subject)
    [overdue] = await ward.alerts(subject)
    assert (overdue["kind"], overdue["severity"], overdue["status"]) == (OVERDUE_KIND, "high", "open")
    assert (await ward.patient(subject))["windows"]["day14"]["status"] == "overdue"
    said = len(await ward.alert_events(subject))

    # Checking again, redelivering every patient event, or rebuilding the projections from
    # scratch with a fresh monitor (what `trialwatch replay` does) says nothing more.
    ward.clock.set(OVERDUE + timedelta(hours=5))
    await ward.monitor.check(subject)
    for event in await ward.history(subject):
        await ward.deliver(event)
    async with engine.begin() as conn:
        for table in (patient_projection, due_checks):
            await conn.execute(delete(table).where(table.c.subject_id == subject))
    await SafetyMonitor(engine, protocol, ward.clock).check(subject)
    assert len(await ward.alert_events(subject)) == said
    assert [a["alert_id"] for a in await ward.alerts(subject)] == [overdue["alert_id"]]

    # The assessment was in fact done on day 17, and entered on day 19: the alert is withdrawn.
    ward.clock.set(day(19, 9))
    await ward.record(subject, {"type": "assessment_completed", "occurred_at": day(17, 16).isoformat(),
                                "timepoint": "day14"})
    [withdrawn] = await ward.alerts(subject)
    assert withdrawn["alert_id"] == overdue["alert_id"] and withdrawn["status"] == "withdrawn"
    assert "assessment has been recorded" in withdrawn["withdrawn_reason"]

    # Once: later checks leave it withdrawn and append nothing.
    await ward.monitor.check(subject)
    events = await ward.alert_events(subject)
    assert [e.type for e in events] == [ALERT_RAISED, ALERT_WITHDRAWN]
    view = await ward.patient(subject)
    assert view["windows"]["day14"]["status"] == "completed" and view["open_alerts"] == []


async def test_a_window_already_past_when_its_dose_is_entered_is_overdue_on_the_first_evaluation(
        ward: Ward) -> None:
    subject = await ward.enrol()

    # The first dose (day 1) is entered 25 days late, long after the day14 deadline.
    ward.clock.set(day(26, 10))
    await ward.record(subject, dose(day(1), 1))

    # The evaluation of that one event finds it overdue at once; the alert waits only for the entry
    # to settle (more may be on its way: the assessment itself), a due check a few seconds on.
    assert (await ward.patient(subject))["windows"]["day14"]["status"] == "overdue"
    assert await ward.alerts(subject, OVERDUE_KIND) == []
    assert await ward.due_at(subject) == day(26, 10) + SETTLE

    # Nothing more came: the due check raises it.
    ward.clock.set(day(26, 10) + SETTLE)
    await ward.monitor.check(subject)
    [overdue] = await ward.alerts(subject, OVERDUE_KIND)
    assert overdue["severity"] == "high" and overdue["status"] == "open"
    # Every moment that matters has passed: no due check is left for this patient.
    assert await ward.due_at(subject) is None


async def test_a_late_history_entered_event_by_event_raises_nothing_it_does_not_end_with(ward: Ward) -> None:
    # The course and its day-14 assessment, entered 25 days late a few seconds apart: after the
    # first dose the course looks finished and too short, and day 14 looks overdue, but neither
    # is raised while the entry goes on, and once it has settled there is nothing to raise.
    subject = await ward.enrol()
    ward.clock.set(day(26, 10))
    await ward.record(subject, dose(day(1), 1))
    ward.clock.set(day(26, 10) + timedelta(seconds=2))
    await ward.record(subject, dose(day(5), 5))
    ward.clock.set(day(26, 10) + timedelta(seconds=4))
    await ward.record(subject, {"type": "assessment_completed", "occurred_at": day(14, 16).isoformat(),
                                "timepoint": "day14"})
    ward.clock.set(day(27))
    await ward.monitor.check(subject)
    assert await ward.alert_events(subject) == []


async def test_the_due_check_holds_the_next_moment_and_follows_a_corrected_first_dose(ward: Ward) -> None:
    subject = await ward.enrol()
    ward.clock.set(day(5, 12))
    first = await ward.treat(subject)

    # The next thing time alone changes: the 2-week window closes at the start of day 15.
    assert await ward.due_at(subject) == CLOSES

    # The first dose was really given on Dec 2nd: everything moves by one day.
    await ward.record(subject, {"type": "correction", "occurred_at": day(5, 12).isoformat(),
                                "corrects_event_id": str(first.event_id), "reason": "dose date mistyped",
                                "replacement": dose(day(2), 1)})
    assert await ward.due_at(subject) == day(16, 0)
    assert (await ward.patient(subject))["windows"]["day14"]["overdue_from"] == day(19, 0).isoformat()

    # Once the window has closed, the check waits for the assessment deadline.
    ward.clock.set(day(16, 0))
    await ward.monitor.check(subject)
    assert await ward.due_at(subject) == day(19, 0)
    assert await ward.alerts(subject) == []

    # At that deadline the alert is raised and nothing is left to wait for.
    ward.clock.set(day(19, 0))
    await ward.monitor.check(subject)
    assert [a["kind"] for a in await ward.alerts(subject)] == [OVERDUE_KIND]
    assert await ward.due_at(subject) is None


async def test_grade_3_crs_at_day_14_2359_counts_in_the_2_week_window_and_day_15_0000_does_not(
        ward: Ward, protocol: Protocol) -> None:
    inside, outside = await ward.enrol(), await ward.enrol()
    ward.clock.set(day(16, 9))
    for subject, when in ((inside, day(14, 23, 59)), (outside, day(15, 0, 0))):
        await ward.treat(subject)
        await ward.record(subject, {"type": "crs", "occurred_at": when.isoformat(), "grade": 3})

    # Both are urgent CRS alerts; only the one on day 14 counts toward the 2-week incidence.
    counted = {}
    for subject in (inside, outside):
        view = await ward.patient(subject)
        assert view["windows"]["day14"]["end"] == "2025-12-14"
        [crs] = [a for a in view["open_alerts"] if a["kind"] == "crs_grade_3_plus"]
        assert crs["severity"] == "urgent"
        counted[subject] = crs["facts"]["counts_toward"]
    assert "crs_grade_3_plus_2w" in counted[inside]
    assert "crs_grade_3_plus_2w" not in counted[outside] and counted[outside] == []

    # The incidence endpoint the stopping rule monitors (the window has closed on day 16).
    def incidence(subject_history: list[StoredEvent]) -> bool | None:
        return fold_patient(subject_history, protocol, now=ward.clock()).endpoint("crs_grade_3_plus_2w")

    assert incidence(await ward.history(inside)) is True
    assert incidence(await ward.history(outside)) is False


async def test_icans_graded_3_from_findings_is_urgent_and_a_correction_to_grade_1_withdraws_it(
        ward: Ward, protocol: Protocol) -> None:
    subject = await ward.enrol()
    ward.clock.set(day(6, 12))
    await ward.treat(subject)

    # ICE 2 in an awake patient: ASTCT grade 3, derived at ingest, urgent at once.
    icans = await ward.record(subject, {"type": "icans", "occurred_at": day(3, 8).isoformat(),
                                        "ice_score": 2, "consciousness": "awakens_to_voice"})
    assert (icans.data["grade"], icans.data["scale"]) == (3, "ASTCT-2019")
    [urgent] = await ward.alerts(subject, "icans_grade_3_plus")
    assert (urgent["severity"], urgent["status"], urgent["title"]) == ("urgent", "open", "Grade 3 ICANS")
    assert "derived ASTCT grade 3 from ICE 2/10, awakens to voice" in urgent["detail"]
    assert "Withhold blinatumomab" in urgent["action"] and "9 µg/day" in urgent["action"]
    assert "icans_any_2w" in urgent["facts"]["counts_toward"]

    # Recounted the next day: ICE 8, alert -> grade 1. The urgent alert is withdrawn, an info one raised.
    await ward.record(subject, {"type": "correction", "occurred_at": day(4, 9).isoformat(),
                                "corrects_event_id": str(icans.event_id), "reason": "ICE recounted",
                                "replacement": {"type": "icans", "occurred_at": day(3, 8).isoformat(),
                                                "ice_score": 8, "consciousness": "alert"}})
    [withdrawn] = await ward.alerts(subject, "icans_grade_3_plus")
    assert withdrawn["alert_id"] == urgent["alert_id"] and withdrawn["status"] == "withdrawn"
    [low] = await ward.alerts(subject, "icans_low_grade")
    assert (low["severity"], low["status"], low["title"]) == ("info", "open", "Grade 1 ICANS")
    assert (await ward.patient(subject))["grades"]["icans_max"] == 1

    # Corrected again to no ICANS (ICE 10, alert: grade 0): nothing open, and it no longer counts.
    await ward.record(subject, {"type": "correction", "occurred_at": day(4, 10).isoformat(),
                                "corrects_event_id": str(icans.event_id), "reason": "it was sedation",
                                "replacement": {"type": "icans", "occurred_at": day(3, 8).isoformat(),
                                                "ice_score": 10, "consciousness": "alert"}})
    assert [a["status"] for a in await ward.alerts(subject) if a["kind"].startswith("icans")] == \
        ["withdrawn", "withdrawn"]
    ward.clock.set(day(16, 9))
    state = fold_patient(await ward.history(subject), protocol, now=ward.clock())
    assert state.endpoint("icans_any_2w") is False


# --------------------------------------------------------------------------- determinism

STORY: dict[str, dict[str, Any]] = {
    "dose1": dose(day(1), 1),
    "dose5": dose(day(5), 5),
    "crs": {"type": "crs", "occurred_at": day(3, 22).isoformat(), "grade": 2},
    "icans": {"type": "icans", "occurred_at": day(4, 8).isoformat(), "grade": 1},
    "lab": {"type": "lab", "occurred_at": day(6, 7).isoformat(), "test": "neutrophils", "value": 0.4,
            "unit": "10^9/L"},
    "infection": {"type": "infection", "occurred_at": day(9, 15).isoformat(), "grade": 3, "site": "lung"},
    "follow_up": {"type": "follow_up", "occurred_at": day(16, 11).isoformat()},
}
AMENDMENTS: dict[str, tuple[str, dict[str, Any]]] = {  # key -> (target key, body without the target id)
    "regrade": ("crs", {"type": "correction", "occurred_at": day(20, 11).isoformat(),
                        "reason": "re-graded: needed oxygen by high-flow cannula",
                        "replacement": {"type": "crs", "occurred_at": day(3, 22).isoformat(), "grade": 3}}),
    "unsay": ("icans", {"type": "retraction", "occurred_at": day(20, 11).isoformat(),
                        "reason": "entered for the wrong patient"}),
}


def shuffled(seed: int) -> list[str]:
    """The story's events in a random order; an amendment always after the event it points at."""
    rng = random.Random(seed)
    order = rng.sample(list(STORY), len(STORY))
    for key, (target, _) in AMENDMENTS.items():
        order.insert(rng.randint(order.index(target) + 1, len(order)), key)
    return order


async def tell(ward: Ward, order: list[str]) -> str:
    subject = await ward.enrol()
    ids: dict[str, str] = {}
    for key in order:
        if key in STORY:
            body = STORY[key]
        else:
            target, body = AMENDMENTS[key]
            pointer = "corrects_event_id" if body["type"] == "correction" else "retracts_event_id"
            body = {**body, pointer: ids[target]}
        ids[key] = str((await ward.record(subject, body)).event_id)
    return subject


async def comparable(ward: Ward, subject: str) -> tuple[str, list[str]]:
    """The patient's GET and its open alerts, with what names this particular recording taken out.

    An alert is compared by what it is (kind, severity, rule, title, cause): its detail is written
    when it is raised, so a lab entered before the doses keeps saying "6 days after enrolment"
    where one entered after them says "course 1 day 6".
    """
    view = await ward.patient(subject)
    history = await ward.history(subject)
    labels = {str(e.event_id): f"<{e.type} at {e.occurred_at.isoformat()}>" for e in history}

    def neutral(value: Any) -> str:
        text = json.dumps(value, sort_keys=True).replace(subject, "<subject>")
        for event_id, label in labels.items():
            text = text.replace(event_id, label)
        return text

    alerts = [{k: a[k] for k in ("kind", "severity", "status", "rule", "title", "cause_event_ids")}
              for a in view.pop("open_alerts")]
    for volatile in ("as_of", "stream_version"):
        view.pop(volatile)
    return neutral(view), sorted(neutral(a) for a in alerts)


async def test_the_same_history_recorded_in_any_order_gives_the_same_patient_and_alerts(ward: Ward) -> None:
    # Everything is entered on day 20, late, in three different orders.
    ward.clock.set(day(20, 12))
    in_order = list(STORY) + list(AMENDMENTS)
    subjects = [await tell(ward, order) for order in (in_order, shuffled(7), shuffled(2025))]
    assert len({tuple(shuffled(7)), tuple(shuffled(2025)), tuple(in_order)}) == 3

    ward.clock.set(day(20, 12) + SETTLE)  # the entry has settled: what is missing is alerted
    for subject in subjects:
        await ward.monitor.check(subject)

    first, *others = [await comparable(ward, s) for s in subjects]
    for other in others:
        assert other == first
    view, alerts = first
    assert '"crs_max": 3' in view and '"icans_max": null' in view
    kinds = sorted(json.loads(a)["kind"] for a in alerts)
    assert kinds == ["assessment_overdue", "crs_grade_3_plus", "heme_ae_grade_3_plus", "infection_grade_3"]


async def test_a_crossing_waits_for_the_trials_records_to_settle_and_is_raised_once_then(
        trial_ward: Ward) -> None:
    ward = trial_ward
    # Two patients with grade 3 CRS, entered a few seconds apart: 2 of the first 2 evaluable
    # patients cross the CRS boundary (stop at 2 at look 2).
    ward.clock.set(day(20, 10))
    subjects = []
    for n in range(2):
        subject = await ward.enrol()
        await ward.record(subject, dose(day(1), 1))
        await ward.record(subject, {"type": "crs", "occurred_at": day(2 + n).isoformat(), "grade": 3})
        subjects.append(subject)
    async with ward.engine.connect() as conn:
        state = await conn.scalar(select(stopping_rule_state.c.state).where(
            stopping_rule_state.c.rule_id == "crs_grade_3_plus"))
    assert state["crossed"] and (state["events"], state["evaluable"], state["stop_at"]) == (2, 2, 2)

    # The state says crossed at once; the urgent alert waits for the entry to settle, and the
    # latest patient's due check is brought forward to that moment.
    assert [e for e in await trial_alert_events(ward) if e.type == STOPPING_BOUNDARY_CROSSED] == []
    assert await ward.due_at(subjects[-1]) == day(20, 10) + SETTLE

    # It settles: the due check raises the crossing, once.
    ward.clock.set(day(20, 10) + SETTLE)
    await ward.monitor.check(subjects[-1])
    await ward.monitor.check(subjects[-1])
    [crossed] = await trial_alert_events(ward)
    assert crossed.type == STOPPING_BOUNDARY_CROSSED


async def trial_alert_events(ward: Ward) -> list[StoredEvent]:
    async with ward.engine.connect() as conn:
        return [e for e in await eventstore.read_types(conn, ALERT_TYPES) if e.subject_id is None]
