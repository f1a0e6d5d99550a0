"""The trial's follower: the stopping rules and the due checks, run by exactly one safety worker.

Patients are evaluated by whichever worker fetches their events (any number of workers share the
durable consumer). What needs one place is held by a lease in the database (``leases``):
- the stopping rules, a follower of what the patients' evaluations recorded (``rule_inputs``):
  evaluated whenever ``rule_inputs_version`` has moved, i.e. some patient's inputs changed;
- the due checks (``due_checks`` rows): each patient's next "time alone changes something"
  moment, and a held crossing's moment to look again, polled on the clock the monitor uses;
- the start-up sweep of every patient, when the lease is taken (what fell due while nobody ran).
The holder renews the lease while it runs; when it dies another worker takes over once the lease
has expired, sweeps, and goes on. Evaluations are idempotent, so an overlap costs nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.safety.handlers import SafetyMonitor, lock_patients
from shared.events import StoredEvent
from shared.store import eventstore
from shared.store.engine import reader
from shared.store.eventstore import now_utc
from shared.store.tables import due_checks, leases, rule_inputs_version
from shared.store.upsert import upsert_returning

log = logging.getLogger(__name__)

RULES_LEASE = "safety-trial-follower"


class Lease:
    """A named lease in the database, on the wall clock (not the monitor's: leases are plumbing)."""

    def __init__(self, engine: AsyncEngine, name: str, *, ttl: timedelta = timedelta(seconds=5),
                 holder: str | None = None) -> None:
        self.engine, self.name, self.ttl = engine, name, ttl
        # Host and process id first: an operator (and a test) can tell which worker leads.
        self.holder = holder or f"safety-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._until: datetime | None = None

    async def hold(self) -> bool:
        """Take or renew the lease; True while this worker holds it."""
        now = now_utc()
        if self._until is not None and self._until - now > self.ttl / 2:
            return True
        until = now + self.ttl
        async with self.engine.begin() as conn:
            taken = await conn.execute(update(leases).where(
                leases.c.name == self.name, or_(leases.c.holder == self.holder, leases.c.expires_at < now),
            ).values(holder=self.holder, expires_at=until))
            if not taken.rowcount:
                try:
                    async with conn.begin_nested():
                        await conn.execute(insert(leases).values(name=self.name, holder=self.holder, expires_at=until))
                except IntegrityError:  # somebody else holds it
                    self._until = None
                    return False
        self._until = until
        return True

    async def release(self) -> None:
        if self._until is None:
            return
        self._until = None
        async with self.engine.begin() as conn:
            await conn.execute(update(leases).where(leases.c.name == self.name, leases.c.holder == self.holder)
                               .values(expires_at=now_utc()))


async def bump_rule_inputs(conn: AsyncConnection, cause: StoredEvent) -> None:
    """Some patient's rule inputs changed (in ``conn``'s transaction), because of ``cause``: the
    rules look again, and a crossing they withdraw says why."""
    await upsert_returning(conn, rule_inputs_version, {"id": 1, "version": 1, "cause_event_id": str(cause.event_id)},
                           keys=("id",), increment="version")


async def rule_inputs_seen(conn: AsyncConnection) -> tuple[int, StoredEvent | None]:
    """The rule inputs' version and the event behind its last move."""
    row = (await conn.execute(select(rule_inputs_version).where(rule_inputs_version.c.id == 1))).first()
    if row is None:
        return 0, None
    cause = await eventstore.get_event(conn, row.cause_event_id) if row.cause_event_id else None
    return int(row.version), cause


DUE_BATCH = 200


# How often, at most, the follower looks (the rules and the due checks), on either store. A look
# reads every patient's rule inputs, so under a stream of batches it costs per look, not per
# event: looking four times a second was about 5 % of the safety service's CPU at 250 events/s on
# PostgreSQL (py-spy, 2026-12-01). On SQLite a look also holds the store's one write lock while the
# API's commits, the patients' batches and the notifier's claims wait (with 1,000 patients at 250
# events/s a look held it 14 ms at the median and 100 ms at p99). A new crossing waits for the
# records to settle (5 s) anyway, and a due check is a moment of the clinical calendar, not of
# the second hand.
LOOK_INTERVAL_S = 1.0


class TrialFollower:
    def __init__(self, engine: AsyncEngine, monitor: SafetyMonitor, lease: Lease, *,
                 after: Callable[[], None] = lambda: None, interval: float = LOOK_INTERVAL_S) -> None:
        self.engine, self.monitor, self.lease, self.after, self.interval = engine, monitor, lease, after, interval
        self.reads = reader(engine)
        self._wake = asyncio.Event()
        self._seen: int | None = None  # the rule-input version the rules were last evaluated at

    def poke(self) -> None:
        self._wake.set()

    async def lead(self) -> bool:
        """Take the lease if free; on taking it, sweep every patient first. True while leading."""
        was_leading = self._seen is not None
        if not await self.lease.hold():
            self._seen = None
            return False
        if not was_leading:
            log.info("safety: %s follows the trial (stopping rules, due checks)", self.lease.holder)
            async with self.reads.connect() as conn:
                seen, _ = await rule_inputs_seen(conn)
            await self.monitor.sweep()
            self._seen = seen
            self.after()
        return True

    async def step(self) -> bool:
        """Run what has fallen due and the rules if any input moved; True if anything ran."""
        now = self.monitor.clock()
        async with self.reads.connect() as conn:
            due = list((await conn.execute(select(due_checks.c.subject_id).where(due_checks.c.due_at <= now)
                                           .order_by(due_checks.c.due_at).limit(DUE_BATCH))).scalars())
            version, cause = await rule_inputs_seen(conn)
        if not due and version == self._seen:
            return False
        async with self.engine.begin() as conn:
            await lock_patients(conn, due)
            await self.monitor.evaluate_all(conn, dict.fromkeys(sorted(set(due))))
            await self.monitor.evaluate_stopping(conn, cause=cause if version != self._seen else None)
        self._seen = version
        self.after()
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Step on every poke and every ``interval``, but at most once an ``interval``: the rules
        read every patient's inputs, so under a stream of batches they look once an interval,
        not once a batch (a crossing waits for the records to settle anyway, seconds longer)."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            began = loop.time()
            try:
                if await self.lead():
                    await self.step()
            except Exception:  # the store is out, or a bug: say so and keep following
                log.exception("safety: the trial follower failed; trying again")
                await asyncio.sleep(1.0)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            except TimeoutError:
                pass
            if not stop.is_set():
                await asyncio.sleep(max(0.0, began + self.interval - loop.time()))
        await self.lease.release()
