"""Tokens (CONTRACT.md section 1): created on a fresh or migrated store; listed by id; expired or
revoked, refused by the API within the principal cache's TTL (a test-moved clock, no waiting)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.app import create_app
from services.ingest.auth import (
    PRINCIPAL_CACHE_TTL,
    create_token,
    list_tokens,
    revoke_tokens,
    token_hash,
    token_id,
)
from services.ingest.tokens_cmd import create_token_cli
from shared.protocol import Protocol
from shared.settings import Settings
from shared.store.engine import make_engine
from shared.store.eventstore import now_utc
from shared.store.tables import api_tokens


async def test_a_token_on_a_fresh_machine_migrates_first_and_then_works(tmp_path: Path, protocol: object) -> None:
    settings = Settings(data_dir=tmp_path / "var")  # no database yet
    token = await create_token_cli(settings, "dr.chen", "site_staff", "S01")
    engine = make_engine(settings.resolved_database_url)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(select(api_tokens))).one()
        assert row.token_hash == token_hash(token)
        assert (row.user, row.role, row.site_id) == ("dr.chen", "site_staff", "S01")
        app = create_app(settings, engine=engine, protocol=protocol)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
            assert (await client.get("/v1/alerts", headers={"Authorization": f"Bearer {token}"})).status_code == 200
    finally:
        await engine.dispose()


async def test_a_token_against_a_migrated_store(database_url: str) -> None:
    token = await create_token_cli(Settings(database_url=database_url), "ops", "admin", None)
    assert len(token) >= 32


async def test_a_bad_role_or_a_site_staff_without_site_is_refused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(ValueError, match="role"):
        await create_token_cli(settings, "x", "superuser", None)
    with pytest.raises(ValueError, match="site"):
        await create_token_cli(settings, "x", "site_staff", None)


# --------------------------------------------------------------------------- expiry and revocation


class Clock:
    def __init__(self) -> None:
        self.now = now_utc()

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def api(settings: Settings, engine: AsyncEngine, protocol: Protocol) -> AsyncIterator[tuple[httpx.AsyncClient, Clock]]:
    """The API with a clock the test moves: the principal cache and the expiry both read it."""
    app, clock = create_app(settings, engine=engine, protocol=protocol), Clock()
    app.state.clock = clock
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
        yield client, clock


async def status(client: httpx.AsyncClient, token: str) -> int:
    return (await client.get("/v1/alerts", headers={"Authorization": f"Bearer {token}"})).status_code


async def token_of(engine: AsyncEngine, user: str, **kwargs: Any) -> str:
    async with engine.begin() as conn:
        return await create_token(conn, user=user, role="investigator", site_id=None, **kwargs)


async def test_an_expired_token_is_refused_at_its_expiry_even_while_cached(
    api: tuple[httpx.AsyncClient, Clock], engine: AsyncEngine
) -> None:
    client, clock = api
    token = await token_of(engine, f"locum-{uuid.uuid4().hex[:6]}", expires_in=timedelta(days=7), now=clock.now)
    assert await status(client, token) == 200  # looked up, and now cached

    clock.now += timedelta(days=7) - timedelta(seconds=1)
    assert await status(client, token) == 200
    clock.now += timedelta(seconds=1)
    answer = await client.get("/v1/alerts", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 401 and "expired" in answer.json()["detail"]


async def test_a_revoked_token_is_refused_once_the_cache_ttl_has_passed(
    api: tuple[httpx.AsyncClient, Clock], engine: AsyncEngine
) -> None:
    client, clock = api
    token = await token_of(engine, f"left-{uuid.uuid4().hex[:6]}")
    assert await status(client, token) == 200  # cached from here on
    async with engine.begin() as conn:
        assert await revoke_tokens(conn, public_id=token_id(token_hash(token))) == [token_id(token_hash(token))]

    # Within the TTL the API answers from its cache, no longer: the contract's 5 s bound holds.
    assert timedelta(seconds=5) >= PRINCIPAL_CACHE_TTL
    clock.now += PRINCIPAL_CACHE_TTL
    assert await status(client, token) == 401
    clock.now += timedelta(days=1)  # and it stays refused
    assert await status(client, token) == 401


async def test_revoking_a_user_revokes_each_of_their_tokens_and_nobody_elses(
    api: tuple[httpx.AsyncClient, Clock], engine: AsyncEngine
) -> None:
    client, clock = api
    user, other = f"gone-{uuid.uuid4().hex[:6]}", f"stays-{uuid.uuid4().hex[:6]}"
    theirs = [await token_of(engine, user), await token_of(engine, user)]
    kept = await token_of(engine, other)
    async with engine.begin() as conn:
        revoked = await revoke_tokens(conn, user=user)
        assert revoked == sorted(token_id(token_hash(t)) for t in theirs)
        assert await revoke_tokens(conn, user=user) == []  # already revoked: nothing new
    clock.now += PRINCIPAL_CACHE_TTL
    assert [await status(client, t) for t in theirs] == [401, 401]
    assert await status(client, kept) == 200


async def test_the_token_list_names_tokens_by_id_and_never_shows_the_token_or_its_hash(engine: AsyncEngine) -> None:
    user = f"listed-{uuid.uuid4().hex[:6]}"
    token = await token_of(engine, user, expires_in=timedelta(days=30))
    async with engine.connect() as conn:
        [listed] = [t for t in await list_tokens(conn) if t["user"] == user]
    assert listed["id"] == token_hash(token)[:12]
    assert (listed["role"], listed["site"], listed["revoked"]) == ("investigator", None, None)
    assert listed["expires"] - listed["created"] == timedelta(days=30)
    assert token not in str(listed) and token_hash(token) not in str(listed)


async def test_a_revocation_needs_a_well_formed_id_or_a_user(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        with pytest.raises(ValueError, match="not a token id"):
            await revoke_tokens(conn, public_id="abc")
        with pytest.raises(ValueError, match="not both"):
            await revoke_tokens(conn, public_id="0" * 12, user="x")
        with pytest.raises(ValueError, match="positive"):
            await create_token(conn, user="x", role="admin", site_id=None, expires_in=timedelta(0))
