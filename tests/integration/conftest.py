"""Fixtures of the ingest API tests: the app in-process over the session's database, and tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.app import create_app
from shared.protocol import Protocol
from shared.settings import Settings
from tests.support.api import new_token


@pytest.fixture
def settings(tmp_path: Any) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
async def client(settings: Settings, engine: AsyncEngine, protocol: Protocol) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, engine=engine, protocol=protocol)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
        yield client


@pytest.fixture(scope="session")
async def tokens(engine: AsyncEngine) -> dict[str, str]:
    return {
        "admin": await new_token(engine, "admin"),
        "investigator": await new_token(engine, "investigator"),
        "dsmb": await new_token(engine, "dsmb"),
        "staff_s01": await new_token(engine, "site_staff", "S01"),
        "staff_s02": await new_token(engine, "site_staff", "S02"),
    }
