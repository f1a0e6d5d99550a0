"""What the safety service does on every patient event, by trial size: fold every patient's
history and evaluate the stopping rules (the store read is measured separately, on SQLite).

``.venv/bin/python bench/bench_fold.py``
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.clinical.patient import fold_patient  # noqa: E402
from shared.clinical.stopping import evaluate_rules  # noqa: E402
from shared.patients import load_patient_states  # noqa: E402
from shared.store import eventstore  # noqa: E402
from shared.store.engine import make_engine, migrate_async  # noqa: E402
from tests.unit.patient_history import PROTOCOL, History, at  # noqa: E402

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def patient(i: int) -> History:
    """About 30 events: a course of 14 doses, DLI, CRS, labs, an assessment, follow-up."""
    start = date(2025, 3, 3) + timedelta(days=i % 200)
    history = History(enrolled=start - timedelta(days=1))
    history.course(1, start, 14)
    history.crs(at(start + timedelta(days=2)), 2 + (i % 3 == 0))
    for k in range(6):
        history.lab(at(start + timedelta(days=2 * k)), "neutrophils", 0.8, 3)
    history.assessment(at(start + timedelta(days=13)), "day14")
    history.dli(at(start + timedelta(days=16)))
    history.follow_up(at(start + timedelta(days=60)))
    return history


def seconds(work, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


async def store_read_seconds(histories: list[History]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        await migrate_async(url)
        engine = make_engine(url)
        async with engine.begin() as conn:
            for h in histories:
                await eventstore.append(conn, f"patient-{h.subject_id}", [
                    eventstore_event(e) for e in h.events])
        began = time.perf_counter()
        async with engine.connect() as conn:
            await load_patient_states(conn, PROTOCOL, now=NOW)
        took = time.perf_counter() - began
        await engine.dispose()
        return took


def eventstore_event(e):  # type: ignore[no-untyped-def]
    from shared.events import NewEvent

    return NewEvent(event_id=e.event_id, type=e.type, subject_id=e.subject_id, occurred_at=e.occurred_at,
                    recorded_by=e.recorded_by, data=e.data)


def main() -> None:
    print(f"{'patients':>8} | {'events':>6} | {'fold one (ms)':>13} | {'fold all + rules (ms)':>21} | {'read+fold all, SQLite (ms)':>26}")
    for n in (30, 100, 300):
        histories = [patient(i) for i in range(n)]
        events = sum(len(h.events) for h in histories)
        one = seconds(lambda: fold_patient(histories[0].events, PROTOCOL, now=NOW))
        everything = seconds(lambda: evaluate_rules(PROTOCOL, [fold_patient(h.events, PROTOCOL, now=NOW) for h in histories]))
        read = asyncio.run(store_read_seconds(histories))
        print(f"{n:>8} | {events:>6} | {one * 1000:>13.2f} | {everything * 1000:>21.1f} | {read * 1000:>26.1f}")


if __name__ == "__main__":
    main()
