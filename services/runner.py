"""Running the services: all on this machine (``trialwatch up``) or one each.

``up`` starts embedded defaults (CONTRACT.md section 1) for whatever URL is not set: SQLite under
the data dir, a ``nats-server`` child process, and an SMTP capture writing
``<data dir>/mail/*.eml``; then it runs the three services as child processes against them
(services/children.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import uvicorn
from faststream.nats import NatsBroker
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from services.children import ServiceChildren
from services.ingest.app import create_app as create_ingest_app
from services.notify.app import NotifyService
from services.notify.capture import MailCapture
from services.safety.app import SafetyService
from services.safety.handlers import SafetyMonitor
from shared.bus import BusNames, OutboxRelay, check_nats, ensure_stream, nats_broker
from shared.embedded_nats import EmbeddedNats
from shared.events import StoredEvent
from shared.protocol import load_protocol
from shared.settings import Settings
from shared.store import eventstore
from shared.store.engine import make_engine, migrate_async
from shared.store.tables import (
    dead_letters,
    due_checks,
    patient_failures,
    patient_projection,
    rule_inputs,
    stopping_rule_state,
)

log = logging.getLogger(__name__)


@dataclass
class Endpoints:
    database_url: str
    nats_url: str
    smtp_url: str


@contextlib.asynccontextmanager
async def embedded(settings: Settings) -> AsyncIterator[Endpoints]:
    """Start what has no URL set; stop it again on the way out."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    nats: EmbeddedNats | None = None
    capture: MailCapture | None = None
    supervisor: asyncio.Task[None] | None = None
    try:
        if settings.nats_url:
            nats_url = settings.nats_url
        else:
            nats = EmbeddedNats(settings.data_dir / "nats").start()
            nats_url = nats.url
            supervisor = asyncio.create_task(_keep_running(nats), name="embedded-nats-supervisor")
            log.info("embedded NATS with JetStream at %s", nats_url)
        if settings.smtp_url:
            smtp_url = settings.smtp_url
        else:
            capture = MailCapture(settings.data_dir, host="127.0.0.1", port=0)
            await capture.start()
            smtp_url = f"smtp://127.0.0.1:{capture.port}"
            log.info("SMTP capture at %s, mails under %s", smtp_url, settings.data_dir / "mail")
        yield Endpoints(settings.resolved_database_url, nats_url, smtp_url)
    finally:
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        if capture is not None:
            await capture.stop()
        if nats is not None:
            nats.stop()


async def _keep_running(nats: EmbeddedNats, every_s: float = 1.0) -> None:
    """The embedded broker is ours to keep up: if it dies, start it again on the same port and
    store (clients reconnect without end; the outbox holds whatever was recorded meanwhile)."""
    while True:
        await asyncio.sleep(every_s)
        try:  # on this thread: the child is tied to the life of the thread that starts it (see EmbeddedNats)
            nats.restart_if_dead()
        except Exception:
            log.exception("could not start the embedded nats-server again; trying again")


def ingest_app(settings: Settings, engine: AsyncEngine, nats_url: str) -> Any:
    names = BusNames(settings.stream_name, settings.subject_prefix)
    broker = nats_broker(nats_url)
    outbox = OutboxRelay(engine, broker, names)
    # PostgreSQL: every commit of the API pokes the relay, so an event goes onto the bus at once,
    # not up to an interval later. Not on SQLite: there each round ends in a delete that waits for
    # the one write lock, and a round per commit left the API seconds behind at 250 events/s.
    stored = outbox.poke if engine.dialect.name == "postgresql" else lambda: None

    async def relay() -> None:
        await broker.connect()
        stop = asyncio.Event()
        try:
            await outbox.run(stop, interval=settings.relay_interval_s)
        finally:
            await broker.stop()

    async def bus_ready() -> None:
        await check_nats(nats_url)

    return create_ingest_app(settings, engine=engine, readiness_checks={"bus": bus_ready}, lifespan_tasks=[relay],
                             on_stored=stored)


async def serve_http(settings: Settings, app: Any) -> None:
    # http="httptools": the C parser (uvicorn's "auto" picks it too; named so a missing one fails loudly).
    config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="info",
                            http="httptools", access_log=settings.access_log)
    await uvicorn.Server(config).serve()


async def run_all(settings: Settings) -> None:
    """The embedded parts here, each service in a child process; on the way out the children
    stop first, then the SMTP capture, then the broker."""
    async with embedded(settings) as ends:
        await migrate_async(ends.database_url)  # once, before the services: SQLite has no migration lock
        await ensure_stream(ends.nats_url, names_of(settings), replicas=settings.stream_replicas)
        async with ServiceChildren(child_environment(settings, ends)) as children:
            log.info("TrialWatch is up: API on http://%s:%s", settings.http_host, settings.http_port)
            await children.keep_running()


def child_environment(settings: Settings, ends: Endpoints) -> dict[str, str]:
    """What a service child reads its settings from: ours, with the resolved URLs."""
    return {
        **os.environ,
        "TRIALWATCH_DATA_DIR": str(settings.data_dir.resolve()),
        "TRIALWATCH_DATABASE_URL": ends.database_url,
        "TRIALWATCH_NATS_URL": ends.nats_url,
        "TRIALWATCH_SMTP_URL": ends.smtp_url,
    }


