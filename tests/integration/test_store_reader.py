"""``reader(engine)``: transactions that only read take no write lock, and cannot write."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

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


async def test_a_waiting_writer_asks_for_the_lock_often_and_still_gives_up_as_the_busy_timeout_says(
    engine: AsyncEngine, impatient: AsyncEngine, database_url: str
) -> None:
    """SQLite's busy handler would look once and then sleep longer and longer (100 ms at a time
    past a quarter second), while others take the lock between its looks."""
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL has row locks, not one write lock")
    holder = sqlite3.connect(database_url.split(":///", 1)[1], isolation_level=None)
    statements: list[str] = []
    try:
        async with impatient.connect() as writing:
            raw = await writing.get_raw_connection()
            driver: Any = raw.driver_connection
            await driver.execute("PRAGMA busy_timeout=300")
            await driver.set_trace_callback(statements.append)
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(OperationalError, match="locked"):
                await _lease(writing)
            holder.execute("ROLLBACK")
            asked = statements.count("BEGIN IMMEDIATE")
            await writing.rollback()
            assert (await (await driver.execute("PRAGMA busy_timeout")).fetchone())[0] == 300  # as it was
            await driver.set_trace_callback(None)
            name = await _lease(writing)  # the lock is free again: it writes
            await writing.commit()
        assert asked >= 3  # asked again and again within the 300 ms, and once more to raise
        assert await _count(engine, name) == 1

        holder.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.2, holder.execute, "ROLLBACK")
        async with engine.begin() as conn:  # waits (up to 30 s) and takes it once let go
            name = await _lease(conn)
        assert await _count(engine, name) == 1
    finally:
        holder.close()
