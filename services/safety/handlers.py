"""The safety service's use cases: evaluate the patients a batch of events names, evaluate the
stopping rules over what the patients' evaluations recorded.

Every decision is a function of the stored history (corrections applied) and the clock:
- a patient's evaluation folds the patient's stream (shared/clinical/patient.py) into its state
  and the alerts it justifies, diffs them against the patient's alert log (domain/reconcile.py)
  and appends the difference; in the same transaction it writes the patient's read model: the
  projection, its next due check, and what it gives each stopping rule (``rule_inputs``);
- the rules read those rows, never a fold of every patient (eventsourcing's process application
  and its follower), and diff the crossings against the rules' own alert streams, found by id; a
  new crossing waits, like alerts on what is missing, until the trial's records have settled
  (protocol ``entry``): a backlog entered patient by patient can cross a rule for a moment and
  uncross it with the next patient, which would be an urgent mail and a withdrawal for nothing;
- each patient is evaluated behind a bulkhead (a savepoint): one whose evaluation raises is set
  aside with its own failure row and an urgent alert, and everybody else goes on; the rules name
  the patients they could not count. An outage of the store is not a patient's fault: it fails
  the whole batch, which is retried;
- evaluations of one patient are serialised across workers (a PostgreSQL advisory lock taken in
  subject order, so two batches never wait on each other in a circle).
Seeing the same event twice, or replaying all of them, therefore appends nothing new.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.safety import read_model_rows
from services.safety.domain.reconcile import Append, plan
from services.safety.domain.set_aside import evaluation_failed_alert, printable
from shared.alert_log import fold_alerts
from shared.clinical.patient import PatientState, fold_patient
from shared.clinical.stopping import RuleInput, crossing_alert, evaluate_inputs, rule_inputs
from shared.events import ALERT_TYPES, PATIENT_ENROLLED, StoredEvent, alert_id_for, alert_stream, patient_stream
from shared.patients import PATIENT_TYPES, read_rule_inputs, rule_input_of, set_aside_subjects
from shared.protocol import Protocol
from shared.store import eventstore
from shared.store.engine import reader
from shared.store.eventstore import utc
from shared.store.outage import is_outage
from shared.store.tables import due_checks, events, patient_failures, patient_projection, stopping_rule_state
from shared.store.tables import rule_inputs as rule_inputs_table
from shared.store.upsert import upsert, upsert_many, upsert_returning

log = logging.getLogger(__name__)

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


def _causes(batch: Sequence[StoredEvent]) -> dict[str, StoredEvent | None]:
    """Each patient the batch names, with its latest event there."""
    return {e.subject_id: e for e in batch if e.type in PATIENT_TYPES and e.subject_id is not None}


def _event_id(event: StoredEvent | None) -> uuid.UUID | None:
    return event.event_id if event is not None else None


def _latest(events: Iterable[StoredEvent]) -> StoredEvent | None:
    return max(events, key=lambda e: e.position, default=None)


def _lock_key(subject_id: str) -> int:
    return int.from_bytes(hashlib.sha256(subject_id.encode()).digest()[:8], "big", signed=True)


async def lock_patients(conn: AsyncConnection, subjects: Iterable[str]) -> None:
    """Take the patients' evaluation locks (PostgreSQL advisory locks, held to the end of the
    transaction) at once and in one order, before anything else: every transaction that evaluates
    patients and then appends (which takes the chain head) takes them so, so none waits on
    another in a circle. SQLite serialises writers anyway."""
    keys = sorted({_lock_key(s) for s in subjects})
    if keys and conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS k"),
                           {"keys": keys})


@dataclass
class Known:
    """One patient's events as read in bulk: its stream, and the alerts about it."""

    history: list[StoredEvent] = field(default_factory=list)
    alerts: list[StoredEvent] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    """What one patient's evaluation writes: alert appends, its projection, its next due moment,
    its rows for the stopping rules."""

    subject_id: str
    appends: list[Append]
    projection: dict[str, Any]
    due: datetime | None
    rule_rows: list[RuleInput]


@dataclass(frozen=True)
class Ahead:
    """Patients decided from a snapshot before the batch's write transaction (``decide_ahead``).

    ``seen``: the last position the snapshot held; ``decisions``: each patient's cause (the event
    id its decision answers, None for none) and decision. One holds while the patient has no event
    after ``seen``: its decision is then the one a read inside the transaction would make.
    """

    seen: int
    decisions: dict[str, tuple[uuid.UUID | None, Decision | None]]


