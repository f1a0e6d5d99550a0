"""The safety service's use cases: re-evaluate a patient, re-evaluate the stopping rules.

Every decision is a function of the stored history (corrections applied) and the clock:
- fold the patient's stream (shared/clinical/patient.py) into its state and the alerts it
  justifies; diff them against the alert log (domain/reconcile.py); append the difference;
- fold every patient for the stopping rules (shared/clinical/stopping.py) and diff the crossings;
  a new crossing waits, like alerts on what is missing, until the trial's records have settled
  (protocol ``entry``): a backlog entered patient by patient can cross a rule for a moment and
  uncross it with the next patient, which would be an urgent mail and a withdrawal for nothing;
- keep the patient's read model and its next due check in the same transaction.
Seeing the same event twice, or replaying all of them, therefore appends nothing new.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.safety.domain.reconcile import plan
from shared.alert_log import AlertView, fold_alerts
from shared.clinical.patient import PatientState, fold_patient
from shared.clinical.stopping import crossing_alert, evaluate_rules
from shared.events import ALERT_TYPES, PATIENT_ENROLLED, StoredEvent, patient_stream
from shared.patients import PATIENT_TYPES, load_patient_states
from shared.protocol import Protocol
from shared.store import eventstore
from shared.store.eventstore import utc
from shared.store.tables import due_checks, events, patient_projection, stopping_rule_state
from shared.store.upsert import upsert

STOPPING_KIND = "stopping_boundary_crossed"


def withdraw_reason(cause: StoredEvent | None) -> str:
    if cause is None:
        return "On re-evaluation the recorded history no longer supports this alert."
    if cause.type == "correction":
        return f"An event was corrected ({cause.data.get('reason', 'no reason given')}); the corrected history no longer supports this alert."
    if cause.type == "retraction":
        return f"An event was retracted ({cause.data.get('reason', 'no reason given')}); the remaining history no longer supports this alert."
    if cause.type == "assessment_completed":
        return "The assessment has been recorded (done before it was due)."
    return "The recorded history no longer supports this alert."


def next_moment(state: PatientState) -> datetime | None:
    """When time alone next changes this patient: an alert due, or a window closing (which
    changes who is evaluable for the stopping rules)."""
    moments = [m for m in (state.next_due_at(), state.next_window_close_at()) if m is not None]
    return min(moments, default=None)


@dataclass(frozen=True)
class Held:
    """A crossing held back until ``until``, when the records of ``subject_id`` (the latest) settle."""

    subject_id: str
    until: datetime


class SafetyMonitor:
    def __init__(self, engine: AsyncEngine, protocol: Protocol, clock: Callable[[], datetime]) -> None:
        self.engine, self.protocol, self.clock = engine, protocol, clock
        self._lock = asyncio.Lock()  # one evaluation at a time in this process
        self._rechecks: set[str] = set()

    async def on_event(self, conn: AsyncConnection, event: StoredEvent) -> None:
        """Consumer entry: a patient's event re-evaluates that patient and the rules."""
        if event.type not in PATIENT_TYPES or event.subject_id is None:
            return
        await self.evaluate_subject(conn, event.subject_id, cause=event)
        await self._recheck(conn, await self.evaluate_stopping(conn, cause=event))

    async def check(self, subject_id: str | None) -> None:
        """Scheduler entry: time has passed (a due date); re-evaluate in its own transaction."""
        async with self._lock, self.engine.begin() as conn:
            if subject_id is not None:
                await self.evaluate_subject(conn, subject_id)
            await self._recheck(conn, await self.evaluate_stopping(conn))

    def take_rechecks(self) -> set[str]:
        """Patients whose due check was brought forward for a held crossing since the last call
        (their scheduler jobs must be set again)."""
        taken, self._rechecks = self._rechecks, set()
        return taken

    async def _recheck(self, conn: AsyncConnection, held: Held | None) -> None:
        """Bring the latest-recorded patient's due check forward to when the trial's records
        will have settled, so a held crossing is raised then."""
        if held is None:
            return
        current = await conn.scalar(select(due_checks.c.due_at).where(due_checks.c.subject_id == held.subject_id))
        await self._due(conn, held.subject_id, held.until if current is None else min(utc(current), held.until))
        self._rechecks.add(held.subject_id)

    async def sweep(self) -> int:
        """Re-evaluate every enrolled patient, each in its own transaction, then the rules once
        (start-up and ``trialwatch replay``: catches whatever fell due while nothing ran)."""
        async with self.engine.connect() as conn:
            subjects = (await conn.execute(
                select(events.c.subject_id).where(events.c.type == PATIENT_ENROLLED).order_by(events.c.position)
            )).scalars().all()
        for subject_id in subjects:
            async with self._lock, self.engine.begin() as conn:
                await self.evaluate_subject(conn, subject_id)
        await self.check(None)
        return len(subjects)

    async def evaluate_subject(
        self, conn: AsyncConnection, subject_id: str, *, cause: StoredEvent | None = None
    ) -> PatientState | None:
        history = await eventstore.read_stream(conn, patient_stream(subject_id))
        if not any(e.type == PATIENT_ENROLLED for e in history):
            return None
        now = self.clock()
        state = fold_patient(history, self.protocol, now=now)
        alerts = await eventstore.read_types(conn, ALERT_TYPES, subject_id=subject_id)
        existing = {k: v for k, v in fold_alerts(alerts).items() if v.kind != STOPPING_KIND}
        await self._append(conn, plan(state.desired_alerts(), existing, now=now,
                                      withdraw_reason=withdraw_reason(cause),
                                      causation=cause.event_id if cause else None,
                                      held=state.held_alert_ids()))
        public = state.public()
        await upsert(conn, patient_projection, {
            "subject_id": subject_id, "site_id": public["site_id"], "state": public,
            "last_position": history[-1].position, "updated_at": now,
        }, ["subject_id"])
        await self._due(conn, subject_id, next_moment(state))
        return state

    async def _due(self, conn: AsyncConnection, subject_id: str, due: datetime | None) -> None:
        if due is None:
            await conn.execute(delete(due_checks).where(due_checks.c.subject_id == subject_id))
        else:
            # In UTC: SQLite keeps no offset, and times are read back as UTC (eventstore.utc).
            await upsert(conn, due_checks, {"subject_id": subject_id, "check": "next", "due_at": due.astimezone(UTC),
                                            "done": False}, ["subject_id", "check"])

    async def evaluate_stopping(self, conn: AsyncConnection, *, cause: StoredEvent | None = None) -> Held | None:
        """Diff the rules' crossings against the alert log. A new crossing is held back while the
        trial's records have not settled; then the answer says when, and on whose record."""
        now = self.clock()
        states = await load_patient_states(conn, self.protocol, now=now)
        statuses = evaluate_rules(self.protocol, states)
        desired = [crossing_alert(self.protocol, s) for s in statuses if s.crossed]
        existing = await trial_level_alerts(conn)
        latest = max(states, key=lambda s: s.chart.settled_at, default=None)
        settling = latest is not None and now < latest.chart.settled_at
        held = frozenset(a.alert_id for a in desired
                         if settling and not (a.alert_id in existing and existing[a.alert_id].is_open))
        await self._append(conn, plan(desired, existing, now=now,
                                      withdraw_reason=withdraw_reason(cause),
                                      causation=cause.event_id if cause else None, held=held))
        for status in statuses:
            await upsert(conn, stopping_rule_state, {
                "rule_id": status.rule.id, "state": status.public(), "updated_at": now,
            }, ["rule_id"])
        return Held(latest.subject_id, latest.chart.settled_at) if held and latest is not None else None

    async def _append(self, conn: AsyncConnection, appends: list) -> None:  # type: ignore[type-arg]
        for item in appends:
            await eventstore.append(conn, item.stream_id, [item.event], expected_version=item.expected_version)


async def trial_level_alerts(conn: AsyncConnection) -> dict[uuid.UUID, AlertView]:
    events = [e for e in await eventstore.read_types(conn, ALERT_TYPES) if e.subject_id is None]
    return {k: v for k, v in fold_alerts(events).items() if v.kind == STOPPING_KIND}
