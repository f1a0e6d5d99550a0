"""A service's long-running loops (relay, sender, sweeps): started after the broker, stopped before it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Background:
    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self, work: Coroutine[Any, Any, Any]) -> None:
        self.stop.clear()
        self._tasks.append(asyncio.create_task(work))

    async def close(self) -> None:
        """Ask the loops to stop, cancel them, and wait until they have."""
        self.stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
