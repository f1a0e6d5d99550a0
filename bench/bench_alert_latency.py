"""From a POST to the investigators' mail, under an open-loop load (issue 8).

The three services run as real processes (``trialwatch ingest``, ``safety``, ``notify``) on a fresh
PostgreSQL database and a fresh stream of the machine's NATS; mail goes to an SMTP server in this
process, which notes when each message arrives. The load is open-loop: events are sent at their
scheduled moments whether or not earlier ones were answered (a slow system does not slow the
load down). One event in 25 is a grade 3 CRS, each on a patient of its own, so each is one urgent
alert; the rest are labs. For each rate it reports the POST -> mail latency (p50, p99, max) of
the urgent events, and checks that each was mailed to each investigator exactly once.

``.venv/bin/python bench/bench_alert_latency.py [--rates 50,150,250] [--seconds 30] [--patients 1000]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import nats  # noqa: E402
from aiosmtpd.controller import Controller  # noqa: E402
from sqlalchemy import and_, func, select  # noqa: E402

from bench.cpu_account import Meter, pids_named  # noqa: E402
from bench.lean_http import LeanClient  # noqa: E402
from services.ingest.auth import create_token  # noqa: E402
from shared.embedded_nats import free_port  # noqa: E402
from shared.events import ALERT_RAISED  # noqa: E402
from shared.store.engine import make_engine, migrate_async  # noqa: E402
from shared.store.eventstore import utc  # noqa: E402
from shared.store.tables import deliveries, events  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
NATS = os.environ.get("TRIALWATCH_BENCH_NATS_URL", "nats://127.0.0.1:4222")
INVESTIGATORS = ["pi@bench.test", "co-pi@bench.test"]
ROLES = ("ingest", "safety", "notify")
ELIGIBLE = {"stable_vital_signs": True, "severe_infection": False, "gvhd_grade_2_to_4": False,
            "organ_failure": False, "cns_leukemia": False, "drug_allergy": False}


class Arrivals:
    """An SMTP handler that notes (when, subject, recipients) of every message."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str, list[str]]] = []
        self.wall: list[tuple[float, str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        subject = next((line.split(":", 1)[1].strip() for line in envelope.content.decode("utf-8", "replace").splitlines()
                        if line.lower().startswith("subject:")), "")
        self.seen.append((time.perf_counter(), subject, list(envelope.rcpt_tos)))
        self.wall.append((time.time(), subject))
        return "250 OK"


def when(days_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).isoformat()


async def enrol(client: httpx.AsyncClient, subjects: list[str]) -> None:
    async def one(subject: str) -> None:
        body = {"subject_id": subject, "site_id": "S01", "cohort": "mrd_positive", "age_years": 40,
                "weight_kg": 70.0, "enrolled_at": when(3), "transplant_date": "2025-03-02",
                "relapse_date": "2025-11-20", "eligibility": ELIGIBLE}
        assert (await client.post("/v1/patients", json=body)).status_code == 201
        dose = {"type": "blinatumomab_dose", "occurred_at": when(2), "course": 1, "day": 1, "dose_ug": 28.0}  # on schedule
        assert (await client.post(f"/v1/patients/{subject}/events", json=dose)).status_code == 201

    for begin in range(0, len(subjects), 32):
        await asyncio.gather(*(one(s) for s in subjects[begin:begin + 32]))


async def open_loop(client: LeanClient, subjects: list[str], rate: int, seconds: float,
                    urgent_subjects: list[str]) -> tuple[dict[str, float], int]:
    """Send rate x seconds events at their scheduled moments; (urgent subject -> POST time, errors)."""
    sent: dict[str, float] = {}
    errors = 0
    total = int(rate * seconds)
    start = time.perf_counter()

    async def one(n: int) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        if n % 25 == 0 and urgent_subjects:
            subject = urgent_subjects.pop()
            body: dict[str, Any] = {"type": "crs", "occurred_at": when(1), "grade": 3}
            sent[subject] = time.perf_counter()
        else:
            subject = subjects[n % len(subjects)]
            body = {"type": "lab", "occurred_at": when(1), "test": "platelets", "value": 200.0, "unit": "10^9/L"}
        try:
            errors += await client.post(f"/v1/patients/{subject}/events", body) != 201
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            errors += 1

    await asyncio.gather(*(one(n) for n in range(total)))
    return sent, errors


def start_service(role: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "services", role], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)


CATCH_UP_S = 300.0


async def caught_up(nats_url: str, stream: str) -> None:
    """Wait (at most ``CATCH_UP_S``) until both consumers have taken every message of the stream."""
    nc = await nats.connect(nats_url)
    try:
        js, deadline = nc.jetstream(), time.perf_counter() + CATCH_UP_S
        while time.perf_counter() < deadline:
            last = (await js.stream_info(stream)).state.last_seq
            infos = []
            for durable in ("safety", "notify"):
                try:
                    infos.append(await js.consumer_info(stream, durable))
                except Exception:  # not created yet
                    infos = []
                    break
            if infos and all(i.ack_floor is not None and i.ack_floor.stream_seq >= last for i in infos):
                return
            await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def backends(database: str) -> list[int]:
    """The PostgreSQL server processes serving ``database`` now (the services' pools)."""
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        return [r["pid"] for r in await admin.fetch("select pid from pg_stat_activity where datname = $1", database)]
    finally:
        await admin.close()


HOPS = ("POST -> stored", "stored -> alert", "alert -> queued", "queued -> sent", "sent -> arrived")


async def hop_times(url: str, posted: dict[str, float], arrived: list[tuple[float, str]]) -> dict[str, list[float]]:
    """Each urgent event's time in each hop, from the store's own timestamps (the same clock)."""
    crs, alert = events.alias("crs"), events.alias("alert")
    query = (select(crs.c.subject_id, crs.c.recorded_at.label("stored"), alert.c.recorded_at.label("alerted"),
                    func.min(deliveries.c.created_at).label("queued"), func.max(deliveries.c.sent_at).label("sent"))
             .join(alert, and_(alert.c.causation_id == crs.c.event_id, alert.c.type == ALERT_RAISED))
             .join(deliveries, deliveries.c.alert_event_id == alert.c.event_id)
             .where(crs.c.type == "crs").group_by(crs.c.subject_id, crs.c.recorded_at, alert.c.recorded_at))
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            rows = [r._mapping for r in await conn.execute(query)]
    finally:
        await engine.dispose()
    last = {}
    for at, subject in arrived:
        for s in posted:
            if s in subject:
                last[s] = max(at, last.get(s, 0.0))
    hops: dict[str, list[float]] = {h: [] for h in HOPS}
    for r in rows:
        s = r["subject_id"]
        if s not in posted or s not in last:
            continue
        moments = [posted[s], *(utc(r[k]).timestamp() for k in ("stored", "alerted", "queued", "sent")), last[s]]
        for hop, (a, b) in zip(HOPS, zip(moments, moments[1:], strict=False), strict=True):
            hops[hop].append(b - a)
    return hops


def cpu_table(r: dict[str, Any]) -> str:
    """Where the CPU went from the load's start to its last mail: seconds, and ms per event."""
    lines = [f"   CPU over {r['wall']:.1f} s of wall time ({r['events']} events; the machine has {os.cpu_count()} cores):"]
    for label, seconds in sorted(r["cpu"].items(), key=lambda kv: -kv[1]):
        lines.append(f"   {label:<28} {seconds:7.1f} s  {1000 * seconds / max(1, r['events']):6.2f} ms/event")
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run_rate(rate: int, seconds: float, patients: int, tmp: Path, *, nats_url: str = NATS,
                   db: str = "postgres") -> dict[str, Any]:
    """One rate on a fresh database: PostgreSQL, or a SQLite file (the embedded default's store)."""
    name = f"tw_lat_{uuid.uuid4().hex[:8]}"
    if db == "sqlite":
        (tmp / name).mkdir(parents=True)
        url = f"sqlite+aiosqlite:///{tmp / name / 'trialwatch.db'}"
    else:
        admin = await asyncpg.connect(PG_ADMIN)
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()
        url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    await migrate_async(url)
    engine = make_engine(url)
    async with engine.begin() as conn:
        token = await create_token(conn, user="bench", role="site_staff", site_id="S01")
    await engine.dispose()
    arrivals = Arrivals()
    smtp = Controller(arrivals, hostname="127.0.0.1", port=free_port())
    smtp.start()
    port, tag = free_port(), uuid.uuid4().hex[:8]
    env = {**os.environ, "TRIALWATCH_DATABASE_URL": url, "TRIALWATCH_NATS_URL": nats_url,
           "TRIALWATCH_SMTP_URL": f"smtp://127.0.0.1:{smtp.port}", "TRIALWATCH_HTTP_PORT": str(port),
           "TRIALWATCH_STREAM_NAME": f"TWLAT_{tag}", "TRIALWATCH_SUBJECT_PREFIX": f"twlat{tag}",
           "TRIALWATCH_INVESTIGATOR_EMAILS": ",".join(INVESTIGATORS), "TRIALWATCH_DATA_DIR": str(tmp / tag)}
    logs = Path(os.environ.get("BENCH_LOG_DIR", tmp))  # the services' logs, kept where BENCH_LOG_DIR says
    services = [start_service(role, env, logs / f"{role}-{tag}.log") for role in ROLES]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                     headers={"Authorization": f"Bearer {token}"},
                                     limits=httpx.Limits(max_connections=64)) as client:
            for _ in range(200):
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            subjects = [f"S01-L{n:05d}" for n in range(patients)]
            urgent = [f"S01-U{n:05d}" for n in range(int(rate * seconds) // 25 + 1)]
            await enrol(client, subjects + urgent)
            await caught_up(nats_url, env["TRIALWATCH_STREAM_NAME"])
            await asyncio.sleep(6)  # the settle period passes: the load meets a quiet system
            arrivals.seen.clear()
            meter = Meter({**{role: [p.pid] for role, p in zip(ROLES, services, strict=True)},
                           "postgres (this database)": await backends(name) if db == "postgres" else [],
                           "nats-server (shared)": pids_named("nats-server"), "load + SMTP (this process)": [os.getpid()]})
            lean = LeanClient("127.0.0.1", port, headers={"Authorization": f"Bearer {token}"})
            meter.start()
            began = time.perf_counter()
            try:
                sent, errors = await open_loop(lean, subjects, rate, seconds, list(urgent))
            finally:
                await lean.close()
            deadline = time.perf_counter() + 60
            while time.perf_counter() < deadline:
                mailed = {s for _, subject, _ in arrivals.seen for s in sent if s in subject}
                if mailed >= set(sent):
                    break
                await asyncio.sleep(0.2)
            cpu, wall = meter.stop(), time.perf_counter() - began
            offset = time.time() - time.perf_counter()
            sent_wall = {s: posted + offset for s, posted in sent.items()}
            await asyncio.sleep(2)  # a duplicate would come now
        latencies, copies, timeline = [], defaultdict(list), []
        for at, subject, to in arrivals.seen:
            for s, posted in sent.items():
                if s in subject and "URGENT" in subject:
                    copies[s].extend(to)
                    latencies.append(at - posted)
                    timeline.append((posted - began, at - posted))
        exactly_once = all(sorted(copies[s]) == sorted(INVESTIGATORS) for s in sent)
        hops = await hop_times(url, sent_wall, arrivals.wall)
        return {"rate": rate, "sent": len(sent), "errors": errors, "mailed": len(copies),
                "p50": percentile(latencies, 0.5) if latencies else float("nan"),
                "p99": percentile(latencies, 0.99) if latencies else float("nan"),
                "max": max(latencies, default=float("nan")), "exactly_once": exactly_once,
                "cpu": cpu, "wall": wall, "events": int(rate * seconds), "timeline": sorted(timeline), "hops": hops}
    finally:
        for process in services:
            process.send_signal(signal.SIGTERM)
        for process in services:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        smtp.stop()
        if os.environ.get("BENCH_KEEP_DB"):
            print(f"kept database {url}, logs in {tmp}")
        elif db == "postgres":
            admin = await asyncpg.connect(PG_ADMIN)
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="20,50")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres",
                        help="the store: a fresh PostgreSQL database, or a SQLite file (the embedded default)")
    parser.add_argument("--slowest", type=int, default=0, help="list the N slowest urgent mails and when they were posted")
    args = parser.parse_args()
    store = "PostgreSQL" if args.db == "postgres" else "SQLite"
    print(f"== POST -> urgent mail, open loop, {args.patients} patients, {args.seconds:.0f} s per rate ({store} + NATS)")
    print(f"| {'events/s':>8} | {'urgent':>6} | {'mailed':>6} | {'errors':>6} | {'p50 s':>6} | {'p99 s':>6} | {'max s':>6} | exactly once | p99 < 1 s |")
    with tempfile.TemporaryDirectory() as tmp:
        for rate in (int(r) for r in args.rates.split(",")):
            r = await run_rate(rate, args.seconds, args.patients, Path(tmp), db=args.db)
            print(f"| {r['rate']:>8} | {r['sent']:>6} | {r['mailed']:>6} | {r['errors']:>6} | {r['p50']:>6.2f} | "
                  f"{r['p99']:>6.2f} | {r['max']:>6.2f} | {'yes' if r['exactly_once'] else 'NO':>12} | "
                  f"{'yes' if r['p99'] < 1 else 'no':>9} |", flush=True)
            print(cpu_table(r), flush=True)
            print("   hops (p50 / p99 / max s): " + "; ".join(
                f"{h} {percentile(v, 0.5):.2f} / {percentile(v, 0.99):.2f} / {max(v):.2f}"
                for h, v in r["hops"].items() if v), flush=True)
            if args.slowest:
                slow = sorted(r["timeline"], key=lambda t: -t[1])[:args.slowest]
                print("   slowest: " + ", ".join(f"{lat:.2f} s (posted at {at:.1f} s)" for at, lat in slow), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
