"""Idempotency keys: a retried POST gets the first answer again and stores nothing new.

A key belongs to one token (the same key from two callers is two keys) and lives 24 hours. It
is written in the same transaction as the events it answered for, so a crash can never leave
the events stored without the key (a retry would store them twice). Only successful answers are
kept: a refused request stored nothing, so its retry simply runs again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.ingest.domain.errors import FieldProblem, Invalid
from shared.store.eventstore import utc
from shared.store.tables import idempotency_keys

LIFETIME = timedelta(hours=24)
MAX_KEY_LENGTH = 200


@dataclass(frozen=True)
class Answer:
    """What a command answers: status and JSON body (and, not kept, the event types it stored)."""

    status: int
    body: dict[str, Any]
    recorded: tuple[str, ...] = ()
    replayed: bool = False


@dataclass(frozen=True)
class IdempotencyKey:
    key: str
    token_hash: str
    method_path: str
    body_hash: str = field(repr=False)


class KeyReused(Invalid):
    """The key came before with another request (another body or another path)."""

    def __init__(self, key: str) -> None:
        super().__init__([FieldProblem("Idempotency-Key", "already used within 24 h for a different request")],
                         f"Idempotency-Key {key!r} was used within 24 h for a different request (another "
                         "body or path); use a new key for a new request")


class KeyTaken(Exception):
    """A concurrent request with the same key committed first; run again to replay its answer."""


def body_hash(raw: bytes) -> str:
    """SHA-256 of the canonical JSON of the body (key order and spacing do not matter)."""
    if not raw.strip():
        return hashlib.sha256(b"").hexdigest()
    try:
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except ValueError:
        return hashlib.sha256(raw).hexdigest()
    return hashlib.sha256(canonical.encode()).hexdigest()


async def recall(conn: AsyncConnection, key: IdempotencyKey, now: datetime) -> Answer | None:
    """The first answer given for this key, None if it is new (or expired), ``KeyReused`` if it
    answered a different request."""
    where = (idempotency_keys.c.key == key.key) & (idempotency_keys.c.token_hash == key.token_hash)
    row = (await conn.execute(select(idempotency_keys).where(where))).first()
    if row is None:
        return None
    if utc(row.created_at) + LIFETIME < now:
        await conn.execute(delete(idempotency_keys).where(where))
        return None
    if row.method_path != key.method_path or row.body_hash != key.body_hash:
        raise KeyReused(key.key)
    return Answer(row.status_code, row.response, replayed=True)


async def remember_many(conn: AsyncConnection, answers: list[tuple[IdempotencyKey, Answer]], now: datetime) -> None:
    """Keep many keys at once (a group commit); ``KeyTaken`` if any was taken meanwhile (then the
    whole transaction must be rolled back)."""
    if not answers:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(idempotency_keys).on_conflict_do_nothing().returning(idempotency_keys.c.key)
    rows = [{"key": k.key, "token_hash": k.token_hash, "method_path": k.method_path, "body_hash": k.body_hash,
             "status_code": a.status, "response": a.body, "created_at": now} for k, a in answers]
    stored = 0
    for row in rows:  # RETURNING with many rows is not an executemany everywhere; keys are few
        stored += len((await conn.execute(statement, row)).all())
    if stored != len(rows):
        raise KeyTaken(", ".join(k.key for k, _ in answers))


async def remember(conn: AsyncConnection, key: IdempotencyKey, answer: Answer, now: datetime) -> None:
    try:
        async with conn.begin_nested():
            await conn.execute(insert(idempotency_keys).values(
                key=key.key, token_hash=key.token_hash, method_path=key.method_path, body_hash=key.body_hash,
                status_code=answer.status, response=answer.body, created_at=now))
    except IntegrityError as exc:
        raise KeyTaken(key.key) from exc
