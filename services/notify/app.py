"""Composition root of the notifier: alert mails (queue + sender) and the DSMB summary."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from faststream import FastStream
from faststream.nats import NatsBroker
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.notify.consumer import DURABLE, NotifyIntake, build_puller
from services.notify.deliveries import MAILED_TYPES, enqueue, recipients_for_event
from services.notify.digests import DigestService
from services.notify.mailer import Mailer, SmtpMailer
from services.notify.sender import DeliverySender
from services.notify.sent_journal import SentJournal
from shared.background import Background
from shared.bus import BusNames, ensure_stream, nats_broker
from shared.consuming import BatchSubscription, Subscription
from shared.events import StoredEvent
from shared.protocol import Protocol, load_protocol
from shared.settings import Settings
from shared.store.engine import make_engine
from shared.store.eventstore import now_utc
from shared.store.outage import is_outage

log = logging.getLogger(__name__)


class NotifyService:
    def __init__(
        self,
        settings: Settings,
        *,
        nats_url: str,
        smtp_url: str,
        engine: AsyncEngine | None = None,
        broker: NatsBroker | None = None,
        protocol: Protocol | None = None,
        mailer: Mailer | None = None,
        clock: Callable[[], datetime] = now_utc,
        replica: str | None = None,
        digest_retry_interval: float = 1.0,
    ) -> None:
        self.names = BusNames(settings.stream_name, settings.subject_prefix)
        self.nats_url = nats_url
        self.replicas = settings.stream_replicas
        self.engine = engine or make_engine(settings.resolved_database_url)
        self.broker = broker or nats_broker(nats_url)
        self.protocol = protocol or load_protocol(settings.protocol)
        self.mailer = mailer or SmtpMailer.from_url(smtp_url)
        self.clock = clock
        self.digest_retry_interval = digest_retry_interval  # seconds between looks for a due retry
        self.investigators = settings.investigator_emails or self.protocol.recipients.investigators
        self.dsmb = settings.dsmb_emails or self.protocol.recipients.dsmb
        self.sender = DeliverySender(
            self.engine, self.mailer, mail_from=settings.mail_from, api_base_url=settings.api_base_url,
            trial_title=self.protocol.trial.title, timezone=self.protocol.trial.timezone,
            lease=timedelta(seconds=settings.mail_lease_s),
            journal=SentJournal(settings.data_dir / "mail-sent.journal"),
        )
        self.digests = DigestService(
            self.engine, self.mailer, self.protocol, recipients=self.dsmb, mail_from=settings.mail_from,
            clock=clock, replica=replica,
        )
        mail = BatchSubscription(self.engine, DURABLE, self._queue_many, max_deliver=settings.max_deliver,
                                 is_outage=is_outage, after_commit=self._mail_queued)
        single = Subscription(self.engine, DURABLE, self._digest_requested, max_deliver=settings.max_deliver)
        self.puller = build_puller(nats_url, self.names, NotifyIntake(self.names, mail, single),
                                   ack_wait=settings.ack_wait_s)
        self.scheduler = AsyncIOScheduler(timezone="UTC")
        self.background = Background()

    async def _queue(self, conn: AsyncConnection, event: StoredEvent) -> None:
        recipients = await recipients_for_event(conn, event, investigators=self.investigators, dsmb=self.dsmb)
        if recipients:
            await enqueue(conn, event, recipients, now=self.clock())

    async def _queue_many(self, conn: AsyncConnection, batch: list[StoredEvent]) -> None:
        for event in batch:
            if event.type in MAILED_TYPES:
                await self._queue(conn, event)

    async def _mail_queued(self, batch: list[StoredEvent]) -> None:
        self.sender.poke()

    async def _digest_requested(self, event: StoredEvent) -> None:
        """A request for the DSMB summary: sent now, or queued and retried by ``digests.run``."""
        await self.digests.request(f"request:{event.event_id}", event.recorded_at)

    async def _scheduled_digest(self) -> None:
        try:
            await self.digests.catch_up()
        except Exception:
            log.exception("scheduled DSMB summary failed; the next check retries it")

    async def before_start(self) -> None:
        await ensure_stream(self.nats_url, self.names, replicas=self.replicas)

    async def after_start(self) -> None:
        self.background.start(self.puller.run(self.background.stop))
        self.background.start(self.sender.run(self.background.stop))
        self.background.start(self.digests.run(self.background.stop, self.digest_retry_interval))
        digest = self.protocol.digest
        self.scheduler.add_job(self._scheduled_digest, CronTrigger.from_crontab(digest.cron, timezone=digest.timezone),
                               id="digest", replace_existing=True, misfire_grace_time=None, coalesce=True)
        self.scheduler.add_job(self._scheduled_digest, IntervalTrigger(minutes=5), id="digest-catch-up",
                               replace_existing=True, coalesce=True)
        self.scheduler.start()
        self.background.start(self._scheduled_digest())

    async def before_stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        await self.background.close()

    def app(self) -> FastStream:
        return FastStream(
            self.broker,
            on_startup=[self.before_start],
            after_startup=[self.after_start],
            on_shutdown=[self.before_stop],
        )


def create_app(settings: Settings | None = None, **overrides: object) -> FastStream:
    """``faststream run --factory services.notify.app:create_app`` (NATS and SMTP URLs must be set)."""
    settings = settings or Settings()
    if not settings.nats_url or not settings.smtp_url:
        raise RuntimeError("TRIALWATCH_NATS_URL and TRIALWATCH_SMTP_URL must be set")
    return NotifyService(settings, nats_url=settings.nats_url, smtp_url=settings.smtp_url, **overrides).app()  # type: ignore[arg-type]
