"""``trialwatch replay``: every patient's read model rebuilt from one pass over the log.

- The patients' and the alerts' events are read once, in (subject, position) order
  (shared/store/subject_scan.py), and each patient is decided (``SafetyMonitor.decide``, pure) as
  soon as its rows are in: nothing waits for the whole log, nothing holds it.
- ``BATCH`` patients are written in one transaction (``SafetyMonitor.write_many``); while one
  batch is being written the next is decided (the store works while this process folds).
- A patient whose rows do not decode or fold is set aside, as the consumer sets it aside; a
  batch whose writes fail is evaluated again patient by patient, each behind its bulkhead; an
  outage of the store stops the replay (run it again).
- On PostgreSQL, with a second core and at least ``MIN_FOR_TWO`` patients, the patients are
  split in ``SHARES`` ranges by subject id; this process replays them from the first, a forked
  second process from the last, the same way, on connections of its own (replay_fork.py), until
  they meet: the fold is pure Python, and one process folds more slowly than the store reads. If
  the second process fails, this one replays the shares it had taken.
- Then the stopping rules, once. ``progress(done, total)`` is told after each transaction (of
  this process; the second process's patients when it has finished).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sqlalchemy import distinct, func, select

from services.safety import replay_fork
from services.safety.handlers import Decision, Known, SafetyMonitor, lock_patients
from shared.events import ALERT_TYPES, PATIENT_ENROLLED
from shared.patients import PATIENT_TYPES
from shared.store import subject_scan
from shared.store.outage import is_outage
from shared.store.tables import events

log = logging.getLogger(__name__)

BATCH = 500  # patients per transaction (their rows are written a statement or two per table)
TYPE = subject_scan.COLUMNS.index("type")


@dataclass
class Batch:
    """Patients decided and not yet written: their decisions, and the errors of those set aside."""

    subjects: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


async def replay(monitor: SafetyMonitor, progress: Callable[[int, int], None] | None = None, *,
                 processes: int | None = None) -> int:
    """Rebuild every enrolled patient's read model, then evaluate the rules; how many patients.
    ``processes``: 2 to share the patients with a second process (PostgreSQL; by default when
    the trial is large enough and a second core is there), else 1."""
    total = await _enrolled(monitor)
    told = _Told(progress, total)
    with _collector_on_new_objects_only():
        shares: list[Share] = await _shares(monitor) if _two_processes(monitor, total, processes) else [(None, None)]
        if len(shares) == 1:
            done = await replay_subjects(monitor, shares[0], told)
        else:
            claims = replay_fork.Claims(len(shares))
            later = replay_fork.start(monitor, lambda forked: _claimed(forked, shares, claims.from_back, None))
            try:
                done = await _claimed(monitor, shares, claims.from_front, told)
            except BaseException:  # an outage, an interruption: the second process stops too
                later.stop()
                raise
            forked = await later.result()
            if forked is None:  # it did not finish: its shares again, here (replaying is idempotent)
                log.error("replay: the second process failed; replaying its patients here")
                for share in claims.taken_from_back():
                    done += await replay_subjects(monitor, shares[share], told)
            else:
                done += forked
                told.add(forked)
    await monitor.check(None)
    return done


async def replay_subjects(monitor: SafetyMonitor, subjects: tuple[str | None, str | None], told: _Told | None) -> int:
    """Rebuild the read models of the enrolled patients of ``subjects`` (subject_scan.by_subject)."""
    done = 0
    writing: asyncio.Task[int] | None = None
    batch = Batch()
    try:
        async with contextlib.aclosing(subject_scan.by_subject(monitor.engine, PATIENT_TYPES | ALERT_TYPES,
                                                               subjects=subjects)) as scan:
            async for subject_id, rows in scan:
                if not any(row[TYPE] == PATIENT_ENROLLED for row in rows):
                    continue
                _decide(monitor, batch, subject_id, rows)
                if len(batch.subjects) == BATCH:
                    done += await _written(writing, told)
                    writing, batch = asyncio.create_task(_write(monitor, batch)), Batch()
                await asyncio.sleep(0)  # the batch being written goes on meanwhile
        done += await _written(writing, told)
        writing = None
        if batch.subjects:
            done += await _written(asyncio.create_task(_write(monitor, batch)), told)
    finally:
        if writing is not None and not writing.done():
            writing.cancel()
            with contextlib.suppress(BaseException):
                await writing
    return done


def known_of(rows: subject_scan.Rows) -> Known:
    """One patient's rows as ``subject_scan`` read them, decoded: its stream and its alerts."""
    known = Known()
    for row in rows:
        event = subject_scan.decode(row)
        (known.alerts if event.type in ALERT_TYPES else known.history).append(event)
    return known


