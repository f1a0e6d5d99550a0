"""The unit of work: the only place that commits.

It also keeps the command's Idempotency-Key in that transaction: looked up first (a replay
answers from it and runs nothing), written last, beside the events the command appended.

Patient writes (``write``) go through a group commit: one writer task per process takes whatever
is queued, opens one transaction, takes the chain-head lock once, runs each command in arrival
order against one ``Ledger`` (so each sees the ones before it), stores all their events with one
statement per table, commits once, and only then answers each caller. A command that fails its
checks has added nothing (nothing is written before the flush), so it cannot spoil the others; a
failure of the transaction itself (a store error, an Idempotency-Key taken by another process)
rolls the batch back and runs its commands again one transaction each, so only the guilty one fails.

The writer does not take the lock first: the commands are decided against what the ledger reads,
and the flush takes the lock, checks that no stream the batch wrote moved on meanwhile (another
process appended to it) and stores the batch. On PostgreSQL the flush is one statement, and a
batch without Idempotency-Keys is that statement alone, in autocommit (it commits as it returns;
the reads before it need no transaction, the check stands for them); one with keys stores them
with it in one transaction. On SQLite the batch is decided on a read snapshot and stored in a
write transaction of its own, which holds the one write lock for the storing only; a batch with
keys takes the lock first. A stale read writes nothing, and the batch is decided again with the
lock taken first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.ingest.idempotency import Answer, IdempotencyKey, KeyReused, KeyTaken, recall, remember, remember_many
from services.ingest.ledger import Ledger
from shared.store.engine import reader
from shared.store.eventstore import DuplicateEvent, StaleRead

T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_BATCH = 256


@dataclass(eq=False)
class _Job:
    work: Callable[[Ledger], Awaitable[Any]]
    present: Callable[[Any], Answer]
    key: IdempotencyKey | None
    subjects: tuple[str, ...] = ()  # the patients it will look at: read for the whole batch at once
    done: asyncio.Future[Answer] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Decided:
    """A batch's jobs run against its ledger, not yet stored."""

    ledger: Ledger
    now: datetime
    outcomes: dict[_Job, Answer | BaseException]
    results: dict[_Job, Any]
    keys: dict[tuple[str, str], _Job]
    replays: dict[_Job, _Job]


class _Spoilt(Exception):
    """The batch's transaction cannot commit as it stands (the cause is chained)."""


