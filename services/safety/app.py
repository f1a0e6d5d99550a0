"""Composition root of the safety service."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from faststream import FastStream
from faststream.nats import NatsBroker
from sqlalchemy.ext.asyncio import AsyncEngine

from services.safety.consumer import DURABLE, build_router
from services.safety.handlers import SafetyMonitor
from services.safety.scheduler import DueChecks
from shared.background import Background
from shared.bus import BusNames, OutboxRelay, ensure_stream
from shared.consuming import Subscription, process_once
from shared.events import StoredEvent
from shared.patients import PATIENT_TYPES
from shared.protocol import Protocol, load_protocol
from shared.settings import Settings
from shared.store.engine import make_engine
from shared.store.eventstore import now_utc

log = logging.getLogger(__name__)


def make_broker(url: str) -> NatsBroker:
    return NatsBroker(url, max_reconnect_attempts=-1, reconnect_time_wait=1, connect_timeout=5)


class SafetyService:
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
        self.nats_url = nats_url
        self.engine = engine or make_engine(settings.resolved_database_url)
        self.broker = broker or make_broker(nats_url)
        self.protocol = protocol or load_protocol(settings.protocol)
        self.clock = clock
        self.monitor = SafetyMonitor(self.engine, self.protocol, clock)
        self.due = DueChecks(self.engine, self._check, clock)
        self.relay = OutboxRelay(self.engine, self.broker, self.names)
        subscription = Subscription(self.engine, DURABLE, self.handle, max_deliver=settings.max_deliver)
        self.broker.include_router(build_router(self.names, subscription))
        self.background = Background()

    async def handle(self, event: StoredEvent) -> None:
        async with self.monitor._lock:
            await process_once(self.engine, DURABLE, event, self.monitor.on_event)
        self.relay.poke()
        if event.type in PATIENT_TYPES and event.subject_id:
            await self.due.reschedule(event.subject_id)
        await self._reschedule_rechecks()

    async def _check(self, subject_id: str | None) -> None:
        await self.monitor.check(subject_id)
        self.relay.poke()
        await self._reschedule_rechecks()

    async def _reschedule_rechecks(self) -> None:
        for subject_id in self.monitor.take_rechecks():
            await self.due.reschedule(subject_id)

    async def sweep(self) -> int:
        """Re-evaluate every patient once (start-up: catches what fell due while down)."""
        count = await self.monitor.sweep()
        self.relay.poke()
        return count

    async def before_start(self) -> None:
        await ensure_stream(self.nats_url, self.names)

    async def after_start(self) -> None:
        self.background.start(self.relay.run(self.background.stop))
        self.due.start()
        await self.sweep()
        await self.due.rebuild()

    async def before_stop(self) -> None:
        self.due.shutdown()
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
