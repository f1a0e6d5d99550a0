"""Insert-or-update on one key, for the read models (PostgreSQL and SQLite both speak it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection


async def upsert(conn: AsyncConnection, table: Table, values: dict[str, Any], keys: Sequence[str]) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(**values)
    statement = statement.on_conflict_do_update(
        index_elements=list(keys), set_={k: v for k, v in values.items() if k not in keys}
    )
    await conn.execute(statement)


async def upsert_returning(
    conn: AsyncConnection, table: Table, values: dict[str, Any], keys: Sequence[str], *, increment: str
) -> int:
    """Insert ``values``, or add the inserted ``increment`` column to the stored one; the result."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    column = table.c[increment]
    statement = dialect.insert(table).values(**values)
    statement = statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={k: (column + statement.excluded[increment]) if k == increment else v
              for k, v in values.items() if k not in keys},
    ).returning(column)
    return int((await conn.execute(statement)).scalar_one())


async def upsert_many(conn: AsyncConnection, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """``upsert`` of many rows (all with the same columns) in one statement."""
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table)
    statement = statement.on_conflict_do_update(
        index_elements=list(keys), set_={k: statement.excluded[k] for k in rows[0] if k not in keys})
    await conn.execute(statement, list(rows))
