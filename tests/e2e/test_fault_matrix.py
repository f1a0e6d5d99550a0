"""The fault matrix, short form (issue 9): 50 records per fault while each service, the broker, the
database's connections and SMTP fail for 2 s in turn; no acknowledged record lost, every urgent
event mailed exactly once to each investigator, no duplicate mail, no dead letter.

The full form is one command: ``.venv/bin/python -m tests.fault_matrix --full`` (see that module).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault_matrix import SHORT, Matrix, table

pytestmark = pytest.mark.e2e


async def test_no_fault_loses_an_acknowledged_record_or_an_urgent_mail_nor_sends_one_twice(
        own_database_url: str, tmp_path: Path) -> None:
    matrix = Matrix(own_database_url, tmp_path, SHORT)
    rows = await matrix.run()
    report = table(rows, f"== fault matrix (short form), {own_database_url.split(':')[0]}")
    print("\n" + report)
    assert not matrix.failures(), report + "\n" + "\n".join(matrix.failures()) + f"\nservice logs in {tmp_path}"
