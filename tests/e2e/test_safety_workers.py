"""Three safety workers share the trial, and one is killed in the middle of the load.

The workers are real processes (``trialwatch safety``) on the test's database and stream; the API
and the notifier run in the test. Patients go to whichever worker fetches their events; the
stopping rules and due checks run in the one that holds the follower's lease. The leader is
killed (SIGKILL) a third of the way through: its batch in flight comes back to the others after
the ack wait, another worker takes the lease over, and every urgent event is still mailed to each
investigator exactly once; nothing is dead-lettered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.notify.capture import MailCapture
from shared.bus import ensure_stream
from shared.events import ALERT_RAISED
from shared.settings import Settings
from shared.store.tables import dead_letters, events, leases
from tests.support.clinical import at, crs, dose, enrolment, subject_id
from tests.support.faults import names_of, settled
from tests.support.system import INVESTIGATORS, RunningSystem, eventually, session_settings, start_system, stop_system

pytestmark = pytest.mark.e2e

WORKERS = 3
PATIENTS = 12
ACK_WAIT_S = 5.0


def worker_env(settings: Settings, database_url: str) -> dict[str, str]:
    return {**os.environ, "TRIALWATCH_DATABASE_URL": database_url, "TRIALWATCH_NATS_URL": settings.nats_url or "",
            "TRIALWATCH_STREAM_NAME": settings.stream_name, "TRIALWATCH_SUBJECT_PREFIX": settings.subject_prefix,
            "TRIALWATCH_DATA_DIR": str(settings.data_dir), "TRIALWATCH_ACK_WAIT_S": str(ACK_WAIT_S),
            "TRIALWATCH_MAX_DELIVER": "3"}


@pytest.fixture
def workers(system: RunningSystem, own_engine: AsyncEngine) -> Iterator[list[subprocess.Popen[bytes]]]:
    url = own_engine.url.render_as_string(hide_password=False)
    env = worker_env(system.settings, url)
    started = [subprocess.Popen([sys.executable, "-m", "services", "safety"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(WORKERS)]
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
async def system(tmp_path: Path, own_engine: AsyncEngine, nats_url: str,
                 capture: MailCapture) -> AsyncIterator[RunningSystem]:
    settings = session_settings(tmp_path, nats_url, capture.url, ack_wait_s=ACK_WAIT_S)
    await ensure_stream(nats_url, names_of(settings))
    running = await start_system(settings, own_engine, capture, with_safety=False)
    try:
        yield running
    finally:
        await stop_system(running)


async def post(system: RunningSystem, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with system.client("site_staff") as client:
        for _ in range(50):  # the API answers 503 while the store is busy: a client retries
            response = await client.post(path, json=body)
            if response.status_code != 503:
                break
            await asyncio.sleep(0.2)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def leader_pid(engine: AsyncEngine) -> int | None:
    async with engine.connect() as conn:
        holder = await conn.scalar(select(leases.c.holder))
    return int(holder.split("-")[-2]) if holder else None


async def raised_alerts(engine: AsyncEngine) -> Counter[str]:
    """How often each alert stream got a 'raised' event: never more than once here."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(events.c.stream_id).where(events.c.type == ALERT_RAISED))
        return Counter(r.stream_id for r in rows)


async def test_three_workers_one_killed_mid_load_lose_no_alert_and_send_none_twice(
        system: RunningSystem, workers: list[subprocess.Popen[bytes]], own_engine: AsyncEngine) -> None:
    pids = {p.pid for p in workers}
    leader = await eventually(lambda: leader_pid(own_engine), timeout=60)
    assert leader in pids

    subjects = [subject_id() for _ in range(PATIENTS)]
    for subject in subjects:
        await post(system, "/v1/patients", enrolment(subject, enrolled_at=at(0)))
        await post(system, f"/v1/patients/{subject}/events", dose(at(1)))

    # Each patient has a grade 3 CRS (urgent) and a grade 1 CRS (info); the leader dies a third
    # of the way through.
    for n, subject in enumerate(subjects):
        if n == PATIENTS // 3:
            os.kill(leader, signal.SIGKILL)
        await post(system, f"/v1/patients/{subject}/events", crs(at(2, 9), 1))
        await post(system, f"/v1/patients/{subject}/events", crs(at(3, 9), 3))

    # Another worker takes the lease over; everything is processed and mailed.
    await eventually(lambda: _new_leader(own_engine, leader), timeout=60)
    await eventually(lambda: settled(system), timeout=120, interval=0.5)

    for subject in subjects:
        urgent = [m for m in system.capture.messages() if subject in str(m["Subject"]) and "URGENT" in str(m["Subject"])]
        assert sorted(str(m["To"]) for m in urgent) == sorted(INVESTIGATORS), subject
    assert set((await raised_alerts(own_engine)).values()) == {1}
    async with own_engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(dead_letters)) == 0
    assert sum(p.poll() is None for p in workers) == WORKERS - 1


async def _new_leader(engine: AsyncEngine, dead: int) -> bool:
    pid = await leader_pid(engine)
    return pid is not None and pid != dead
