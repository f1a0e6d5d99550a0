"""``trialwatch import FILE.ndjson`` (CONTRACT.md section 1) against a real HTTP server of the ingest API."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.workload import enrolment, import_lines, lab, ndjson
from services.ingest import import_cmd
from services.ingest.app import create_app
from shared.embedded_nats import free_port
from shared.events import patient_stream
from shared.settings import Settings
from shared.store import eventstore
from tests.support.api import new_token, subject


@contextmanager
def serving(database_url: str, tmp_path: Path) -> Iterator[str]:
    """The ingest API on a port of its own, in a thread (its own event loop and engine)."""
    app = create_app(Settings(data_dir=tmp_path, database_url=database_url))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture
def api_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    with serving(database_url, tmp_path) as url:
        yield url


def trialwatch(*args: str, token: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALWATCH_")} | {"TRIALWATCH_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "services", *args], env=env, capture_output=True, text=True,
                          timeout=120)


async def stream_types(engine: AsyncEngine, subject_id: str) -> list[str]:
    async with engine.connect() as conn:
        return [e.type for e in await eventstore.read_stream(conn, patient_stream(subject_id))]


async def test_import_prints_the_accepted_count_and_each_rejected_line(
        api_url: str, engine: AsyncEngine, tmp_path: Path) -> None:
    token = await new_token(engine, "site_staff", "S01")
    sid = subject()
    file = tmp_path / "records.ndjson"
    file.write_bytes(ndjson([{"type": "enrolment", **enrolment(sid)}, {"subject_id": sid, **lab()},
                             {"subject_id": sid, **lab(), "unit": "g/dL"}, {"subject_id": sid, **lab(0.3)}]))

    done = trialwatch("import", str(file), "--url", api_url, token=token)

    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "accepted 3 of 4 lines"
    assert lines[1].startswith("line 3: 422 unit:")
    assert "importing" not in done.stdout  # no progress bar when stdout is not a terminal
    assert await stream_types(engine, sid) == ["patient_enrolled", "lab", "lab"]


async def test_import_without_a_token_or_a_server_fails_plainly(api_url: str, tmp_path: Path) -> None:
    file = tmp_path / "records.ndjson"
    file.write_bytes(ndjson([{"subject_id": "S01-x", **lab()}]))
    assert trialwatch("import", str(file), "--url", api_url, token="").returncode == 2
    refused = trialwatch("import", str(file), "--url", api_url, token="not-a-token")
    assert refused.returncode == 2 and "401" in refused.stderr
    down = trialwatch("import", str(file), "--url", f"http://127.0.0.1:{free_port()}", token="x")
    assert down.returncode == 2 and "cannot be reached" in down.stderr


async def test_a_long_file_goes_in_chunks_numbered_as_in_the_file_and_a_rerun_stores_nothing_twice(
        api_url: str, engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(import_cmd, "CHUNK_LINES", 3)
    token = await new_token(engine, "site_staff", "S01")
    subjects = [subject(), subject()]
    records: list[dict[str, object] | str] = [*import_lines(subjects, 6)]
    records.insert(5, {"subject_id": "S01-nobody", **lab()})  # line 6
    file = tmp_path / "long.ndjson"
    file.write_bytes(ndjson(records))
    seen: list[int] = []

    first = import_cmd.import_file(file, url=api_url, token=token, progress=seen.append)
    again = import_cmd.import_file(file, url=api_url, token=token)

    assert (first.accepted, first.lines, sum(seen), len(seen)) == (8, 9, 9, 3)
    assert [(r["line"], r["status"]) for r in first.rejected] == [(6, 404)]
    assert (again.accepted, again.rejected) == (first.accepted, first.rejected)
    assert [len(await stream_types(engine, s)) for s in subjects] == [4, 4]
