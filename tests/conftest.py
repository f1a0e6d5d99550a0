from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.protocol import Protocol, load_protocol
from shared.store.engine import make_engine, migrate
from tests.support.services import fresh_database


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_database(tmp_path_factory.mktemp("db")) as url:
        migrate(url)
        yield url


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def own_database_url(tmp_path: Path) -> Iterator[str]:
    """A database for one test alone: for tests of trial-wide state (stopping rules, the digest
    baseline), which other tests' patients would disturb."""
    with fresh_database(tmp_path / "own-db") as url:
        migrate(url)
        yield url


@pytest.fixture
async def own_engine(own_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(own_database_url)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def protocol() -> Protocol:
    return load_protocol()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path
