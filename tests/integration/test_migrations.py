"""The Alembic history builds exactly the schema the code declares (no table or column drifts)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.store.tables import metadata


async def test_the_migrated_database_matches_the_declared_schema(engine: AsyncEngine) -> None:
    def differences(connection):  # type: ignore[no-untyped-def]
        context = MigrationContext.configure(connection, opts={"compare_type": False})
        return compare_metadata(context, metadata)

    async with engine.connect() as conn:
        assert await conn.run_sync(differences) == []
