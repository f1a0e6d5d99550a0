"""A second process for ``trialwatch replay``: it replays its own share of the patients.

Folding and deciding a patient is pure Python, a few hundred microseconds, and one process does
it more slowly than PostgreSQL hands the rows over: on a machine with a second core, the replay
splits the patients in two by subject id and a forked copy of this process replays the later half
(its own scan, its own bulkheads, its own transactions) while this one replays the first.

- Nothing but the count of patients comes back: no rows or decisions travel between processes
  (pickling them cost more than folding saved).
- Forked, the child starts in milliseconds with the protocol and every module loaded. It opens
  its own connections (a new engine on the same URL) in its own event loop and never touches the
  parent's.
- If the child dies or fails, ``result`` says so (None) and the caller replays its share itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

from services.safety.handlers import SafetyMonitor
from shared.store.engine import make_engine

log = logging.getLogger(__name__)

Share = Callable[[SafetyMonitor], Awaitable[int]]  # a share of the replay, run with the child's own monitor


def available() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Claims:
    """Shares of work numbered 0..n-1, taken from the front by one process and from the back by
    the other (memory shared across the fork), each taken once."""

    def __init__(self, shares: int) -> None:
        self._next = multiprocessing.get_context("fork").Array("i", [0, shares - 1, shares])  # front, back, n

    def from_front(self) -> int | None:
        with self._next.get_lock():
            front, back = self._next[0], self._next[1]
            if front > back:
                return None
            self._next[0] = front + 1
            return int(front)

    def from_back(self) -> int | None:
        with self._next.get_lock():
            front, back = self._next[0], self._next[1]
            if front > back:
                return None
            self._next[1] = back - 1
            return int(back)

    def taken_from_back(self) -> list[int]:
        with self._next.get_lock():
            return list(range(self._next[1] + 1, self._next[2]))


class Forked:
    def __init__(self, process: Any, answers: Connection) -> None:
        self.process, self.answers = process, answers

    def stop(self) -> None:
        """End it (the caller is giving up on the replay)."""
        self.process.terminate()
        self.process.join()
        self.answers.close()

    async def result(self) -> int | None:
        """How many patients the child replayed, once it has ended; None if it failed."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(self.process.sentinel, readable)
        try:
            await ended
        finally:
            loop.remove_reader(self.process.sentinel)
        self.process.join()
        with contextlib.closing(self.answers):
            try:
                answer = self.answers.recv()
            except EOFError:  # it ended without a word
                return None
        return answer if isinstance(answer, int) and self.process.exitcode == 0 else None


def start(monitor: SafetyMonitor, share: Share) -> Forked:
    """Fork; the child runs ``share`` with a monitor on connections of its own and sends its count."""
    answers, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    url = monitor.engine.url.render_as_string(hide_password=False)
    process = multiprocessing.get_context("fork").Process(
        target=_child, args=(url, monitor, share, send), name="trialwatch-replay", daemon=True)
    process.start()
    send.close()
    return Forked(process, answers)


def _child(url: str, monitor: SafetyMonitor, share: Share, send: Connection) -> None:
    # Forked from inside the parent's running event loop: that loop is the parent's (Python 3.12
    # forgets it in the child by itself; 3.11 does not).
    asyncio._set_running_loop(None)

    async def run() -> int:
        engine = make_engine(url)
        try:
            return await share(SafetyMonitor(engine, monitor.protocol, monitor.clock))
        finally:
            await engine.dispose()

    try:
        send.send(asyncio.run(run()))
    except BaseException:
        log.exception("replay: the second process failed")
        raise
    finally:
        send.close()
