"""Safety pace (issue 8): does the safety service keep up however large the trial is?

For each trial size it builds a store of that many patients (enrolment, a course, a lab), rebuilds
the read models with ``replay``, then appends the same number of new events (labs on random
patients, one in 25 a grade 3 CRS) and times the safety service on them two ways:
- batched, as the consumer runs now: ``on_batch`` over a batch, the trial follower at most every 0.25 s;
- one at a time: each event in its own transaction, the rules right after (the old consumer's shape).
Each figure is printed beside its baseline from the same run, with the ratio: events/s at the
large trial against the small one; replay against an asyncpg cursor + pydantic decode of the same
rows (PostgreSQL); the DSMB summary's build time at the large size.

``bench/run`` runs it small; ``--full`` runs the issue's sizes (3,000 patients, 10,000 for the
summary). ``--db sqlite`` runs it on the embedded default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine  # noqa: E402

from services.notify.digests import DigestService  # noqa: E402
from services.safety.follower import Lease, TrialFollower, bump_rule_inputs  # noqa: E402
from services.safety.handlers import SafetyMonitor  # noqa: E402
from shared.events import NewEvent, StoredEvent  # noqa: E402
from shared.store import eventstore  # noqa: E402
from shared.store.engine import make_engine, migrate_async  # noqa: E402
from shared.store.tables import due_checks, events, patient_projection, rule_inputs  # noqa: E402
from tests.unit.patient_history import PROTOCOL, History, at  # noqa: E402

NOW = datetime(2026, 6, 1, tzinfo=UTC)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
# Events per batch. Each batch of the load names this many different patients, in the small trial
# too, so the comparison is of the trial's size, not of how often one batch repeats a patient.
BATCH = 25


def history(i: int) -> History:
    start = date(2025, 3, 3) + timedelta(days=i % 300)
    h = History(enrolled=start - timedelta(days=1))
    h.course(1, start, 5)
    h.lab(at(start + timedelta(days=2)), "neutrophils", 2.0, 0)
    return h


def new_event(e: StoredEvent) -> NewEvent:
    return NewEvent(event_id=e.event_id, type=e.type, subject_id=e.subject_id, occurred_at=e.occurred_at,
                    recorded_by=e.recorded_by, data=e.data)


async def populate(engine: AsyncEngine, patients: int) -> list[str]:
    subjects = []
    for begin in range(0, patients, 200):
        async with engine.begin() as conn:
            for i in range(begin, min(begin + 200, patients)):
                h = history(i)
                subjects.append(h.subject_id)
                await eventstore.append(conn, f"patient-{h.subject_id}", [new_event(e) for e in h.events],
                                        recorded_at=NOW - timedelta(days=1))
    return subjects


async def append_load(engine: AsyncEngine, subjects: list[str], count: int) -> list[StoredEvent]:
    rng, stored = random.Random(7), []
    chosen = [s for _ in range(0, count, BATCH) for s in rng.sample(subjects, min(BATCH, len(subjects)))]
    async with engine.begin() as conn:
        for n in range(count):
            subject = chosen[n]
            urgent = n % 25 == 0
            data: dict[str, Any] = ({"grade": 3, "scale": "ASTCT-2019"} if urgent else
                                    {"test": "platelets", "value": 200.0, "unit": "10^9/L", "grade": 0,
                                     "scale": "CTCAE-5.0"})
            event = NewEvent(type="crs" if urgent else "lab", subject_id=subject, recorded_by="bench",
                             occurred_at=datetime(2025, 3, 20, 9, tzinfo=UTC) + timedelta(minutes=n), data=data)
            stored += await eventstore.append(conn, f"patient-{subject}", [event], recorded_at=NOW)
    return stored


async def count_events(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(events)) or 0)


async def timed(work: Callable[[], Awaitable[Any]]) -> float:
    began = time.perf_counter()
    await work()
    return time.perf_counter() - began


async def batched(engine: AsyncEngine, monitor: SafetyMonitor, follower: TrialFollower,
                  load: list[StoredEvent]) -> None:
    """The consumer's batches, and the follower as it runs beside them (``TrialFollower.run``):
    after a batch, but at most once an ``interval``; and once more at the end."""
    stepped = float("-inf")
    for begin in range(0, len(load), BATCH):
        async with engine.begin() as conn:
            cause = await monitor.on_batch(conn, load[begin:begin + BATCH])
            if cause is not None:
                await bump_rule_inputs(conn, cause)
        if time.perf_counter() - stepped >= follower.interval:
            stepped = time.perf_counter()
            await follower.step()
    await follower.step()


async def one_at_a_time(engine: AsyncEngine, monitor: SafetyMonitor, load: list[StoredEvent]) -> None:
    for event in load:
        async with engine.begin() as conn:
            await monitor.on_event(conn, event)


async def asyncpg_decode(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        count = 0
        async with conn.transaction():
            async for row in conn.cursor("SELECT * FROM events ORDER BY position", prefetch=5000):
                fields = dict(row)
                fields["data"] = json.loads(fields["data"])
                eventstore.to_stored(fields)  # the same decode the store does: row -> StoredEvent
                count += 1
        return count
    finally:
        await conn.close()


class Store:
    """A fresh database per trial size: PostgreSQL (a database of its own) or a SQLite file."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind, self.tmp, self.name = kind, tmp, f"tw_bench_{uuid.uuid4().hex[:8]}"

    @property
    def url(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite+aiosqlite:///{self.tmp}/{self.name}.db"
        return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self.name}"

    @property
    def plain_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:5432/{self.name}"

    async def __aenter__(self) -> AsyncEngine:
        if self.kind == "postgres":
            admin = await asyncpg.connect(PG_ADMIN)
            await admin.execute(f'CREATE DATABASE "{self.name}"')
            await admin.close()
        await migrate_async(self.url)
        self.engine = make_engine(self.url)
        return self.engine

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.dispose()
        if self.kind == "postgres":
            admin = await asyncpg.connect(PG_ADMIN)
            await admin.execute(f'DROP DATABASE "{self.name}" WITH (FORCE)')
            await admin.close()


