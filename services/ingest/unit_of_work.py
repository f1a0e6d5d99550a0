"""The unit of work: one transaction per command, the only place that commits.

It also keeps the command's Idempotency-Key in that transaction: looked up first (a replay
answers from it and runs nothing), written last, beside the events the command appended.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.ingest.idempotency import Answer, IdempotencyKey, KeyTaken, recall, remember

T = TypeVar("T")


class UnitOfWork:
    def __init__(self, engine: AsyncEngine, clock: Callable[[], datetime],
                 on_commit: Callable[[Answer], None] = lambda answer: None) -> None:
        self.engine, self.clock, self.on_commit = engine, clock, on_commit

    async def run(self, work: Callable[[AsyncConnection], Awaitable[T]], present: Callable[[T], Answer],
                  key: IdempotencyKey | None = None) -> Answer:
        """Run ``work`` in one transaction and answer ``present(result)``; commit only on success."""
        for _ in range(3):
            try:
                answer = await self._once(work, present, key)
            except KeyTaken:
                continue  # the racing request committed: the next round replays its answer
            if not answer.replayed:
                self.on_commit(answer)
            return answer
        raise RuntimeError("Idempotency-Key raced three times")

    async def _once(self, work: Callable[[AsyncConnection], Awaitable[T]], present: Callable[[T], Answer],
                    key: IdempotencyKey | None) -> Answer:
        async with self.engine.begin() as conn:
            if key is not None and (earlier := await recall(conn, key, self.clock())) is not None:
                return earlier
            answer = present(await work(conn))
            if key is not None:
                await remember(conn, key, answer, self.clock())
            return answer