class UnitOfWork:
    def __init__(self, engine: AsyncEngine, clock: Callable[[], datetime],
                 on_commit: Callable[[Answer], None] = lambda answer: None, *, tz: ZoneInfo | None = None) -> None:
        self.engine, self.clock, self.on_commit = engine, clock, on_commit
        self.reads = reader(engine)
        self.tz = tz or ZoneInfo("UTC")
        self._queue: list[_Job] = []
        self._writer: asyncio.Task[None] | None = None

    async def run(self, work: Callable[[AsyncConnection], Awaitable[T]], present: Callable[[T], Answer],
                  key: IdempotencyKey | None = None) -> Answer:
        """Run ``work`` in a transaction of its own and answer ``present(result)``; commit only on success."""
        return await self._retrying(lambda: self._once(work, present, key))

    async def write(self, work: Callable[[Ledger], Awaitable[T]], present: Callable[[T], Answer],
                    key: IdempotencyKey | None = None, *, subjects: tuple[str, ...] = ()) -> Answer:
        """Run ``work`` in the group commit; answers once its transaction is committed. ``subjects``:
        the patients ``work`` reads, fetched for the whole batch in one query."""
        return await self._retrying(lambda: self._submit(_Job(work, present, key, subjects)))

    async def _retrying(self, attempt: Callable[[], Awaitable[Answer]]) -> Answer:
        for _ in range(3):
            try:
                answer = await attempt()
            except KeyTaken:
                continue  # the racing request committed: the next round replays its answer
            if not answer.replayed:
                self.on_commit(answer)
            return answer
        raise RuntimeError("Idempotency-Key raced three times")

    async def _once(self, work: Callable[[AsyncConnection], Awaitable[T]], present: Callable[[T], Answer],
                    key: IdempotencyKey | None) -> Answer:
        async with self.engine.begin() as conn:
            if key is not None and (earlier := await recall(conn, key, self.clock())) is not None:
                return earlier
            answer = present(await work(conn))
            if key is not None:
                await remember(conn, key, answer, self.clock())
            return answer

    # --- the group commit -----------------------------------------------------------------

    async def _submit(self, job: _Job) -> Answer:
        self._queue.append(job)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="group-commit")
        return await job.done

    async def _drain(self) -> None:
        """The writer: batches until the queue is empty, then it ends (the next submit starts one)."""
        while self._queue:
            jobs, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                await self._commit(jobs)
            except BaseException as exc:  # never leave a caller waiting
                for job in jobs:
                    if not job.done.done():
                        job.done.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                if not isinstance(exc, Exception):
                    raise

    async def _commit(self, jobs: list[_Job], *, reconnected: bool = False, lock_first: bool = False) -> None:
        try:
            try:
                outcomes = await self._transaction(jobs, lock_first=lock_first)
            except StaleRead:  # another process appended to a stream this batch read: nothing written
                outcomes = await self._transaction(jobs, lock_first=True)
        except _SPOILT_OR_STORE as exc:
            cause = exc.__cause__ if isinstance(exc, _Spoilt) and exc.__cause__ else exc
            if isinstance(cause, DBAPIError) and cause.connection_invalidated and not reconnected:
                # A connection the server had dropped (it restarted): the pool is emptied, try again once.
                await self._commit(jobs, reconnected=True)
                return
            if len(jobs) > 1:  # find the one that spoilt it: each alone
                for job in jobs:
                    await self._commit([job], reconnected=reconnected)
                return
            outcomes = {jobs[0]: cause}
        for job, outcome in outcomes.items():  # after the commit: the answer is durable
            if job.done.done():
                continue  # the caller went away
            if isinstance(outcome, BaseException):
                job.done.set_exception(outcome)
            else:
                job.done.set_result(outcome)

    async def _transaction(self, jobs: list[_Job], *, lock_first: bool) -> dict[_Job, Answer | BaseException]:
        postgres = self.engine.dialect.name == "postgresql"
        if lock_first or any(job.key for job in jobs):  # keys are looked up and kept in one transaction
            async with self.engine.begin() as conn:  # PostgreSQL still decides before its flush takes the lock
                return await self._decide_and_store(conn, jobs, lock_first=lock_first or not postgres,
                                                    autocommit=False)
        if postgres:
            async with self.engine.connect() as conn:  # one statement stores it all: it commits as it returns
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                return await self._decide_and_store(conn, jobs, lock_first=False, autocommit=True)
        # SQLite: decided on a read snapshot, which waits for no writer, then stored in a write
        # transaction of its own that holds the one write lock for the storing only (deciding
        # inside it held the lock about 14 ms a batch at 250 requests/s, the biggest share of
        # the lock's time, while the safety service and the notifier waited).
        async with self.reads.connect() as conn:
            decided = await self._decide(conn, jobs, lock_first=False)
        async with self.engine.begin() as conn:
            return await self._store(conn, decided, autocommit=False)

    async def _decide_and_store(self, conn: AsyncConnection, jobs: list[_Job], *,
                                lock_first: bool, autocommit: bool) -> dict[_Job, Answer | BaseException]:
        """Run the jobs against one ledger, store what they appended, and only then present their
        results (on PostgreSQL the server numbers the events as it stores them)."""
        return await self._store(conn, await self._decide(conn, jobs, lock_first=lock_first), autocommit=autocommit)

    async def _decide(self, conn: AsyncConnection, jobs: list[_Job], *, lock_first: bool) -> _Decided:
        """Run each job against one ledger (each sees the ones before it); nothing is stored yet."""
        outcomes: dict[_Job, Answer | BaseException] = {}
        results: dict[_Job, Any] = {}
        keys: dict[tuple[str, str], _Job] = {}
        replays: dict[_Job, _Job] = {}  # a key seen earlier in this batch: the answer of that job
        now = self.clock()
        ledger = await Ledger.begin(conn, self.tz, now, lock_first=lock_first)
        await ledger.prefetch({s for job in jobs for s in job.subjects})
        for job in jobs:
            before = ledger.appended
            try:
                if job.key is not None:
                    if (first := self._earlier_in_batch(job.key, keys)) is not None:
                        replays[job] = first
                        continue
                    if (earlier := await recall(conn, job.key, now)) is not None:
                        outcomes[job] = earlier
                        continue
                results[job] = await job.work(ledger)
            except _STORE_ERRORS as exc:
                raise _Spoilt() from exc
            except Exception as exc:
                if ledger.appended != before:
                    raise _Spoilt() from exc
                outcomes[job] = exc
                continue
            if job.key is not None:
                keys[(job.key.key, job.key.token_hash)] = job
        return _Decided(ledger, now, outcomes, results, keys, replays)

    async def _store(self, conn: AsyncConnection, decided: _Decided, *, autocommit: bool) -> dict[_Job, Answer | BaseException]:
        """Store what the jobs appended (through ``conn``), then present their results and keep
        their Idempotency-Keys."""
        outcomes, results, keys, replays, now = (decided.outcomes, decided.results, decided.keys,
                                                 decided.replays, decided.now)
        try:
            await decided.ledger.flush(on=conn)
        except _FLUSH_ERRORS as exc:
            raise _Spoilt() from exc
        for job, result in results.items():
            try:
                outcomes[job] = job.present(result)
            except Exception as exc:
                if not autocommit:
                    raise _Spoilt() from exc  # not committed yet: roll back, so no event goes unanswered
                outcomes[job] = exc  # committed (autocommit, no key): as if the process died after it
        for job, first in replays.items():
            answer = outcomes[first]
            outcomes[job] = (Answer(answer.status, answer.body, replayed=True) if isinstance(answer, Answer)
                             else answer)
        remembered = [(job.key, answer) for job in keys.values()
                      if job.key is not None and isinstance(answer := outcomes[job], Answer)]
        try:
            await remember_many(conn, remembered, now)
        except _FLUSH_ERRORS as exc:
            raise _Spoilt() from exc
        return outcomes

    @staticmethod
    def _earlier_in_batch(key: IdempotencyKey, batch: dict[tuple[str, str], _Job]) -> _Job | None:
        """The job of this batch that came with the same key first (``KeyReused`` if for another request)."""
        if (first := batch.get((key.key, key.token_hash))) is None or first.key is None:
            return None
        if (first.key.method_path, first.key.body_hash) != (key.method_path, key.body_hash):
            raise KeyReused(key.key)
        return first


# Not OSError: a use case's OtherSite is a PermissionError, which is one; the store fails with these.
_STORE_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, ConnectionError)
# Named, not unpacked inside ``except (...)``: mypy cannot type a star-unpacked except clause.
_SPOILT_OR_STORE: tuple[type[Exception], ...] = (_Spoilt, *_STORE_ERRORS)
_FLUSH_ERRORS: tuple[type[Exception], ...] = (KeyTaken, DuplicateEvent, *_STORE_ERRORS)
