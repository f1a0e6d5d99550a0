from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.notify.capture import MailCapture
from shared.embedded_nats import EmbeddedNats
from tests.support.system import RunningSystem, nats_url_from_env, session_settings, start_system, stop_system


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An explicit URL from the environment, else a nats-server child process (no Docker here)."""
    url = nats_url_from_env()
    if url:
        yield url
        return
    server = EmbeddedNats(tmp_path_factory.mktemp("nats")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def capture(tmp_path: Path) -> AsyncIterator[MailCapture]:
    async with MailCapture(tmp_path, host="127.0.0.1", port=0) as mail:
        yield mail


@pytest.fixture
async def system(tmp_path: Path, own_engine: AsyncEngine, nats_url: str, capture: MailCapture) -> AsyncIterator[RunningSystem]:
    settings = session_settings(tmp_path, nats_url, capture.url)
    running = await start_system(settings, own_engine, capture)
    try:
        yield running
    finally:
        await stop_system(running)
