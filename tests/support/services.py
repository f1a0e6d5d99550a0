"""Finding the real services a test session talks to.

Order, for each service: an explicit URL in the environment; a container through testcontainers
where a Docker engine answers; the embedded one (SQLite file, a ``nats-server`` child process).
Each session gets a fresh database and fresh stream names, so no test sees another's leftovers.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url


def docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


async def _admin(server_url: str, statement: str) -> None:
    """Run one statement on the server's maintenance database (CREATE / DROP DATABASE)."""
    url = make_url(server_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username or "postgres",
        password=url.password, database=url.database or "postgres",
    )
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _create_database(server_url: str, name: str) -> None:
    await _admin(server_url, f'CREATE DATABASE "{name}"')


async def _drop_database(server_url: str, name: str) -> None:
    await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_database(tmp_dir: Path) -> Iterator[str]:
    """Yield an async SQLAlchemy URL to a database nobody else uses."""
    server = os.environ.get("TRIALWATCH_TEST_DATABASE_URL")
    if server is None and docker_available():  # pragma: no cover - no Docker engine in CI here
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver="asyncpg") as pg:
            yield pg.get_connection_url()
        return
    if server is None or server.startswith("sqlite"):
        yield f"sqlite+aiosqlite:///{tmp_dir / 'trialwatch-test.db'}"
        return
    name = f"tw_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_database(server, name))
    try:
        yield make_url(server).set(database=name, drivername="postgresql+asyncpg").render_as_string(
            hide_password=False
        )
    finally:
        asyncio.run(_drop_database(server, name))
