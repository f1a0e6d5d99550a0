"""Engines and migrations. Built by functions at start-up, never at import."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
READ_ONLY = "trialwatch_read_only"  # the execution option ``reader`` sets
BUSY_TIMEOUT_MS = 30_000  # how long a SQLite statement waits for a lock before "database is locked"
LOCK_POLL_MS = 5  # a writer waiting for SQLite's write lock tries again at least this often


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
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cursor.close()
            record.info[READ_ONLY] = False  # a new connection writes (query_only is off)

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: Any) -> None:
            reading = bool(conn.get_execution_options().get(READ_ONLY))
            if conn.info.get(READ_ONLY) != reading:  # the pooled connection served the other kind last
                conn.exec_driver_sql(f"PRAGMA query_only={int(reading)}")
                conn.info[READ_ONLY] = reading
            if reading:
                conn.exec_driver_sql("BEGIN")
            else:
                _begin_immediate(conn)

        return engine
    # No ping per checkout (a round trip on every request): connections are recycled after half an
    # hour, and a connection found dead (the server restarted) fails its statement with a
    # disconnect error, which makes SQLAlchemy drop the whole pool; the request answers 503 and the
    # group commit runs the batch's writes again on fresh connections.
    kwargs.setdefault("pool_recycle", 1800)
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 20)
    return create_async_engine(url, **kwargs)


def _begin_immediate(conn: Any) -> None:
    """``BEGIN IMMEDIATE``, asking for the write lock every few milliseconds while it is taken.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ... then 100 ms between tries, so a
    writer that has waited a while looks only ten times a second, and the writers that come and
    go between its looks (the ingest's group commit takes the lock again the moment it let it go)
    keep it waiting for seconds: at 250 events/s every writer's wait had a p99 near one second.
    Here the busy handler waits at most ``LOCK_POLL_MS`` at a time, and the loop, in aiosqlite's
    thread (no round trip to the event loop a try), asks again until the connection's busy
    timeout is spent; then the plain statement runs once more, without waiting, so a lock held
    for good fails as it always did.
    """
    driver = conn.connection.driver_connection
    take = getattr(driver, "_execute", None)  # aiosqlite's "run this in the connection's thread"
    if take is None or not isinstance(getattr(driver, "_conn", None), sqlite3.Connection):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        return
    taken, patience_ms = await_(take(_take_write_lock, driver._conn))
    if taken:
        return
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # raises as SQLAlchemy raises a statement's error
    finally:
        conn.exec_driver_sql(f"PRAGMA busy_timeout={patience_ms}")


def _take_write_lock(db: sqlite3.Connection) -> tuple[bool, int]:
    """In the connection's own thread: (True, its busy timeout) once ``BEGIN IMMEDIATE`` succeeded;
    False if the lock stayed taken for the busy timeout or the statement failed otherwise, with
    the busy timeout left at 0 for the caller's last try."""
    patience_ms = int(db.execute("PRAGMA busy_timeout").fetchone()[0])
    deadline, taken = time.monotonic() + patience_ms / 1000, False
    db.execute(f"PRAGMA busy_timeout={min(LOCK_POLL_MS, patience_ms)}")
    try:
        while not taken:
            try:
                db.execute("BEGIN IMMEDIATE")
                taken = True
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    break
    finally:
        db.execute(f"PRAGMA busy_timeout={patience_ms if taken else 0}")
    return taken, patience_ms


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