def _decide(monitor: SafetyMonitor, batch: Batch, subject_id: str, rows: subject_scan.Rows) -> None:
    batch.subjects.append(subject_id)
    try:
        decision = monitor.decide(known_of(rows))
    except Exception as exc:  # the patient's record: set aside when the batch is written
        batch.failed[subject_id] = f"{type(exc).__name__}: {exc}"
        return
    if decision is not None:
        batch.decisions.append(decision)


async def _write(monitor: SafetyMonitor, batch: Batch) -> int:
    """One transaction for the batch; if it fails (not an outage), each patient again on its own."""
    try:
        async with monitor.engine.begin() as conn:
            await lock_patients(conn, batch.subjects)
            await monitor.write_many(conn, batch.decisions)
            for subject_id, error in batch.failed.items():
                log.error("safety: patient %s set aside: its evaluation failed (%s)", subject_id, error)
                await monitor._set_aside(conn, subject_id, error)
    except Exception as exc:  # one of them cannot be written: each behind its bulkhead
        if is_outage(exc):
            raise
        async with monitor.engine.begin() as conn:
            await lock_patients(conn, batch.subjects)
            for subject_id in sorted(batch.subjects):
                await monitor.evaluate_guarded(conn, subject_id)
    return len(batch.subjects)


@dataclass
class _Told:
    """The progress callback, told (done, total) after each transaction of this process."""

    progress: Callable[[int, int], None] | None
    total: int
    done: int = 0

    def add(self, count: int) -> None:
        self.done += count
        if self.progress is not None:
            self.progress(self.done, max(self.done, self.total))


async def _written(writing: asyncio.Task[int] | None, told: _Told | None) -> int:
    """Wait for the batch being written (if any); tell the progress; how many it held."""
    if writing is None:
        return 0
    count = await writing
    if told is not None:
        told.add(count)
    return count


MIN_FOR_TWO = 1000  # patients: below, a second process's start costs more than it saves


def _two_processes(monitor: SafetyMonitor, total: int, processes: int | None) -> bool:
    if monitor.engine.dialect.name != "postgresql" or not replay_fork.available():
        return False  # SQLite has one writer at a time
    if processes is not None:
        return processes > 1 and total > 1
    return total >= MIN_FOR_TWO and replay_fork.cores() > 1


Share = tuple[str | None, str | None]  # subject ids from (included), to (excluded); None: no bound
SHARES = 8  # ranges of patients the two processes take in turn, so neither waits long for the other


async def _shares(monitor: SafetyMonitor) -> list[Share]:
    """``SHARES`` ranges of subject ids, about as many enrolled patients in each, covering all."""
    async with monitor.engine.connect() as conn:
        subjects = list((await conn.scalars(select(events.c.subject_id).distinct()
                                            .where(events.c.type == PATIENT_ENROLLED)
                                            .order_by(events.c.subject_id))).all())
    bounds: list[str | None] = [None, *sorted({subjects[len(subjects) * k // SHARES] for k in range(1, SHARES)}), None]
    return list(zip(bounds, bounds[1:], strict=False))


async def _claimed(monitor: SafetyMonitor, shares: list[Share],
                   claim: Callable[[], int | None], told: _Told | None) -> int:
    """Replay the shares ``claim`` hands this process, until none is left."""
    done = 0
    while (share := claim()) is not None:
        done += await replay_subjects(monitor, shares[share], told)
    return done


async def _enrolled(monitor: SafetyMonitor) -> int:
    async with monitor.engine.connect() as conn:
        return int(await conn.scalar(select(func.count(distinct(events.c.subject_id)))
                                     .where(events.c.type == PATIENT_ENROLLED)) or 0)


@contextlib.contextmanager
def _collector_on_new_objects_only() -> Iterator[None]:
    """What exists before the replay (modules, the protocol...) is left out of the collector's
    walks while it runs: a full collection otherwise walks all of it again and again, for
    nothing (about a tenth of a replay's CPU). Put back afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