async def measure(kind: str, patients: int, load_size: int, tmp: Path) -> dict[str, float]:
    async with Store(kind, tmp) as engine:
        subjects = await populate(engine, patients)
        monitor = SafetyMonitor(engine, PROTOCOL, lambda: NOW)
        await monitor.replay()  # the first one raises every alert these histories justify
        async with engine.begin() as conn:  # what `trialwatch replay` drops before it folds again
            for table in (patient_projection, rule_inputs, due_checks):
                await conn.execute(table.delete())
        figures = {"replay_s": await timed(lambda: monitor.replay()),
                   "events": float(await count_events(engine))}
        if kind == "postgres":
            figures["decode_s"] = await timed(lambda: asyncpg_decode(engine.url.render_as_string(False)
                                                                     .replace("+asyncpg", "")))
        load = await append_load(engine, subjects, load_size)
        follower = TrialFollower(engine, monitor, Lease(engine, f"bench-{uuid.uuid4().hex[:6]}"))
        await follower.lead()  # the leader's first sweep is start-up work, not the pace
        figures["batched_s"] = await timed(lambda: batched(engine, monitor, follower, load[: load_size // 2]))
        figures["single_s"] = await timed(lambda: one_at_a_time(engine, monitor, load[load_size // 2:]))
        figures["half"] = load_size / 2
        digests = DigestService(engine, None, PROTOCOL, recipients=[], mail_from="bench@localhost",  # type: ignore[arg-type]
                          clock=lambda: NOW)
        figures["summary_s"] = await timed(lambda: digests.build(NOW))
        return figures


def row(name: str, value: str, baseline: str, ratio: float | None, target: str) -> str:
    shown = f"{ratio:.2f}x" if ratio is not None else ""
    return f"| {name:<44} | {value:>18} | {baseline:>30} | {shown:>7} | {target:<14} |"


async def figures(small: int, large: int, load_size: int, summary_size: int, tmp: Path,
                  kind: str = "postgres") -> dict[str, dict[str, float]]:
    """The small trial (after a warm-up run of it), the large one, and the summary's trial."""
    await measure(kind, small, load_size, tmp)  # warm-up: the first run pays for connections and caches
    big = await measure(kind, large, load_size, tmp)
    s = await measure(kind, small, load_size, tmp)
    summary = big if summary_size == large else await measure(kind, summary_size, 50, tmp)
    return {"small": s, "large": big, "summary": summary}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the issue's sizes (slow)")
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    args = parser.parse_args()
    small, large = (30, 3000) if args.full else (30, 600)
    load_size = 600 if args.full else 200
    summary_size = 10_000 if args.full else 1000
    with tempfile.TemporaryDirectory() as tmp:
        found = await figures(small, large, load_size, summary_size, Path(tmp), args.db)
    s, big, summary = found["small"], found["large"], found["summary"]
    rate = {name: {k: v["half"] / v[f"{k}_s"] for k in ("batched", "single")} for name, v in (("s", s), ("l", big))}
    print(f"== safety pace on {args.db} ({'full' if args.full else 'small'} sizes)")
    print(row("figure", "value", "baseline (same run)", None, "target"))
    print(row("-" * 44, "-" * 18, "-" * 30, None, "-" * 14))
    print(row(f"safety, batched: events/s at {large} patients", f"{rate['l']['batched']:.0f}",
              f"{rate['s']['batched']:.0f} at {small} patients", rate["l"]["batched"] / rate["s"]["batched"], ">= 0.8x"))
    print(row(f"safety, one at a time: events/s at {large}", f"{rate['l']['single']:.0f}",
              f"{rate['s']['single']:.0f} at {small} patients", rate["l"]["single"] / rate["s"]["single"], ""))
    print(row(f"safety at {large}: batched vs one at a time", f"{rate['l']['batched']:.0f} ev/s",
              f"{rate['l']['single']:.0f} ev/s", rate["l"]["batched"] / rate["l"]["single"], ""))
    replay_rate = big["events"] / big["replay_s"]
    if "decode_s" in big:
        print(row(f"replay: events/s ({large} patients)", f"{replay_rate:.0f}",
                  f"{big['events'] / big['decode_s']:.0f} asyncpg+decode", big["decode_s"] / big["replay_s"], ">= 0.5x"))
    else:
        print(row(f"replay: events/s ({large} patients)", f"{replay_rate:.0f}", "(asyncpg: PostgreSQL only)", None, ""))
    print(row(f"DSMB summary build, {summary_size} patients", f"{summary['summary_s']:.2f} s", "10 s", 10 / summary["summary_s"], "< 10 s"))


if __name__ == "__main__":
    asyncio.run(main())
