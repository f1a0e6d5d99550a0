"""Engines and migrations. Built by functions at start-up, never at import."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
READ_ONLY = "trialwatch_read_only"  # the execution option ``reader`` sets


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine; on SQLite every transaction is ``BEGIN IMMEDIATE`` so writers queue
    (busy timeout 30 s) instead of failing on a lock upgrade, except those of ``reader(engine)``."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _connect(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
            record.info[READ_ONLY] = False  # a new connection writes (query_only is off)

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: Any) -> None:
            reading = bool(conn.get_execution_options().get(READ_ONLY))
            if conn.info.get(READ_ONLY) != reading:  # the pooled connection served the other kind last
                conn.exec_driver_sql(f"PRAGMA query_only={int(reading)}")
                conn.info[READ_ONLY] = reading
            conn.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

        return engine
    # No ping per checkout (a round trip on every request): connections are recycled after half an
    # hour, and a connection found dead (the server restarted) fails its statement with a
    # disconnect error, which makes SQLAlchemy drop the whole pool; the request answers 503 and the
    # group commit runs the batch's writes again on fresh connections.
    kwargs.setdefault("pool_recycle", 1800)
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 20)
    return create_async_engine(url, **kwargs)


def reader(engine: AsyncEngine) -> AsyncEngine:
    """``engine``'s pool, for transactions that only read.

    On SQLite every other transaction takes the one write lock as it begins, and the three
    processes' reads would queue for it behind each other's writes (SQLite's busy handler is no
    queue: a long waiter polls every 100 ms while newcomers take the lock between its polls).
    These begin deferred instead: a WAL reader, which sees the last commit and waits for nobody.
    They run with ``PRAGMA query_only`` on, so a write slipped into one fails at once rather than
    trying to upgrade its read lock (which SQLite refuses while another writer is about). On
    PostgreSQL they are ``READ ONLY`` transactions, which refuse a write just the same.
    """
    if engine.dialect.name == "postgresql":
        return engine.execution_options(**{READ_ONLY: True}, postgresql_readonly=True)
    return engine.execution_options(**{READ_ONLY: True})


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    return config


def migrate(url: str) -> None:
    """Bring the schema to head (synchronous; Alembic's env runs the async engine itself)."""
    command.upgrade(alembic_config(url), "head")


async def migrate_async(url: str) -> None:
    await asyncio.to_thread(migrate, url)
