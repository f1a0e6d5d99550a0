"""Sending the delivery ledger's due rows: claim with a lease, send outside any transaction,
mark sent; a failure is recorded and retried with backoff, never dropped (deliveries.py says why
this is exactly once but for one gap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any, Literal, TypeVar

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.notify.deliveries import LOUD_AFTER_ATTEMPTS, MAX_BACKOFF_S, RAISE_TYPES
from services.notify.mailer import Mailer
from services.notify.rendering import compose, render_alert
from services.notify.sent_journal import SentJournal
from shared.events import ALERT_WITHDRAWN, StoredEvent
from shared.store.engine import reader
from shared.store.eventstore import get_event, now_utc, utc
from shared.store.tables import deliveries, events

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class _Claim:
    id: int
    alert_event_id: str
    recipient: str
    message_id: str
    attempts: int
    lease_until: datetime
    dead_lease: datetime | None  # taken over from a claim whose lease ran out (its sender may have sent it)


class _Writes:
    """The lanes' claims and settles, the ones that come together written in one transaction.

    Each is a conditional UPDATE of one row. On SQLite each transaction first waits for the one
    write lock, behind the safety batches and the ingest's group commits, and the busy handler is
    no queue; so while one transaction of these waits (or runs), the next ones queue here and go
    in the following transaction together: under load the lanes wait for the lock once a round,
    not twice a mail. Alone, one goes straight away, as before. They run in row-id order (two
    replicas' transactions take PostgreSQL's row locks in one order), and a failed transaction
    fails each of its writes, which their callers handle as before (a claim is not taken, a
    "sent" is tried again).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._queue: list[tuple[int, Callable[[AsyncConnection], Awaitable[Any]], asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def run(self, row_id: int, write: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((row_id, write, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="delivery-writes")
        return await done

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = sorted(self._queue, key=lambda job: job[0]), []
            try:
                async with self._engine.begin() as conn:
                    results = [await write(conn) for _, write, _ in batch]
            except BaseException as exc:  # never leave a caller waiting
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, _, done), result in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(result)


STOP_GRACE_S = 10.0  # how long a stopping sender waits for the mails in its lanes' hands


def _log_failed_records(recording: set[asyncio.Task[None]]) -> None:
    """Report, and forget, the "sent" records that failed (the mail may then go out again once its
    lease runs out, with the same Message-ID)."""
    for task in [t for t in recording if t.done()]:
        recording.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a mail the SMTP server took could not be recorded as sent: %s", exc, exc_info=exc)


def _forget_if_fine(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    """A done-callback: a finished task leaves ``tasks`` unless it failed (its failure is awaited,
    and so raised or logged, by whoever gathers ``tasks``)."""
    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is None:
            tasks.discard(task)
    return done


class _Deferred(Exception):
    def __init__(self, until: datetime) -> None:
        self.until = until


class DeliverySender:
    """Sends due deliveries; safe to run in several replicas at once (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        mailer: Mailer,
        *,
        mail_from: str,
        api_base_url: str,
        trial_title: str,
        timezone: str | None = None,
        lease: timedelta = timedelta(seconds=120),
        batch: int = 50,
        journal: SentJournal | None = None,
        concurrency: int = 8,
    ) -> None:
        self._engine, self._reads, self._mailer = engine, reader(engine), mailer
        self._writes = _Writes(engine)
        self._journal = journal or SentJournal(None)
        self._mail_from, self._api_base_url, self._trial_title = mail_from, api_base_url, trial_title
        self._timezone = timezone
        self._lease, self._batch, self._concurrency = lease, batch, concurrency
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """Wake ``run`` now (e.g. right after the consumer queued something)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Send due mail until ``stop`` is set: the due rows are looked up every ``interval``
        seconds, or at once when poked, and what a look finds joins a queue that ``concurrency``
        lanes take from, the most urgent first. A mail queued while others are on their way goes
        out as soon as a lane is free, not after them all (the rounds of ``send_due`` each waited
        for their slowest mail, and on SQLite a round is two waits for the write lock). On stop
        each lane finishes the mail it holds; what is still queued stays due in the store."""
        waiting: asyncio.PriorityQueue[tuple[int, int, Any]] = asyncio.PriorityQueue()
        queued: set[int] = set()
        recording: set[asyncio.Task[None]] = set()
        lanes = [asyncio.create_task(self._lane(waiting, queued, recording), name=f"mail-lane-{n}")
                 for n in range(self._concurrency)]
        watcher = asyncio.create_task(self._wake_on(stop))
        try:
            while not stop.is_set():
                try:
                    for row in await self._due(now_utc()):
                        if row.id not in queued:
                            queued.add(row.id)
                            waiting.put_nowait((row.rank, row.id, row))
                except Exception:  # the store is down: say so and look again
                    log.exception("looking up due alert mail failed; retrying in %.1f s", interval)
                _log_failed_records(recording)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
                self._wake.clear()
        finally:  # stopped or cancelled: the mails in the lanes' hands are finished and recorded
            watcher.cancel()
            while not waiting.empty():  # not claimed: due in the store for whoever runs next
                waiting.get_nowait()
            for n in range(len(lanes)):
                waiting.put_nowait((2, n, None))  # after any row: each lane stops at one
            deadline = asyncio.get_running_loop().time() + STOP_GRACE_S
            _, late = await asyncio.wait(lanes, timeout=STOP_GRACE_S)
            if recording:  # the "sent" records, the last ones started as the lanes finished
                _, late_records = await asyncio.wait(
                    list(recording), timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
                late |= late_records
            for task in late:
                task.cancel()
            _log_failed_records(recording)

    async def _lane(self, waiting: asyncio.PriorityQueue[tuple[int, int, Any]], queued: set[int],
                    recording: set[asyncio.Task[None]]) -> None:
        while True:
            _, _, row = await waiting.get()
            if row is None:
                return
            if waiting.empty():  # the last one queued: look for more (a backlog comes 50 at a time)
                self._wake.set()
            try:
                await self._take(row, now_utc, recording)
            except Exception:  # the store refused the claim: the row is still due, taken again later
                log.exception("sending alert mail (delivery %s) failed; it stays due", row.id)
                await asyncio.sleep(1.0)  # not at once: the store is likely out
            finally:
                queued.discard(row.id)

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def send_due(self, *, now: datetime | None = None) -> int:
        """Send what is due at ``now`` (default: the clock); returns how many were sent."""
        _, sent = await self._send_batch(now)
        return sent

    async def _send_batch(self, now: datetime | None) -> tuple[int, int]:
        """One batch: (rows found due, messages sent)."""
        fixed = utc(now) if now is not None else None

        def clock() -> datetime:
            return fixed or now_utc()

        due, lanes = await self._due(clock()), asyncio.Semaphore(self._concurrency)
        recording: set[asyncio.Task[None]] = set()

        async def one(row: Any) -> bool:
            async with lanes:
                return await self._take(row, clock, recording)

        # Taken in the order found (urgent first), ``concurrency`` at a time (eight by default: a
        # lane's mail waits for the write lock, then for the store and the server; four lanes fell
        # behind at 250 events/s on SQLite): one mail's SMTP
        # conversation and fsync do not hold up the next (a withdrawal whose alert is still in
        # flight is deferred, as when its alert failed: it never overtakes it). A lane claims its
        # next row while the last one's "sent" is being recorded, so the two share a transaction
        # (``_Writes``): one wait for SQLite's write lock a mail, not two.
        outcomes = await asyncio.gather(*(one(row) for row in due), return_exceptions=True)
        recorded = await asyncio.gather(*recording, return_exceptions=True)
        for outcome in [*outcomes, *recorded]:
            if isinstance(outcome, BaseException):
                raise outcome
        return len(due), sum(1 for outcome in outcomes if outcome is True)

    async def _take(self, row: Any, clock: Callable[[], datetime], recording: set[asyncio.Task[None]]) -> bool:
        """Claim one due row and mail it; True if it was mailed now. Once the server has it,
        "sent" is recorded in a task of ``recording`` while the lane goes on to its next mail."""
        claim = await self._claim(row, clock())
        if claim is None:
            return False
        outcome = await self._deliver(claim, clock)
        if outcome is not None:
            task = asyncio.create_task(self._record_sent(claim, clock))
            recording.add(task)
            task.add_done_callback(_forget_if_fine(recording))
        return outcome == "mailed"

    async def _due(self, now: datetime) -> list[Any]:
        """The due rows, urgent ones first: a backlog of high alerts (a late-entered course's
        deviations, say) must not hold back a grade 4 CRS behind it."""
        urgent_first = case((events.c.data["severity"].as_string() == "urgent", 0), else_=1)
        query = (
            select(deliveries.c.id, deliveries.c.status, deliveries.c.claimed_until, urgent_first.label("rank"))
            .join(events, events.c.event_id == deliveries.c.alert_event_id, isouter=True)
            .where(
                or_(
                    and_(deliveries.c.status == "pending", deliveries.c.next_attempt_at <= now),
                    and_(deliveries.c.status == "sending", deliveries.c.claimed_until <= now),
                )
            )
            .order_by(urgent_first, deliveries.c.next_attempt_at, deliveries.c.id)
            .limit(self._batch)
        )
        async with self._reads.connect() as conn:
            return list((await conn.execute(query)).all())

    async def _claim(self, row: Any, now: datetime) -> _Claim | None:
        """Take the row only if it is still due as we read it: one replica wins, the other gets
        no row (PostgreSQL re-checks the WHERE after the winner commits; SQLite serialises)."""
        lease_until = now + self._lease
        if row.status == "pending":
            still_due = and_(deliveries.c.status == "pending", deliveries.c.next_attempt_at <= now)
        else:
            still_due = and_(deliveries.c.status == "sending", deliveries.c.claimed_until == row.claimed_until)
        claim = (
            update(deliveries)
            .where(deliveries.c.id == row.id, still_due)
            .values(status="sending", claimed_until=lease_until)
            .returning(deliveries.c.alert_event_id, deliveries.c.recipient, deliveries.c.message_id,
                       deliveries.c.attempts)
        )

        async def take(conn: AsyncConnection) -> Any:
            return (await conn.execute(claim)).first()

        taken = await self._writes.run(row.id, take)
        if taken is None:
            return None
        return _Claim(row.id, taken.alert_event_id, taken.recipient, taken.message_id, taken.attempts, lease_until,
                      dead_lease=row.claimed_until if row.status == "sending" else None)

    async def _deliver(self, claim: _Claim, clock: Callable[[], datetime]) -> Literal["mailed", "mailed before"] | None:
        """Mail the claim: "mailed" now, or "mailed before" (its sender died once the mail was on
        its way); either way the caller records it sent. None: not sent, and the row is settled so.

        The journal (sent_journal.py) is written in the loop, no thread hop, at the two moments the
        mailer reports: the message handed to the kernel, the server's 250. Its lines are the one
        thing that tells a later sender this mail went out, so the gap before them is kept as
        short as can be; the fsync that makes them outlast a power cut follows in a thread."""
        if claim.dead_lease is not None and await asyncio.to_thread(
                self._journal.sent_before, claim.message_id, claim.dead_lease):
            log.warning("alert mail %s to %s went out before its sender died; recording it, not sending it again",
                        claim.message_id, claim.recipient)
            return "mailed before"
        journaled = False

        def handed() -> None:
            self._journal.handed(claim.message_id, claim.lease_until)

        def accepted() -> None:
            nonlocal journaled
            self._journal.accepted(claim.message_id)
            journaled = True

        try:
            message = await self._message(claim, clock())
            async with asyncio.timeout(self._lease.total_seconds() / 2):
                await self._mailer.send(message, accepted=accepted, handed=handed)
        except _Deferred as deferred:
            await self._release(claim, next_attempt_at=deferred.until)
            return None
        except Exception as exc:  # noqa: BLE001 - every failure is recorded and retried
            if journaled:  # the server has it; what failed came after (the QUIT): not sent again
                log.warning("alert mail %s to %s was accepted, then: %s", claim.message_id, claim.recipient, exc)
                await asyncio.to_thread(self._journal.sync)
                return "mailed"
            # Refused, or no answer: sent again, so a "handed" of this attempt no longer counts
            # (written before anything else: a kill before the retry is set must not count it sent).
            self._journal.failed(claim.message_id, claim.lease_until)
            await self._failed(claim, exc, clock())
            return None
        if not journaled:  # a mailer that does not say when the server took it
            self._journal.accepted(claim.message_id)
        await asyncio.to_thread(self._journal.sync)
        return "mailed"

    async def _record_sent(self, claim: _Claim, clock: Callable[[], datetime]) -> None:
        """The server has the mail: record it, trying again while the store refuses (a dropped
        connection, a locked SQLite file). A claim left "sending" is sent again once its lease runs
        out, so giving up at the first refusal would mail it twice."""
        deadline, pause = time.monotonic() + self._lease.total_seconds() / 2, 0.1
        while True:
            try:
                await self._settle(claim, status="sent", sent_at=clock())
                return
            except Exception:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("alert mail %s to %s went out but is not recorded yet; trying again",
                            claim.message_id, claim.recipient, exc_info=True)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _message(self, claim: _Claim, now: datetime) -> EmailMessage:
        async with self._reads.connect() as conn:
            event = await get_event(conn, claim.alert_event_id)
            if event is None:
                raise LookupError(f"alert event {claim.alert_event_id} is not in the event store")
            earlier = await self._earlier_copies(conn, event, claim.recipient) if event.type == ALERT_WITHDRAWN else []
        if any(r.status != "sent" for r in earlier):
            raise _Deferred(max([now + timedelta(seconds=1)] + [utc(r.next_attempt_at) for r in earlier]))
        mail = render_alert(
            event.type, event.data, recorded_at=event.recorded_at,
            api_base_url=self._api_base_url, trial_title=self._trial_title, timezone=self._timezone,
        )
        return compose(
            mail, mail_from=self._mail_from, to=claim.recipient, message_id=claim.message_id, date=now,
            severity=None if event.type == ALERT_WITHDRAWN else event.data.get("severity"),
            in_reply_to=[r.message_id for r in earlier],
        )

    async def _earlier_copies(self, conn: AsyncConnection, event: StoredEvent, recipient: str) -> list[Any]:
        """This recipient's deliveries of the raises a withdrawal refers to."""
        raised = select(events.c.event_id).where(
            events.c.stream_id == event.stream_id,
            events.c.type.in_(RAISE_TYPES),
            events.c.position < event.position,
        )
        rows = await conn.execute(
            select(deliveries.c.message_id, deliveries.c.status, deliveries.c.next_attempt_at)
            .where(deliveries.c.alert_event_id.in_(raised), deliveries.c.recipient == recipient)
            .order_by(deliveries.c.id)
        )
        return list(rows.all())

    async def _failed(self, claim: _Claim, exc: Exception, now: datetime) -> None:
        attempts = claim.attempts + 1
        delay = min(2 ** min(attempts, 16), MAX_BACKOFF_S)
        level = logging.ERROR if attempts >= LOUD_AFTER_ATTEMPTS else logging.WARNING
        log.log(level, "alert mail %s to %s failed (attempt %d, next in %d s): %s",
                claim.message_id, claim.recipient, attempts, delay, exc)
        await self._settle(
            claim, status="pending", attempts=attempts, next_attempt_at=now + timedelta(seconds=delay),
            last_error=f"{type(exc).__name__}: {exc}"[:2000],
        )

    async def _release(self, claim: _Claim, *, next_attempt_at: datetime) -> None:
        await self._settle(claim, status="pending", next_attempt_at=next_attempt_at)

    async def _settle(self, claim: _Claim, **values: Any) -> None:
        """End our claim, unless the lease ran out and another sender holds the row now."""
        settle = (
            update(deliveries)
            .where(
                deliveries.c.id == claim.id,
                deliveries.c.status == "sending",
                deliveries.c.claimed_until == claim.lease_until,
            )
            .values(claimed_until=None, **values)
        )

        async def end(conn: AsyncConnection) -> int:
            return (await conn.execute(settle)).rowcount

        if await self._writes.run(claim.id, end) == 0:
            log.warning("delivery %s to %s: lease lost before it was settled as %s",
                        claim.message_id, claim.recipient, values.get("status"))
