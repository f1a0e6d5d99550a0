"""The ingest service's composition root: settings and collaborators in, a FastAPI app out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest import api, health, problems, web
from services.ingest.auth import PrincipalCache
from services.ingest.idempotency import Answer
from services.ingest.metrics import Metrics, MetricsMiddleware
from services.ingest.unit_of_work import UnitOfWork
from shared.protocol import Protocol, load_protocol
from shared.settings import Settings
from shared.store.engine import make_engine
from shared.store.eventstore import now_utc

log = logging.getLogger(__name__)
Task = Callable[[], Coroutine[Any, Any, None]]  # asyncio.create_task takes a coroutine, not any awaitable


# FastAPI's own OpenTelemetry spans and metrics stay off: the service keeps Prometheus metrics of its
# own (``metrics.py``), and the check whether a tracer is configured cost 2-3 % of a request's CPU.
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def create_app(
    settings: Settings,
    *,
    engine: AsyncEngine | None = None,
    protocol: Protocol | None = None,
    readiness_checks: Mapping[str, Task] | None = None,
    lifespan_tasks: Sequence[Task] = (),
    on_stored: Callable[[], None] = lambda: None,
) -> FastAPI:
    """Build the API. Defaults: the engine from ``settings`` (not migrated here: the CLI migrates),
    the protocol file from ``settings``. ``readiness_checks`` come beside the store's own (the bus);
    ``lifespan_tasks`` run in the background while the app serves (the outbox relay);
    ``on_stored`` is called after each write commits (it pokes the relay)."""
    owns_engine = engine is None
    engine = engine or make_engine(settings.resolved_database_url)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(task(), name=getattr(task, "__name__", "task")) for task in lifespan_tasks]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.error("background task failed: %r", outcome)
            if owns_engine:
                await engine.dispose()

    app = FastAPI(title="TrialWatch ingest", version="1", lifespan=lifespan, telemetry=NO_TELEMETRY,
                  description="Record clinical events of the trial; read patients, alerts and stopping rules.")
    app.state.engine = engine
    app.state.protocol = protocol or load_protocol(settings.protocol)
    app.state.clock = now_utc
    app.state.principals = PrincipalCache(engine, clock=lambda: app.state.clock())
    app.state.metrics = metrics
    def committed(answer: Answer) -> None:
        metrics.recorded(answer.recorded)
        on_stored()

    app.state.uow = UnitOfWork(engine, lambda: app.state.clock(), on_commit=committed, tz=app.state.protocol.tz)
    app.state.readiness_checks = {"store": health.store_check(engine), **(readiness_checks or {})}
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    problems.install(app, api.KNOWN_ERRORS)
    app.include_router(health.router)
    app.include_router(api.router)
    web.install(app)
    return app
