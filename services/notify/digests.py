"""The DSMB summary, sent exactly once per period.

- A period is keyed: ``scheduled:<fire time>`` for the cron schedule of the protocol file,
  ``request:<event id>`` for ``POST /v1/digests``, ``manual:<uuid>`` for ``trialwatch digest send``.
- The ``digests`` row is the claim: its primary key lets one replica in; the claim carries a
  lease, so a replica that dies mid-send is taken over after the lease runs out. A sent row is
  never sent again.
- The data cutoff of a scheduled summary is its fire time, and its figures are folded from what
  was *recorded* by then (the store is bitemporal), so a summary sent late after an outage shows
  the same numbers it would have shown on time.
- A summary whose mail fails waits like an alert mail: its row stays unsent, its lease is cut to
  a backoff (2^n s, at most ``MAX_BACKOFF_S``) and ``run`` sends it when that has passed, for as
  long as the SMTP outage lasts. A request (``POST /v1/digests``) is queued so, and its message
  acked: it can never reach the dead letters.
- ``trialwatch digest send`` answers there and then: if its mail fails, its period is marked
  ``failed`` and never retried (the operator was told, and asks again).
- A period that fell due while the notifier was down goes out on start, once; only the latest
  one (older ones are superseded) and never one before the notifier's first start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.notify.deliveries import LOUD_AFTER_ATTEMPTS, MAX_BACKOFF_S
from services.notify.digest_email import render_digest
from services.notify.mailer import Mailer
from services.notify.summary import AuditAnchor, RuleSnapshot, Summary, build_summary
from shared.clinical.stopping import evaluate_rules
from shared.patients import fold_patients
from shared.protocol import Protocol
from shared.store.engine import reader
from shared.store.eventstore import anchor_at, utc
from shared.store.tables import digests

log = logging.getLogger(__name__)

LEASE = timedelta(minutes=5)
BASELINE = "baseline"


def replica_name() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def latest_fire_time(cron: str, tz: str, now: datetime, *, not_before: datetime) -> datetime | None:
    """The last moment the schedule fired at or before ``now`` (and after ``not_before``)."""
    trigger = CronTrigger.from_crontab(cron, timezone=tz)
    fire = trigger.get_next_fire_time(None, not_before)
    latest = None
    for _ in range(100_000):
        if fire is None or fire > now:
            break
        latest = fire
        fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
    return latest


class DigestNotSentError(Exception):
    """``send_now`` failed; nothing was queued."""


class DigestService:
    def __init__(
        self,
        engine: AsyncEngine,
        mailer: Mailer,
        protocol: Protocol,
        *,
        recipients: Sequence[str],
        mail_from: str,
        clock: Callable[[], datetime],
        replica: str | None = None,
        max_backoff: timedelta = timedelta(seconds=MAX_BACKOFF_S),
    ) -> None:
        self.engine, self.mailer, self.protocol = engine, mailer, protocol
        self.reads = reader(engine)  # the once-a-second look for a due retry takes no write lock
        self.recipients, self.mail_from, self.clock = list(recipients), mail_from, clock
        self.replica = replica or replica_name()
        self.max_backoff = max_backoff

    async def build(self, cutoff: datetime) -> Summary:
        async with self.engine.connect() as conn:
            folded = await fold_patients(conn, self.protocol, now=cutoff, as_of=cutoff)
            position, chain_hash = await anchor_at(conn, cutoff)
        states, uncounted = folded.states, tuple(sorted(folded.failed))
        rules = [
            RuleSnapshot(
                rule_id=s.rule.id, title=s.rule.title, evaluable=s.evaluable, events=s.events,
                stop_at=s.stop_at, crossed=s.crossed,
                looks=tuple((look.n, look.stop_at) for look in s.boundary.looks),
                crossed_at_look=s.crossed_at_look, events_at_crossing=s.events_at_crossing, path=s.path,
                uncounted=uncounted,
            )
            for s in evaluate_rules(self.protocol, states)
        ]
        return build_summary(
            [s.outcome() for s in states], rules, generated_at=self.clock().astimezone(self.protocol.tz),
            data_cutoff=cutoff.astimezone(self.protocol.tz),
            trial_title=self.protocol.trial.title, audit=AuditAnchor(position, chain_hash),
        )

    async def _claim(self, period_key: str, cutoff: datetime) -> dict[str, Any] | None:
        """Take the period's row, or None if it is sent or another replica holds a live lease."""
        now = self.clock()
        message_id = f"<digest.{uuid.uuid5(uuid.NAMESPACE_URL, period_key)}@trialwatch>"
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(digests).values(  # in UTC: SQLite keeps no offset
                    period_key=period_key, status="sending", data_cutoff=utc(cutoff), claimed_by=self.replica,
                    claimed_until=now + LEASE, attempts=1, message_id=message_id, created_at=now,
                ))
            return {"period_key": period_key, "data_cutoff": cutoff, "message_id": message_id}
        except IntegrityError:
            pass
        async with self.engine.begin() as conn:
            row = (await conn.execute(select(digests).where(digests.c.period_key == period_key))).one()
            if row.status != "sending" or (row.claimed_until and utc(row.claimed_until) > now):
                return None
            taken = await conn.execute(
                update(digests)
                .where(digests.c.period_key == period_key, digests.c.status == "sending",
                       digests.c.claimed_until == row.claimed_until)
                .values(claimed_by=self.replica, claimed_until=now + LEASE, attempts=digests.c.attempts + 1)
            )
            if taken.rowcount != 1:
                return None
            return {"period_key": period_key, "data_cutoff": utc(row.data_cutoff), "message_id": row.message_id}

    async def send(self, period_key: str, cutoff: datetime) -> str:
        """Send the period's summary unless it was sent; 'sent', 'already_sent' or 'busy'. A failed
        mail is raised, and left for ``retry_unsent`` after its backoff."""
        status, error = await self._attempt(period_key, cutoff)
        if error is not None:
            raise error
        return status

    async def request(self, period_key: str, cutoff: datetime) -> str:
        """A requested summary: sent now, or 'queued' for ``run`` to retry until it goes out.
        Only a store that cannot record the request raises (the message comes back later)."""
        status, error = await self._attempt(period_key, cutoff)
        return "queued" if error is not None else status

    async def _attempt(self, period_key: str, cutoff: datetime) -> tuple[str, Exception | None]:
        claim = await self._claim(period_key, cutoff)
        if claim is None:
            async with self.engine.connect() as conn:
                row = (await conn.execute(select(digests.c.status).where(digests.c.period_key == period_key))).one()
            return ("already_sent" if row.status == "sent" else "busy"), None
        try:
            summary = await self.build(claim["data_cutoff"])
            message = render_digest(summary, mail_from=self.mail_from, recipients=self.recipients,
                                    message_id=claim["message_id"])
            await self.mailer.send(message)
        except Exception as exc:  # noqa: BLE001 - recorded, retried after a backoff
            await self._failed(period_key, exc)
            return "queued", exc
        async with self.engine.begin() as conn:
            await conn.execute(update(digests).where(digests.c.period_key == period_key).values(
                status="sent", sent_at=self.clock(), summary=summary.to_json(), claimed_until=None,
            ))
        log.info("DSMB summary %s sent to %d recipients", period_key, len(self.recipients))
        return "sent", None

    async def _failed(self, period_key: str, exc: Exception) -> None:
        """Release our claim until the next try: 2^attempts seconds from now, at most ``max_backoff``."""
        async with self.engine.begin() as conn:
            attempts = await conn.scalar(select(digests.c.attempts).where(digests.c.period_key == period_key))
            delay = min(timedelta(seconds=2 ** min(attempts or 1, 16)), self.max_backoff)
            await conn.execute(update(digests).where(
                digests.c.period_key == period_key, digests.c.claimed_by == self.replica,
            ).values(claimed_until=self.clock() + delay, last_error=f"{type(exc).__name__}: {exc}"[:4000]))
        level = logging.ERROR if (attempts or 0) >= LOUD_AFTER_ATTEMPTS else logging.WARNING
        log.log(level, "DSMB summary %s not sent (attempt %d, next in %.1f s): %s",
                period_key, attempts, delay.total_seconds(), exc)

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Send every unsent summary whose backoff has passed, every ``interval`` seconds, until
        ``stop`` is set (a store outage is logged and waited out)."""
        while not stop.is_set():
            try:
                await self.retry_unsent()
            except Exception:
                log.exception("retrying unsent DSMB summaries failed; again in %.1f s", interval)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()

    async def send_now(self, *, requested_by: str) -> dict[str, Any]:
        """Send one summary now, or fail and leave nothing queued: the one who asked sees the
        error and asks again (a queued copy would go out later as well, a second mail)."""
        key = f"manual:{uuid.uuid4()}"
        try:
            status = await self.send(key, self.clock())
        except Exception as exc:
            async with self.engine.begin() as conn:
                await conn.execute(update(digests).where(digests.c.period_key == key).values(
                    status="failed", claimed_until=None))
            raise DigestNotSentError(f"{type(exc).__name__}: {exc}") from exc
        return {"period_key": key, "status": status, "requested_by": requested_by}

    async def baseline(self) -> datetime:
        """When this notifier first ran (recorded once): no catch-up before it."""
        now = self.clock()
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(digests).values(
                    period_key=BASELINE, status="baseline", data_cutoff=now, attempts=0,
                    message_id="-", created_at=now,
                ))
        except IntegrityError:
            pass
        async with self.engine.connect() as conn:
            cutoff = await conn.execute(select(digests.c.data_cutoff).where(digests.c.period_key == BASELINE))
            return utc(cutoff.scalar_one())  # the row was inserted above, or by an earlier run

    async def catch_up(self) -> str | None:
        """Send the latest due scheduled period if it is not sent yet; retry failed ones."""
        since = await self.baseline()
        fire = latest_fire_time(self.protocol.digest.cron, self.protocol.digest.timezone, self.clock(),
                                not_before=since)
        result = None
        if fire is not None:
            result = await self.send(f"scheduled:{fire.isoformat()}", fire)
        await self.retry_unsent()
        return result

    async def retry_unsent(self) -> None:
        async with self.reads.connect() as conn:
            rows = (await conn.execute(select(digests.c.period_key, digests.c.data_cutoff).where(
                digests.c.status == "sending", digests.c.claimed_until <= self.clock()))).all()
        for row in rows:
            await self.request(row.period_key, utc(row.data_cutoff))
