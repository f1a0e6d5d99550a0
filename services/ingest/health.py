"""Liveness, readiness and metrics: open to anyone who can reach the port, no token needed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

CHECK_TIMEOUT_S = 3.0
Check = Callable[[], Awaitable[None]]
router = APIRouter()


def store_check(engine: AsyncEngine) -> Check:
    async def check() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    return check


async def _outcome(check: Check) -> str:
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"failed: no answer within {CHECK_TIMEOUT_S:g} s"
    except Exception as exc:  # a readiness check reports any failure, it never raises
        return f"failed: {type(exc).__name__}: {exc}"[:300]
    return "ok"


async def run_checks(checks: Mapping[str, Check]) -> dict[str, str]:
    outcomes = await asyncio.gather(*(_outcome(c) for c in checks.values()))
    return dict(zip(checks, outcomes, strict=True))


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the store and the bus answer",
            responses={503: {"description": "a check failed", "content": {"application/json": {}}}})
async def readyz(request: Request) -> JSONResponse:
    outcomes = await run_checks(request.app.state.readiness_checks)
    failed = sorted(name for name, outcome in outcomes.items() if outcome != "ok")
    body = {"status": "unavailable" if failed else "ok", "checks": outcomes, "failed": failed}
    return JSONResponse(body, status_code=503 if failed else 200)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "the Prometheus text format", "content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics
    return Response(registry.render(), media_type=registry.content_type)
