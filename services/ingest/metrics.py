"""Prometheus metrics, one registry per app (two apps in one process never share counters)."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("trialwatch_http_requests_total", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("trialwatch_http_request_duration_seconds", "Time to answer an HTTP request",
                                 ["method", "route"], registry=self.registry)
        self.events = Counter("trialwatch_events_recorded_total", "Events stored by the ingest API",
                              ["type"], registry=self.registry)

    def recorded(self, types: Iterable[str]) -> None:
        for event_type, count in collections.Counter(types).items():
            self.events.labels(type=event_type).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Count and time every request by its route template (``/v1/patients/{subject_id}``).

    Plain ASGI rather than ``BaseHTTPMiddleware`` (which wraps every request in a task group and
    a streamed response: a measurable share of a request's time at a few hundred a second)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the router sets it on this scope
            method = scope["method"]
            self.metrics.requests.labels(method=method, route=route, status=str(status)).inc()
            self.metrics.latency.labels(method=method, route=route).observe(time.perf_counter() - started)
