"""Composition root of the safety service (one worker; run as many as the trial needs)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import datetime

from faststream import FastStream
from faststream.nats import NatsBroker
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.safety.consumer import DURABLE, build_puller
from services.safety.follower import RULES_LEASE, Lease, TrialFollower, bump_rule_inputs
from services.safety.handlers import Ahead, SafetyMonitor
from shared.background import Background
from shared.bus import BusNames, OutboxRelay, ensure_stream, nats_broker
from shared.consuming import BatchSubscription, BatchWork
from shared.events import StoredEvent
from shared.protocol import Protocol, load_protocol
from shared.settings import Settings
from shared.store.engine import make_engine
from shared.store.eventstore import now_utc
from shared.store.outage import is_outage

log = logging.getLogger(__name__)


def make_broker(url: str) -> NatsBroker:
    """The safety service's broker: every server ``url`` names (a cluster's too)."""
    return nats_broker(url)


class SafetyService:
    """A safety worker: evaluates the patients of the batches it fetches; the one that holds the
    trial follower's lease also evaluates the stopping rules and runs the due checks."""

    def __init__(
        self,
        settings: Settings,
        *,
        nats_url: str,
        engine: AsyncEngine | None = None,
        broker: NatsBroker | None = None,
        protocol: Protocol | None = None,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self.names = BusNames(settings.stream_name, settings.subject_prefix)
        self.nats_url, self.replicas = nats_url, settings.stream_replicas
        self.engine = engine or make_engine(settings.resolved_database_url)
        self.broker = broker or make_broker(nats_url)
        self.protocol = protocol or load_protocol(settings.protocol)
        self.clock = clock
        self.monitor = SafetyMonitor(self.engine, self.protocol, clock)
        self.relay = OutboxRelay(self.engine, self.broker, self.names)
        self.follower = TrialFollower(self.engine, self.monitor, Lease(self.engine, RULES_LEASE),
                                      after=self.relay.poke)
        self.subscription = BatchSubscription(self.engine, DURABLE, self.work, max_deliver=settings.max_deliver,
                                              is_outage=is_outage, after_commit=self.after_commit,
                                              prepare=self.prepare)
        self.puller = build_puller(nats_url, self.names, self.subscription, ack_wait=settings.ack_wait_s)
        self.background = Background()

    async def work(self, conn: AsyncConnection, batch: list[StoredEvent], ahead: Ahead | None = None) -> None:
        """A batch's patients, each once; the rules' follower is told if their inputs moved."""
        cause = await self.monitor.on_batch(conn, batch, ahead=ahead)
        if cause is not None:
            await bump_rule_inputs(conn, cause)

    async def prepare(self, batch: list[StoredEvent]) -> BatchWork:
        """The batch's work, with its patients decided before the transaction where that helps
        (SQLite: ``SafetyMonitor.decide_ahead``)."""
        ahead = await self.monitor.decide_ahead(batch)
        return functools.partial(self.work, ahead=ahead)

    async def handle(self, event: StoredEvent) -> None:
        """One event as a batch of one (what a single-message subscriber calls)."""
        await self.subscription.run([event])

    async def after_commit(self, batch: list[StoredEvent]) -> None:
        self.relay.poke()
        self.follower.poke()

    async def before_start(self) -> None:
        await ensure_stream(self.nats_url, self.names, replicas=self.replicas)

    async def after_start(self) -> None:
        self.background.start(self.relay.run(self.background.stop))
        await self.follower.lead()  # the first worker sweeps before it counts as started
        self.background.start(self.puller.run(self.background.stop))
        self.background.start(self.follower.run(self.background.stop))

    async def before_stop(self) -> None:
        await self.background.close()

    def app(self) -> FastStream:
        return FastStream(
            self.broker,
            on_startup=[self.before_start],
            after_startup=[self.after_start],
            on_shutdown=[self.before_stop],
        )


def create_app(settings: Settings | None = None, **overrides: object) -> FastStream:
    """``faststream run --factory services.safety.app:create_app`` (TRIALWATCH_NATS_URL must be set)."""
    settings = settings or Settings()
    if not settings.nats_url:
        raise RuntimeError("TRIALWATCH_NATS_URL is not set (trialwatch up starts an embedded server)")
    return SafetyService(settings, nats_url=settings.nats_url, **overrides).app()  # type: ignore[arg-type]
