"""How often the trial's follower looks: once a second on either store (services/safety/follower.py)."""

import pytest

from services.safety.app import SafetyService
from shared.settings import Settings
from shared.store.engine import make_engine


@pytest.mark.parametrize("url", ["sqlite+aiosqlite:///:memory:", "postgresql+asyncpg://nobody@127.0.0.1:1/none"])
async def test_the_safety_services_follower_looks_once_a_second(url: str) -> None:
    engine = make_engine(url)  # never connected
    try:
        service = SafetyService(Settings(_env_file=None), nats_url="nats://127.0.0.1:1", engine=engine)
        assert service.follower.interval == 1.0
    finally:
        await engine.dispose()
