"""``reader(engine)``: transactions that only read take no write lock, and cannot write."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.store.engine import make_engine, reader
from shared.store.tables import leases


@pytest.fixture
async def impatient(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine whose SQLite connections fail at once on a held write lock instead of waiting 30 s."""
    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    yield engine
    await engine.dispose()


async def _no_waiting(conn: AsyncConnection) -> None:
    if conn.dialect.name == "sqlite":
        raw = await conn.get_raw_connection()
        await raw.driver_connection.execute("PRAGMA busy_timeout=0")  # type: ignore[union-attr]


async def _lease(conn: AsyncConnection) -> str:
    name = f"reader-test-{uuid.uuid4().hex[:12]}"
    await conn.execute(insert(leases).values(name=name, holder="test", expires_at=datetime.now(UTC)))
    return name


async def _count(engine: AsyncEngine, name: str) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).where(leases.c.name == name)) or 0)


async def test_a_writer_commits_while_a_reader_is_open(engine: AsyncEngine, impatient: AsyncEngine) -> None:
    async with reader(engine).connect() as reading:
        await reading.scalar(select(func.count()).select_from(leases))  # its transaction has begun
        async with impatient.connect() as writing:
            await _no_waiting(writing)
            name = await _lease(writing)  # BEGIN IMMEDIATE: "database is locked" if the reader held the lock
            await writing.commit()
        await reading.scalar(select(func.count()).select_from(leases))  # still open, still reading
    assert await _count(engine, name) == 1


async def test_a_writer_still_takes_the_write_lock_as_it_begins(engine: AsyncEngine, impatient: AsyncEngine) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL has row locks, not one write lock")
    async with engine.begin() as first:
        await first.scalar(select(func.count()).select_from(leases))  # read only, so far
        async with impatient.connect() as second:
            await _no_waiting(second)
            with pytest.raises(OperationalError, match="locked"):
                await _lease(second)


async def test_a_write_in_a_reader_fails_and_the_connection_writes_again_afterwards(impatient: AsyncEngine) -> None:
    with pytest.raises(DBAPIError, match="(?i)read.?only"):
        async with reader(impatient).begin() as conn:
            await _lease(conn)
    async with impatient.begin() as conn:  # the pool's one connection, a writer's again
        name = await _lease(conn)
    assert await _count(impatient, name) == 1
    async with reader(impatient).connect() as conn:  # and a reader's again
        assert await conn.scalar(select(func.count()).where(leases.c.name == name)) == 1
        with pytest.raises(DBAPIError, match="(?i)read.?only"):
            await _lease(conn)
