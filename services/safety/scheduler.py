"""Due checks on APScheduler: each patient's next "time alone changes something" moment.

The jobs live in memory and are rebuilt at start from the ``due_checks`` rows the monitor keeps
beside each patient's projection (plus one sweep of every patient, which also catches a due date
that passed while the service was down). A check re-evaluates the patient; alert ids are
deterministic, so a check that runs twice raises nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.store.eventstore import utc
from shared.store.tables import due_checks

log = logging.getLogger(__name__)


class DueChecks:
    def __init__(self, engine: AsyncEngine, check: Callable[[str | None], Awaitable[None]],
                 clock: Callable[[], datetime]) -> None:
        self.engine, self._check, self.clock = engine, check, clock
        self.scheduler = AsyncIOScheduler(timezone="UTC")

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def schedule(self, subject_id: str, due_at: datetime) -> None:
        # APScheduler waits on the wall clock; ``due_at`` is on ours: hand it the delay, not the moment.
        delay = max(due_at - self.clock(), timedelta(0))
        self.scheduler.add_job(
            self._run, trigger=DateTrigger(run_date=datetime.now(UTC) + delay), args=[subject_id],
            id=f"due:{subject_id}", replace_existing=True, misfire_grace_time=None, coalesce=True,
        )

    async def rebuild(self) -> int:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(due_checks.c.subject_id, due_checks.c.due_at))).all()
        for row in rows:
            self.schedule(row.subject_id, utc(row.due_at))
        return len(rows)

    async def _run(self, subject_id: str) -> None:
        try:
            await self._check(subject_id)
        except Exception:
            log.exception("due check for %s failed; retrying in 30 s", subject_id)
            self.schedule(subject_id, self.clock() + timedelta(seconds=30))
            return
        await self.reschedule(subject_id)

    async def reschedule(self, subject_id: str) -> None:
        async with self.engine.connect() as conn:
            due = await conn.scalar(select(due_checks.c.due_at).where(due_checks.c.subject_id == subject_id))
        if due is not None:
            self.schedule(subject_id, utc(due))
        elif self.scheduler.get_job(f"due:{subject_id}"):
            self.scheduler.remove_job(f"due:{subject_id}")
