"""The baseline of the ingest benchmark: a naive FastAPI + pydantic + one INSERT endpoint.

The same route and body as ``POST /v1/patients/{subject_id}/events`` for a lab, validated by a
pydantic model and stored with one INSERT on an asyncpg pool; no auth, no checks, no outbox, no
hash chain. ``python -m bench.naive_app DSN PORT``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Literal

import asyncpg
import uvicorn
from fastapi import FastAPI, Request
from pydantic import AwareDatetime, BaseModel, Field

TABLE = "naive_events"
CREATE = f"""create table if not exists {TABLE} (
    id bigserial primary key, subject_id text not null, type text not null, occurred_at timestamptz not null,
    data jsonb not null, recorded_at timestamptz not null default now())"""


class Lab(BaseModel):
    type: Literal["lab"]
    occurred_at: AwareDatetime
    test: Literal["neutrophils", "platelets", "hemoglobin", "wbc", "lymphocytes"]
    value: float = Field(ge=0, le=10_000)
    unit: str = Field(min_length=1, max_length=16)


def create_app(dsn: str) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10)
        async with app.state.pool.acquire() as conn:
            await conn.execute(CREATE)
        yield
        await app.state.pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/patients/{subject_id}/events", status_code=201)
    async def record(request: Request, subject_id: str, body: Lab) -> dict[str, object]:
        data = body.model_dump(mode="json", exclude={"type", "occurred_at"})
        event_id = await request.app.state.pool.fetchval(
            f"insert into {TABLE} (subject_id, type, occurred_at, data) values ($1, $2, $3, $4) returning id",
            subject_id, body.type, body.occurred_at, json.dumps(data))
        return {"event_id": event_id, "subject_id": subject_id, "type": body.type,
                "occurred_at": body.occurred_at.isoformat(), "recorded_at": datetime.now().isoformat(), "data": data}

    return app


if __name__ == "__main__":
    dsn, port = sys.argv[1], int(sys.argv[2])
    uvicorn.run(create_app(dsn), host="127.0.0.1", port=port, log_level="warning")
