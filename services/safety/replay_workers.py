"""``trialwatch replay``'s patients decided in worker processes as well as read and written here.

The fold and the decision are pure Python, a few hundred microseconds a patient: one process
decides patients more slowly than the store hands them over, so the other cores decide too.

- Patients go out in chunks of ``CHUNK`` (their rows as plain tuples) and their answers come back
  in the order they went out: the replay writes exactly what deciding them here would have.
- Each patient is decoded and decided behind its own ``try`` (``decide_rows``): one that fails
  comes back with its error, to be set aside; the others of its chunk go on.
- ``now`` is read from the monitor's clock once per chunk, here.
- Workers are forked (they start in milliseconds, the protocol and every module already loaded);
  where there is no fork, or a worker dies, or a chunk's answer cannot come back, the chunks are
  decided here, the same way.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import multiprocessing
import os
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.safety.handlers import Decision, Known, SafetyMonitor, decide
from shared.events import ALERT_TYPES
from shared.protocol import Protocol
from shared.store import subject_scan

log = logging.getLogger(__name__)

CHUNK = 50  # patients per hand-over: a few hundred rows, tens of milliseconds of folding
AHEAD = 2  # chunks in flight per worker, so none waits for the next
Patient = tuple[str, Sequence[Sequence[Any]]]  # subject id, its rows as subject_scan reads them
Decided = tuple[str, Decision | None, str | None]  # subject id, its decision, why it is set aside


def known_of(rows: Sequence[Sequence[Any]]) -> Known:
    """One patient's rows as ``subject_scan`` read them, decoded: its stream and its alerts."""
    known = Known()
    for row in rows:
        event = subject_scan.decode(row)
        (known.alerts if event.type in ALERT_TYPES else known.history).append(event)
    return known


def decide_rows(protocol: Protocol, now: datetime, patients: Sequence[Patient]) -> list[Decided]:
    """Each patient decoded and decided at ``now``, each behind its own bulkhead."""
    decided: list[Decided] = []
    for subject_id, rows in patients:
        try:
            decided.append((subject_id, decide(protocol, known_of(rows), now), None))
        except Exception as exc:  # the patient's record: set aside when its batch is written
            decided.append((subject_id, None, f"{type(exc).__name__}: {exc}"))
    return decided


def workers_for(patients: int) -> int:
    """Worker processes worth starting for a replay of ``patients``: none for a small one."""
    if patients < 4 * CHUNK or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


async def decided(monitor: SafetyMonitor, patients: AsyncIterator[Patient], workers: int
                  ) -> AsyncGenerator[Decided, None]:
    """Every patient of ``patients`` decided, in the order given. With ``workers`` processes, a
    chunk goes to them while they have fewer than ``AHEAD`` each in hand, else it is decided here:
    on a machine whose other cores are busy this process keeps deciding at its own pace."""
    if workers < 1:
        async for chunk in _chunks(patients):
            for answer in decide_rows(monitor.protocol, monitor.clock(), chunk):
                yield answer
            await asyncio.sleep(0)  # the batch being written goes on meanwhile
        return
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                                initializer=_worker_started, initargs=(monitor.protocol,)) as pool:
        queue: collections.deque[_Slot] = collections.deque()  # in the patients' order
        async for chunk in _chunks(patients):
            now = monitor.clock()
            if sum(slot.away for slot in queue) < AHEAD * workers:
                queue.append(_Slot(chunk, now, asyncio.wrap_future(pool.submit(_decide_in_worker, now, chunk))))
            else:
                queue.append(_Slot(chunk, now, None, decide_rows(monitor.protocol, now, chunk)))
            while queue and queue[0].ready:
                for answer in await queue.popleft().answers(monitor.protocol):
                    yield answer
            await asyncio.sleep(0)  # answers come in, the batch being written goes on
        while queue:
            for answer in await queue.popleft().answers(monitor.protocol):
                yield answer


@dataclass
class _Slot:
    """A chunk of patients: decided here (``decided``), or by a worker (``future``)."""

    chunk: list[Patient]
    now: datetime
    future: asyncio.Future[list[Decided]] | None
    decided: list[Decided] | None = None

    @property
    def away(self) -> bool:
        return self.future is not None and not self.future.done()

    @property
    def ready(self) -> bool:
        return not self.away

    async def answers(self, protocol: Protocol) -> list[Decided]:
        if self.decided is not None:
            return self.decided
        assert self.future is not None
        try:
            return await self.future
        except Exception as exc:  # the worker died, or the answer could not travel: decide them here
            log.warning("replay: a worker could not decide %d patients (%s: %s); deciding them here",
                        len(self.chunk), type(exc).__name__, exc)
            return decide_rows(protocol, self.now, self.chunk)


async def _chunks(patients: AsyncIterator[Patient]) -> AsyncIterator[list[Patient]]:
    chunk: list[Patient] = []
    async for subject_id, rows in patients:
        chunk.append((subject_id, [tuple(row) for row in rows]))
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_protocol: Protocol | None = None  # the worker's


def _worker_started(protocol: Protocol) -> None:
    global _protocol
    _protocol = protocol


def _decide_in_worker(now: datetime, chunk: list[Patient]) -> list[Decided]:
    assert _protocol is not None, "started by _worker_started"
    return decide_rows(_protocol, now, chunk)
