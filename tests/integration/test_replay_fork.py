"""``trialwatch replay``'s second process: it tells its count, or that it failed (the replay then
does its share itself, services/safety/replay.py)."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.safety import replay_fork
from services.safety.handlers import SafetyMonitor
from shared.protocol import Protocol
from shared.store.eventstore import now_utc
from shared.store.tables import events


async def test_the_second_process_works_on_connections_of_its_own_and_tells_its_count(
        own_engine: AsyncEngine, protocol: Protocol) -> None:
    monitor = SafetyMonitor(own_engine, protocol, now_utc)

    async def count_events(forked: SafetyMonitor) -> int:
        assert forked.engine is not monitor.engine and forked.protocol == protocol
        async with forked.engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(events)) or 0) + 1000

    async with own_engine.connect() as conn:
        stored = int(await conn.scalar(select(func.count()).select_from(events)) or 0)
    assert await replay_fork.start(monitor, count_events).result() == stored + 1000


async def test_a_second_process_that_fails_says_so(own_engine: AsyncEngine, protocol: Protocol) -> None:
    async def failing(forked: SafetyMonitor) -> int:
        raise RuntimeError("the store went away")

    assert await replay_fork.start(SafetyMonitor(own_engine, protocol, now_utc), failing).result() is None


async def test_a_second_process_can_be_stopped(own_engine: AsyncEngine, protocol: Protocol) -> None:
    async def endless(forked: SafetyMonitor) -> int:
        while True:
            await asyncio.sleep(1)

    forked = replay_fork.start(SafetyMonitor(own_engine, protocol, now_utc), endless)
    forked.stop()
    assert not forked.process.is_alive()


def test_shares_are_taken_from_either_end_each_once() -> None:
    claims = replay_fork.Claims(5)
    taken = [claims.from_front(), claims.from_back(), claims.from_back(), claims.from_front(), claims.from_front()]
    assert taken == [0, 4, 3, 1, 2]
    assert claims.from_front() is None and claims.from_back() is None
    assert claims.taken_from_back() == [3, 4]