def names_of(settings: Settings) -> BusNames:
    return BusNames(settings.stream_name, settings.subject_prefix)


def _require(value: str | None, name: str) -> str:
    if not value:
        raise SystemExit(f"{name} is not set; `trialwatch up` starts embedded services instead")
    return value


async def run_ingest(settings: Settings, *, migrate: bool = True) -> None:
    if migrate:
        await migrate_async(settings.resolved_database_url)
    nats_url = _require(settings.nats_url, "TRIALWATCH_NATS_URL")
    await ensure_stream(nats_url, names_of(settings), replicas=settings.stream_replicas)
    engine = make_engine(settings.resolved_database_url)
    app = ingest_app(settings, engine, nats_url)
    settle_heap()
    await serve_http(settings, app)


def settle_heap() -> None:
    """Put what start-up built (every module, the app, the protocol: a quarter of a million
    objects) beyond the garbage collector's reach. Each full collection walked all of it, about
    0.2 s with the server standing still: the ingest's p99 under load was those pauses. The
    safety and notify services settle theirs too (an alert waits behind a pause as a request does)."""
    gc.collect()
    gc.freeze()


async def _run_until_signal(app: Any) -> None:
    await app.run()


async def run_safety(settings: Settings, *, migrate: bool = True) -> None:
    if migrate:
        await migrate_async(settings.resolved_database_url)
    nats_url = _require(settings.nats_url, "TRIALWATCH_NATS_URL")
    # The stream first, replicated as set: the service's own start-up leaves an existing one as it is.
    await ensure_stream(nats_url, names_of(settings), replicas=settings.stream_replicas)
    service = SafetyService(settings, nats_url=nats_url, broker=nats_broker(nats_url))
    settle_heap()
    await _run_until_signal(service.app())


async def run_notify(settings: Settings, *, migrate: bool = True) -> None:
    if migrate:
        await migrate_async(settings.resolved_database_url)
    service = NotifyService(
        settings, nats_url=_require(settings.nats_url, "TRIALWATCH_NATS_URL"),
        smtp_url=_require(settings.smtp_url, "TRIALWATCH_SMTP_URL"),
    )
    settle_heap()
    await _run_until_signal(service.app())


async def replay_projections(settings: Settings, *, progress: Callable[[int, int], None] | None = None) -> int:
    """Drop the safety read models and fold every patient again from the event store."""
    await migrate_async(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    try:
        async with engine.begin() as conn:
            for table in (patient_projection, stopping_rule_state, due_checks, rule_inputs, patient_failures):
                await conn.execute(table.delete())
        monitor = SafetyMonitor(engine, load_protocol(settings.protocol), eventstore.now_utc)
        return await monitor.replay(progress=progress)
    finally:
        await engine.dispose()


async def verify_chain(settings: Settings, *, anchor: tuple[int, str] | None = None,
                       ) -> tuple[int, StoredEvent | None, str]:
    await migrate_async(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    try:
        async with engine.connect() as conn:
            return await eventstore.verify_chain(conn, anchor=anchor)
    finally:
        await engine.dispose()


async def send_digest_now(settings: Settings) -> dict[str, Any]:
    async with embedded_smtp_only(settings) as smtp_url:
        await migrate_async(settings.resolved_database_url)
        engine = make_engine(settings.resolved_database_url)
        try:
            # Sent here and now, through the notifier's digest service; no bus is needed (nor connected).
            service = NotifyService(settings, nats_url=settings.nats_url or "", smtp_url=smtp_url, engine=engine,
                                    broker=NatsBroker())
            return await service.digests.send_now(requested_by="cli")
        finally:
            await engine.dispose()


@contextlib.asynccontextmanager
async def embedded_smtp_only(settings: Settings) -> AsyncIterator[str]:
    if settings.smtp_url:
        yield settings.smtp_url
        return
    capture = MailCapture(settings.data_dir, host="127.0.0.1", port=0)
    await capture.start()
    try:
        yield f"smtp://127.0.0.1:{capture.port}"
    finally:
        await capture.stop()


async def list_dead_letters(settings: Settings) -> list[dict[str, Any]]:
    await migrate_async(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(select(dead_letters).order_by(dead_letters.c.id))
            return [dict(r._mapping) for r in rows]
    finally:
        await engine.dispose()


async def replay_dead_letter(settings: Settings, dead_letter_id: int) -> None:
    nats_url = _require(settings.nats_url, "TRIALWATCH_NATS_URL")
    engine = make_engine(settings.resolved_database_url)
    broker = nats_broker(nats_url)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(select(dead_letters).where(dead_letters.c.id == dead_letter_id))).first()
        if row is None:
            raise SystemExit(f"no dead letter {dead_letter_id}")
        await broker.connect()
        stamp = datetime.now().strftime("%Y%m%dT%H%M%S%f")
        await broker.publish(
            row.payload.encode(), row.subject, headers={"Nats-Msg-Id": f"replay-{dead_letter_id}-{stamp}"},
            stream=settings.stream_name,
        )
        async with engine.begin() as conn:
            await conn.execute(
                update(dead_letters).where(dead_letters.c.id == dead_letter_id).values(replayed_at=eventstore.now_utc())
            )
    finally:
        await broker.stop()
        await engine.dispose()