async def read_known(conn: AsyncConnection, subjects: Sequence[str]) -> dict[str, Known]:
    """Each patient's stream and the alerts about it, read for all of them at once."""
    histories = await eventstore.read_streams(conn, [patient_stream(s) for s in subjects])
    alerts = await eventstore.read_types_of(conn, ALERT_TYPES, subjects)
    return {s: Known(histories[patient_stream(s)], alerts[s]) for s in subjects}


def _in_utc(row: RuleInput) -> RuleInput:
    return RuleInput(row.rule_id, row.subject_id, row.arm, row.event, row.evaluable_at.astimezone(UTC),
                     row.counts_from.astimezone(UTC) if row.counts_from else None)


class SafetyMonitor:
    def __init__(self, engine: AsyncEngine, protocol: Protocol, clock: Callable[[], datetime]) -> None:
        self.engine, self.protocol, self.clock = engine, protocol, clock
        self.reads = reader(engine)

    # --- entries -----------------------------------------------------------------------------
    async def on_batch(self, conn: AsyncConnection, batch: Sequence[StoredEvent], *,
                       ahead: Ahead | None = None) -> StoredEvent | None:
        """Consumer entry: evaluate each patient the batch names once, its latest event as the
        cause. The cause of the last change in what a patient gives the stopping rules, if any
        changed (the rules must look again, and a withdrawal then says why). ``ahead``: what
        ``decide_ahead`` decided for this batch before its transaction."""
        causes = _causes(batch)
        await lock_patients(conn, causes)
        moved = await self.evaluate_all(conn, causes, ahead=ahead)
        return _latest(e for s in moved if (e := causes[s]) is not None)

    async def decide_ahead(self, batch: Sequence[StoredEvent]) -> Ahead | None:
        """On SQLite, decide the batch's patients from a snapshot, before its write transaction.

        SQLite has one write lock, and the batch's transaction takes it as it begins: reading and
        folding fifty patients inside it held the lock for tens of milliseconds a batch, while the
        ingest's commits and the notifier's claims waited (at 250 events/s the safety service held
        it about half the time). A read begins deferred and waits for nobody; inside the
        transaction ``evaluate_many`` then only checks that no patient has an event the snapshot
        did not hold, and decides again, under the lock, the few that do. PostgreSQL reads inside
        the transaction: it locks patients, not the store, so nothing waits there. None: nothing
        decided ahead (a patient whose decision raises is decided, and set aside, in the transaction).
        """
        causes = _causes(batch)
        if self.engine.dialect.name != "sqlite" or not causes:
            return None
        subjects = sorted(causes)
        try:
            async with self.reads.connect() as conn:  # one snapshot: the position and the reads agree
                seen = int(await conn.scalar(select(func.max(events.c.position))) or 0)
                known = await read_known(conn, subjects)
        except Exception:  # a record that cannot be read, or the store out: the transaction meets it
            log.debug("safety: deciding ahead failed; the batch is decided in its transaction", exc_info=True)
            return None
        decisions: dict[str, tuple[uuid.UUID | None, Decision | None]] = {}
        for subject_id in subjects:
            with contextlib.suppress(Exception):
                decisions[subject_id] = (_event_id(causes[subject_id]),
                                         self.decide(known[subject_id], causes[subject_id]))
        return Ahead(seen, decisions)

    async def evaluate_all(self, conn: AsyncConnection, causes: Mapping[str, StoredEvent | None], *,
                           ahead: Ahead | None = None) -> list[str]:
        """Evaluate these patients (locked by the caller), together when their writes go through,
        else one by one behind their bulkheads; those whose rule inputs changed."""
        if len(causes) > 1 or (ahead is not None and causes):
            try:
                async with conn.begin_nested():
                    return await self.evaluate_many(conn, causes, ahead=ahead)
            except Exception as exc:  # somebody's record cannot be written: each behind its own bulkhead
                if is_outage(exc):
                    raise
                log.warning("safety: a batch of %d patients failed together (%s: %s); evaluating them one by one",
                            len(causes), type(exc).__name__, exc)
        return [s for s in sorted(causes) if await self.evaluate_guarded(conn, s, cause=causes[s])]

    async def on_event(self, conn: AsyncConnection, event: StoredEvent) -> None:
        """One event, the patient and then the rules (tests and single-worker callers)."""
        if await self.on_batch(conn, [event]) is not None:
            await self.evaluate_stopping(conn, cause=event)

    async def check(self, subject_id: str | None) -> None:
        """Scheduler entry: time has passed (a due date); re-evaluate in its own transaction."""
        async with self.engine.begin() as conn:
            if subject_id is not None:
                await lock_patients(conn, [subject_id])
                await self.evaluate_guarded(conn, subject_id)
            await self.evaluate_stopping(conn)

    async def sweep(self) -> int:
        """Re-evaluate every enrolled patient, in batches, then the rules once (start-up and
        ``trialwatch replay``: catches whatever fell due while nothing ran). A patient that cannot
        be evaluated is set aside; the sweep goes on."""
        async with self.engine.connect() as conn:
            subjects = (await conn.execute(
                select(events.c.subject_id).where(events.c.type == PATIENT_ENROLLED).order_by(events.c.position)
            )).scalars().all()
        for begin in range(0, len(subjects), SWEEP_BATCH):
            async with self.engine.begin() as conn:
                await lock_patients(conn, subjects[begin:begin + SWEEP_BATCH])
                await self.evaluate_all(conn, dict.fromkeys(subjects[begin:begin + SWEEP_BATCH]))
        await self.check(None)
        return len(subjects)

    async def replay(self, *, progress: Callable[[int, int], None] | None = None, processes: int | None = None) -> int:
        """Rebuild every patient's read model from one pass over the log (services/safety/replay.py)."""
        from services.safety.replay import replay  # it builds on this module

        return await replay(self, progress, processes=processes)

    # --- one patient ---------------------------------------------------------------------------
    async def evaluate_guarded(self, conn: AsyncConnection, subject_id: str, *,
                               cause: StoredEvent | None = None, known: Known | None = None) -> bool:
        """Evaluate one patient behind its bulkhead; True if the rules must look again. The caller
        holds the patient's lock (``lock_patients``, taken with the others of its transaction)."""
        try:
            async with conn.begin_nested():
                changed = await self.evaluate_subject(conn, subject_id, cause=cause, known=known)
        except Exception as exc:
            if is_outage(exc):
                raise
            log.exception("safety: patient %s set aside: its evaluation failed", subject_id)
            await self._set_aside(conn, subject_id, f"{type(exc).__name__}: {exc}")
            return True
        recovered = await conn.execute(delete(patient_failures).where(patient_failures.c.subject_id == subject_id))
        return changed or bool(recovered.rowcount)

    async def evaluate_subject(self, conn: AsyncConnection, subject_id: str, *,
                               cause: StoredEvent | None = None, known: Known | None = None) -> bool:
        """Fold, reconcile the patient's alerts, write its read model; True if its rule inputs changed.
        ``known``: the patient's stream and alert events when the caller read them already (replay)."""
        if known is None:
            known = (await read_known(conn, [subject_id]))[subject_id]
        decision = self.decide(known, cause)
        if decision is None:
            return False
        await self._append(conn, decision.appends)
        await upsert(conn, patient_projection, decision.projection, ["subject_id"])
        await self._due(conn, subject_id, decision.due)
        return await self._write_rule_inputs(conn, subject_id, decision.rule_rows)

    async def evaluate_many(self, conn: AsyncConnection, causes: Mapping[str, StoredEvent | None], *,
                            ahead: Ahead | None = None) -> list[str]:
        """``evaluate_guarded`` of several patients in a few statements: their streams and alerts
        read at once, each decided (one whose decision raises is set aside), the decisions
        written together. The patients whose rule inputs changed. A write that fails fails them
        all (the caller then takes them one by one, each behind its savepoint). Patients
        ``ahead`` decided, and nothing happened to since, are not read or decided again."""
        subjects = sorted(causes)
        decided = await self._still_decided(conn, ahead, causes)
        unread = [s for s in subjects if s not in decided]
        known = await read_known(conn, unread)
        decisions: list[Decision] = []
        moved: list[str] = []
        for subject_id in subjects:
            try:
                decision = (decided[subject_id] if subject_id in decided
                            else self.decide(known[subject_id], causes[subject_id]))
            except Exception as exc:
                log.exception("safety: patient %s set aside: its evaluation failed", subject_id)
                await self._set_aside(conn, subject_id, f"{type(exc).__name__}: {exc}")
                moved.append(subject_id)
                continue
            if decision is not None:
                decisions.append(decision)
        failed = set(moved)
        recovered = set((await conn.execute(
            delete(patient_failures).where(patient_failures.c.subject_id.in_([s for s in subjects if s not in failed]))
            .returning(patient_failures.c.subject_id))).scalars())
        await self._append(conn, [a for d in decisions for a in d.appends])
        await upsert_many(conn, patient_projection, [d.projection for d in decisions], ["subject_id"])
        await upsert_many(conn, due_checks, [
            {"subject_id": d.subject_id, "check": "next", "due_at": d.due.astimezone(UTC), "done": False}
            for d in decisions if d.due is not None], ["subject_id", "check"])
        undue = [d.subject_id for d in decisions if d.due is None]
        if undue:
            await conn.execute(delete(due_checks).where(due_checks.c.subject_id.in_(undue)))
        changed = await self._write_many_rule_inputs(conn, {d.subject_id: d.rule_rows for d in decisions})
        return sorted(failed | recovered | changed)

    async def _still_decided(self, conn: AsyncConnection, ahead: Ahead | None,
                             causes: Mapping[str, StoredEvent | None]) -> dict[str, Decision | None]:
        """The decisions of ``ahead`` that still hold: made for the same cause, and no event of
        the patient (in its stream or about it) appended after the snapshot."""
        if ahead is None:
            return {}
        same = {s: decision for s, (cause_id, decision) in ahead.decisions.items()
                if s in causes and cause_id == _event_id(causes[s])}
        if not same:
            return {}
        streams = {patient_stream(s): s for s in same}
        later = await conn.execute(select(events.c.subject_id, events.c.stream_id).where(
            events.c.position > ahead.seen,
            or_(events.c.subject_id.in_(list(same)), events.c.stream_id.in_(list(streams)))))
        for subject_id, stream_id in later:
            same.pop(subject_id, None)
            same.pop(streams.get(stream_id, ""), None)
        return same

    async def _write_many_rule_inputs(self, conn: AsyncConnection, wanted: dict[str, list[RuleInput]]) -> set[str]:
        """``_write_rule_inputs`` of several patients: the stored rows read at once, only those
        that differ replaced. The patients whose rows changed."""
        table = rule_inputs_table
        stored: dict[str, set[RuleInput]] = {s: set() for s in wanted}
        for row in await conn.execute(select(table).where(table.c.subject_id.in_(list(wanted)))):
            stored[row.subject_id].add(rule_input_of(row))
        changed = {s for s, rows in wanted.items() if stored[s] != set(rows)}
        if changed:
            await conn.execute(delete(table).where(table.c.subject_id.in_(sorted(changed))))
            rows = [vars(r) for s in sorted(changed) for r in set(wanted[s])]
            if rows:
                await conn.execute(insert(table), rows)
        return changed

    def decide(self, known: Known, cause: StoredEvent | None = None) -> Decision | None:
        """What one patient's evaluation writes (pure: the store is not touched); None if not enrolled."""
        history = known.history
        if not any(e.type == PATIENT_ENROLLED for e in history):
            return None
        now = self.clock()
        state = fold_patient(history, self.protocol, now=now)
        existing = {k: v for k, v in fold_alerts(known.alerts).items() if v.kind != STOPPING_KIND}
        appends = plan(state.desired_alerts(), existing, now=now, withdraw_reason=withdraw_reason(cause),
                       causation=cause.event_id if cause else None, held=state.held_alert_ids())
        public = state.public()
        projection = {"subject_id": state.subject_id, "site_id": public["site_id"], "state": public,
                      "last_position": history[-1].position, "updated_at": now,
                      "last_recorded_at": max(e.recorded_at for e in history)}
        return Decision(state.subject_id, appends, projection, next_moment(state),
                        [_in_utc(r) for r in rule_inputs(self.protocol, state)])

    async def write_many(self, conn: AsyncConnection, decisions: list[Decision]) -> None:
        """Many patients' decisions in a few statements (replay): their old rows go, the new come."""
        await self._append(conn, [a for d in decisions for a in d.appends])
        await read_model_rows.replace(conn, read_model_rows.Rows(
            subjects=[d.subject_id for d in decisions],
            projections=[d.projection for d in decisions],
            due=[{"subject_id": d.subject_id, "check": "next", "due_at": d.due.astimezone(UTC), "done": False}
                 for d in decisions if d.due is not None],
            rule_inputs=[vars(r) for d in decisions for r in d.rule_rows]))

    async def _write_rule_inputs(self, conn: AsyncConnection, subject_id: str, rows: list[RuleInput]) -> bool:
        table = rule_inputs_table
        stored = {rule_input_of(r) for r in await conn.execute(select(table).where(table.c.subject_id == subject_id))}
        wanted = set(rows)
        if stored == wanted:
            return False
        await conn.execute(delete(table).where(table.c.subject_id == subject_id))
        if wanted:
            await conn.execute(insert(table), [vars(r) for r in wanted])
        return True

    async def _set_aside(self, conn: AsyncConnection, subject_id: str, error: str) -> None:
        """Record the failure and raise the patient's urgent 'cannot be evaluated' alert, once."""
        now, error = self.clock(), printable(error, 4000)
        await upsert_returning(conn, patient_failures, {
            "subject_id": subject_id, "error": error, "failures": 1, "failed_at": now,
        }, keys=("subject_id",), increment="failures")
        await self._due(conn, subject_id, None)  # not monitored until the record changes
        alert = evaluation_failed_alert(subject_id, await self._site_of(conn, subject_id), error)
        views = fold_alerts(await eventstore.read_stream(conn, alert_stream(alert.alert_id)))
        await self._append(conn, plan([alert], views, now=now, withdraw_reason=""))

    async def _site_of(self, conn: AsyncConnection, subject_id: str) -> str | None:
        site = await conn.scalar(select(patient_projection.c.site_id).where(patient_projection.c.subject_id == subject_id))
        return printable(site, 32) if site else None

    async def _due(self, conn: AsyncConnection, subject_id: str, due: datetime | None) -> None:
        if due is None:
            await conn.execute(delete(due_checks).where(due_checks.c.subject_id == subject_id))
        else:
            # In UTC: SQLite keeps no offset, and times are read back as UTC (eventstore.utc).
            await upsert(conn, due_checks, {"subject_id": subject_id, "check": "next", "due_at": due.astimezone(UTC),
                                            "done": False}, ["subject_id", "check"])

    # --- the trial -------------------------------------------------------------------------------
    async def evaluate_stopping(self, conn: AsyncConnection, *, cause: StoredEvent | None = None) -> None:
        """Diff the rules' crossings, over the patients' rule inputs, against the rules' alerts. A
        new crossing is held back while the trial's records have not settled; it is then checked
        again when they will have (the latest-recorded patient's due check is brought forward)."""
        now = self.clock()
        statuses = evaluate_inputs(self.protocol, await read_rule_inputs(conn, now),
                                   now=now, uncounted=await set_aside_subjects(conn))
        desired = [crossing_alert(self.protocol, s) for s in statuses if s.crossed]
        existing = await stopping_alerts(conn, self.protocol)
        latest = (await conn.execute(
            select(patient_projection.c.subject_id, patient_projection.c.last_recorded_at)
            .where(patient_projection.c.last_recorded_at.is_not(None))
            .order_by(patient_projection.c.last_recorded_at.desc()).limit(1))).first()
        settled_at = utc(latest.last_recorded_at) + timedelta(seconds=self.protocol.entry.settle_seconds) if latest else None
        settling = settled_at is not None and now < settled_at
        held = frozenset(a.alert_id for a in desired
                         if settling and not (a.alert_id in existing and existing[a.alert_id].is_open))
        await self._append(conn, plan(desired, existing, now=now,
                                      withdraw_reason=withdraw_reason(cause),
                                      causation=cause.event_id if cause else None, held=held))
        for status in statuses:
            await upsert(conn, stopping_rule_state, {
                "rule_id": status.rule.id, "state": status.public(), "updated_at": now,
            }, ["rule_id"])
        if held and latest is not None and settled_at is not None:  # look again once they have settled
            current = await conn.scalar(select(due_checks.c.due_at).where(due_checks.c.subject_id == latest.subject_id))
            await self._due(conn, latest.subject_id, settled_at if current is None else min(utc(current), settled_at))

    async def _append(self, conn: AsyncConnection, appends: list[Append]) -> None:
        for item in appends:
            await eventstore.append(conn, item.stream_id, [item.event], expected_version=item.expected_version)


SWEEP_BATCH = 100


async def stopping_alerts(conn: AsyncConnection, protocol: Protocol) -> dict:  # type: ignore[type-arg]
    """The rules' own alerts, found by their ids (one stream each), not by reading every alert."""
    streams = [alert_stream(alert_id_for("stopping", protocol.trial.id, rule.id)) for rule in protocol.stopping_rules]
    found = [e for stream in streams for e in await eventstore.read_stream(conn, stream)]
    return {k: v for k, v in fold_alerts(found).items() if v.kind == STOPPING_KIND}

