"""Many patients' read-model rows replaced at once (``trialwatch replay``): their old projection,
due check, rule inputs and failure rows go, the new ones come, in the caller's transaction.

PostgreSQL gets two statements whatever the number of patients (the rows travel as arrays and
``unnest`` back into rows, as the event store's flush does); SQLite one statement per table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, text
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.store.tables import due_checks, patient_failures, patient_projection, rule_inputs

TABLES = (patient_projection, due_checks, rule_inputs, patient_failures)
PROJECTION = ("subject_id", "site_id", "state", "last_position", "updated_at", "last_recorded_at")
RULE_INPUT = ("rule_id", "subject_id", "arm", "event", "evaluable_at", "counts_from")


@dataclass
class Rows:
    """The new rows of a set of patients (``subjects``: every patient whose old rows go)."""

    subjects: list[str] = field(default_factory=list)
    projections: list[dict[str, Any]] = field(default_factory=list)
    due: list[dict[str, Any]] = field(default_factory=list)  # subject_id, check, due_at (UTC), done
    rule_inputs: list[dict[str, Any]] = field(default_factory=list)


async def replace(conn: AsyncConnection, rows: Rows) -> None:
    if not rows.subjects:
        return
    if conn.dialect.name == "postgresql":
        await _replace_pg(conn, rows)
        return
    for table in TABLES:
        await conn.execute(delete(table).where(table.c.subject_id.in_(rows.subjects)))
    for table, new in ((patient_projection, rows.projections), (due_checks, rows.due),
                       (rule_inputs, rows.rule_inputs)):
        if new:
            await conn.execute(insert(table), new)


_PG_DELETE = text(" ".join(
    [f"WITH {', '.join(f'gone_{t.name} AS (DELETE FROM {t.name} WHERE subject_id = ANY(CAST(:subjects AS varchar[])))' for t in TABLES[:-1])}",
     f"DELETE FROM {TABLES[-1].name} WHERE subject_id = ANY(CAST(:subjects AS varchar[]))"]))
# One statement cannot delete a row and insert its key again (both see the same snapshot): two.
_PG_INSERT = text("""
WITH new_projections AS (
    INSERT INTO patient_projection (subject_id, site_id, state, last_position, updated_at, last_recorded_at)
    SELECT * FROM unnest(CAST(:p_subject_id AS varchar[]), CAST(:p_site_id AS varchar[]), CAST(:p_state AS json[]),
                         CAST(:p_last_position AS bigint[]), CAST(:p_updated_at AS timestamptz[]),
                         CAST(:p_last_recorded_at AS timestamptz[]))
), new_due AS (
    INSERT INTO due_checks (subject_id, "check", due_at, done)
    SELECT * FROM unnest(CAST(:d_subject_id AS varchar[]), CAST(:d_check AS varchar[]),
                         CAST(:d_due_at AS timestamptz[]), CAST(:d_done AS boolean[]))
)
INSERT INTO rule_inputs (rule_id, subject_id, arm, event, evaluable_at, counts_from)
SELECT * FROM unnest(CAST(:r_rule_id AS varchar[]), CAST(:r_subject_id AS varchar[]), CAST(:r_arm AS varchar[]),
                     CAST(:r_event AS boolean[]), CAST(:r_evaluable_at AS timestamptz[]),
                     CAST(:r_counts_from AS timestamptz[]))
""")


def _columns(prefix: str, names: tuple[str, ...], rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {f"{prefix}_{name}": [row[name] for row in rows] for name in names}


async def _replace_pg(conn: AsyncConnection, rows: Rows) -> None:
    await conn.execute(_PG_DELETE, {"subjects": rows.subjects})
    projections = [{**p, "state": json.dumps(p["state"])} for p in rows.projections]
    await conn.execute(_PG_INSERT, _columns("p", PROJECTION, projections)
                       | _columns("d", ("subject_id", "check", "due_at", "done"), rows.due)
                       | _columns("r", RULE_INPUT, rows.rule_inputs))
