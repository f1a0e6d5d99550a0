"""Prometheus metrics, one registry per app (two apps in one process never share counters)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response


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
        for event_type in types:
            self.events.labels(type=event_type).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def middleware(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Count and time every request by its route template (``/v1/patients/{subject_id}``)."""
        started, status = time.perf_counter(), 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", "unmatched")
            self.requests.labels(method=request.method, route=route, status=str(status)).inc()
            self.latency.labels(method=request.method, route=route).observe(time.perf_counter() - started)
