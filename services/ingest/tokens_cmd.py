"""``trialwatch token create``: a new API token, whether or not the services are running."""

from __future__ import annotations

from services.ingest.auth import create_token
from shared.settings import Settings
from shared.store.engine import make_engine, migrate_async


async def create_token_cli(settings: Settings, user: str, role: str, site: str | None) -> str:
    """Migrate the store (a fresh machine has no tables yet), store the token's hash, return the
    token. Prints nothing: the caller prints it, alone on the last line."""
    url = settings.resolved_database_url
    await migrate_async(url)
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            return await create_token(conn, user=user, role=role, site_id=site)
    finally:
        await engine.dispose()
