"""``trialwatch token create | list | revoke``: against the store directly, whether or not the
services are running (a revocation reaches a running API within ``PRINCIPAL_CACHE_TTL``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.ingest.auth import create_token, list_tokens, revoke_tokens
from shared.settings import Settings
from shared.store.engine import make_engine, migrate_async
from shared.store.tables import api_tokens


@asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[AsyncConnection]:
    """One transaction on the migrated store (a fresh machine has no tables yet)."""
    url = settings.resolved_database_url
    await migrate_async(url)
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            yield conn
    finally:
        await engine.dispose()


async def create_token_cli(settings: Settings, user: str, role: str, site: str | None,
                           expires_in_days: float | None = None) -> str:
    """Store the token's hash, return the token. Prints nothing: the caller prints it, alone on
    the last line."""
    expires_in = timedelta(days=expires_in_days) if expires_in_days is not None else None
    async with _store(settings) as conn:
        return await create_token(conn, user=user, role=role, site_id=site, expires_in=expires_in)


async def list_tokens_cli(settings: Settings) -> list[dict[str, Any]]:
    async with _store(settings) as conn:
        return await list_tokens(conn)


async def revoke_tokens_cli(settings: Settings, *, public_id: str | None, user: str | None) -> tuple[list[str], int]:
    """(ids revoked now, tokens that match at all): a match already revoked is no error, no match is."""
    async with _store(settings) as conn:
        revoked = await revoke_tokens(conn, public_id=public_id, user=user)
        which = (api_tokens.c.token_hash.startswith(public_id) if public_id is not None
                 else api_tokens.c.user == user)
        matching = len((await conn.execute(select(api_tokens.c.token_hash).where(which))).all())
    return revoked, matching
