"""``trialwatch token create`` (CONTRACT.md section 1): migrates, stores the hash, returns the token."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from services.ingest.app import create_app
from services.ingest.auth import token_hash
from services.ingest.tokens_cmd import create_token_cli
from shared.settings import Settings
from shared.store.engine import make_engine
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
