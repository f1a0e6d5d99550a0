"""The one benchmark table (``bench/run``): every figure beside a baseline measured in the same run.

- ingest: ``trialwatch ingest`` on PostgreSQL (and on the embedded SQLite default) against a naive
  FastAPI + pydantic + one INSERT endpoint (``naive_app.py``) on the same database, both driven by
  the same loopback load generator (``wrk``, else an asyncio + httpx client), 32 connections, one
  grade-0 lab per request over the enrolled patients; the outbox lag sampled meanwhile.
- append: the event store's ``append`` at 1 and 100 events per transaction against raw asyncpg
  and the ``eventsourcing`` library (9.x) on the same PostgreSQL.
- bulk: ``POST /v1/events:bulk`` of lab lines against asyncpg ``COPY`` of the same rows.
- replay: ``trialwatch replay``'s function against an asyncpg cursor + pydantic decode of the events.
- the safety-pace rows: see ``SECTIONS`` at the bottom.

``python -m bench.table [--full | --smoke] [--source DIR]``; ``--source`` measures another
checkout's code (e.g. ``main``) with this table: its ``shared``/``services`` come first on the path.
Sizes: the default is small (well under 3 minutes), ``--full`` the issue's, ``--smoke`` tiny (CI: it
only proves the benchmarks still run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.cpu_account import cpu_seconds
from bench.workload import AT, enrolment, import_lines, lab, ndjson, subject_ids

REPO = Path(__file__).resolve().parents[1]
HTTP_PORT, NAIVE_PORT = 8110, 8111


@dataclass(frozen=True)
class Sizes:
    patients: int
    seconds: float  # each load run (after a warm-up of its own)
    warmup: float
    append_single: int  # events, one per transaction
    append_batches: int  # transactions of 100 events
    bulk_lines: int
    sqlite: bool = True


SIZES = {
    "smoke": Sizes(patients=10, seconds=1, warmup=0.5, append_single=20, append_batches=2, bulk_lines=100,
                   sqlite=False),
    "small": Sizes(patients=200, seconds=8, warmup=2, append_single=300, append_batches=10, bulk_lines=4_000),
    "full": Sizes(patients=1_000, seconds=30, warmup=5, append_single=2_000, append_batches=100, bulk_lines=20_000),
}


@dataclass
class Row:
    figure: str
    value: float | None
    unit: str
    baseline: str
    baseline_value: float | None
    higher_is_better: bool = True
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value


@dataclass
class Context:
    sizes: Sizes
    source: Path
    admin_dsn: str  # asyncpg DSN of the server's maintenance database
    nats_url: str
    tmp: Path
    dsn: str = ""  # this run's own database
    token: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def sqlalchemy_url(self) -> str:
        return self.dsn.replace("postgresql://", "postgresql+asyncpg://", 1)

    @property
    def subjects(self) -> list[str]:
        return subject_ids(self.sizes.patients)


# --------------------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def own_database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"tw_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'create database "{name}"')
    finally:
        await admin.close()
    base, _, _ = admin_dsn.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute("select pg_terminate_backend(pid) from pg_stat_activity where datname = $1", name)
            await admin.execute(f'drop database if exists "{name}"')
        finally:
            await admin.close()


def source_env(ctx: Context, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALWATCH_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ctx.source), str(REPO)])
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def serving(cmd: list[str], env: dict[str, str], port: int, log: Path, cwd: Path = REPO) -> AsyncIterator[str]:
    with log.open("w") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        base = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient() as client:
                for _ in range(300):
                    if process.poll() is not None:
                        raise RuntimeError(f"{' '.join(cmd)} exited: {log.read_text()[-2000:]}")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(base + "/openapi.json", timeout=1)).status_code == 200:
                            break
                    await asyncio.sleep(0.1)
                else:
                    raise RuntimeError(f"{' '.join(cmd)} did not answer: {log.read_text()[-2000:]}")
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@dataclass
class Load:
    requests: int
    seconds: float
    p99_ms: float
    errors: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


LUA = """
local n = %(patients)d
local body = '%(body)s'
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer %(token)s"}
math.randomseed(os.time() + %(seed)d)
request = function()
  return wrk.format("POST", string.format("/v1/patients/%(prefix)s%%06d/events", math.random(0, n - 1)), headers, body)
end
"""


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


async def wrk(base: str, ctx: Context, seconds: float) -> Load:
    script = ctx.tmp / f"post-{uuid.uuid4().hex[:6]}.lua"
    script.write_text(LUA % {"patients": ctx.sizes.patients, "body": json.dumps(lab()), "token": ctx.token,
                             "seed": os.getpid(), "prefix": ctx.subjects[0][:-6]})
    process = await asyncio.create_subprocess_exec(
        "wrk", "-t2", "-c32", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script), base,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await process.communicate())[0].decode()
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    refused = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    if refused or socket:
        ctx.notes.append(f"{base}: {refused} answers not 2xx, socket errors: "
                         + (re.search(r"Socket errors: (.*)", out) or re.search(r"()", out)).group(1))  # type: ignore[union-attr]
    return Load(requests, max(1, round(seconds)), p99, refused + socket)


async def python_load(base: str, ctx: Context, seconds: float) -> Load:
    """The fallback load generator: 32 asyncio workers on one httpx client."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {ctx.token}"}
    subjects = ctx.subjects

    async def worker(k: int, client: httpx.AsyncClient) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            try:
                answer = await client.post(f"/v1/patients/{subjects[i % len(subjects)]}/events", json=lab(),
                                           headers=headers)
                errors += answer.status_code >= 300
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - began)
            i += 32

    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        began = time.perf_counter()
        await asyncio.gather(*(worker(k, client) for k in range(32)))
        took = time.perf_counter() - began
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) > 1 else 0.0
    return Load(len(latencies), took, p99, errors)


async def load(base: str, ctx: Context) -> Load:
    generator = wrk if shutil.which("wrk") else python_load
    await generator(base, ctx, ctx.sizes.warmup)
    return await generator(base, ctx, ctx.sizes.seconds)


async def enrol_all(base: str, ctx: Context) -> None:
    headers = {"Authorization": f"Bearer {ctx.token}"}
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        queue = list(ctx.subjects)

        async def worker() -> None:
            while queue:
                answer = await client.post("/v1/patients", json=enrolment(queue.pop()), headers=headers)
                if answer.status_code not in (201, 409):
                    raise RuntimeError(f"enrolment refused: {answer.text}")

        await asyncio.gather(*(worker() for _ in range(16)))


async def make_token(url: str, *, role: str = "admin", site: str | None = None) -> str:
    from services.ingest.auth import create_token
    from shared.store.engine import make_engine

    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            return await create_token(conn, user=f"bench-{uuid.uuid4().hex[:6]}", role=role, site_id=site)
    finally:
        await engine.dispose()


class OutboxLag:
    """Samples how far the outbox is behind (the age of its oldest row) every quarter second."""

    def __init__(self, dsn: str) -> None:
        self.dsn, self.worst, self.left = dsn, 0.0, 0

    async def run(self, stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not stop.is_set():
                age = await conn.fetchval("select extract(epoch from now() - min(created_at)) from outbox")
                self.worst = max(self.worst, float(age or 0))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)
            await asyncio.sleep(1.0)  # what the relay has not caught up with a second after the load
            self.left = int(await conn.fetchval("select count(*) from outbox"))
        finally:
            await conn.close()


# --------------------------------------------------------------------------- sections


async def ingest_rows(ctx: Context) -> list[Row]:
    """Ingest req/s and p99 against the naive endpoint; the outbox lag; then bulk against COPY."""
    ctx.token = await make_token(ctx.sqlalchemy_url)
    stream = f"TWBENCH{uuid.uuid4().hex[:8].upper()}"
    env = source_env(ctx, TRIALWATCH_DATABASE_URL=ctx.sqlalchemy_url, TRIALWATCH_NATS_URL=ctx.nats_url,
                     TRIALWATCH_HTTP_PORT=str(HTTP_PORT), TRIALWATCH_DATA_DIR=str(ctx.tmp / "var"),
                     TRIALWATCH_STREAM_NAME=stream, TRIALWATCH_SUBJECT_PREFIX=stream.lower())
    rows: list[Row] = []
    try:
        async with serving([sys.executable, "-m", "services", "ingest"], env, HTTP_PORT, ctx.tmp / "ingest.log",
                           ctx.source) as base:
            await enrol_all(base, ctx)
            lag, stop = OutboxLag(ctx.dsn), asyncio.Event()
            sampler = asyncio.create_task(lag.run(stop))
            ours = await load(base, ctx)
            stop.set()
            await sampler
            bulk = await bulk_import(base, ctx)
        async with serving([sys.executable, "-m", "bench.naive_app", ctx.dsn, str(NAIVE_PORT)],
                           source_env(ctx), NAIVE_PORT, ctx.tmp / "naive.log") as naive_base:
            naive = await load(naive_base, ctx)
        copy_rate = await copy_rate_of(ctx, ctx.sizes.bulk_lines)
    finally:
        with contextlib.suppress(Exception):
            await drop_stream(ctx.nats_url, stream)
    rows += [
        Row("ingest req/s (PostgreSQL)", ours.rate, "req/s", "naive FastAPI+INSERT", naive.rate,
            target=">= 0.5x", met=ours.rate >= 0.5 * naive.rate),
        Row("ingest p99 (PostgreSQL)", ours.p99_ms, "ms", "naive FastAPI+INSERT", naive.p99_ms,
            higher_is_better=False, target="< 50 ms", met=ours.p99_ms < 50),
        Row("ingest errors", ours.errors, "", "naive FastAPI+INSERT", naive.errors, higher_is_better=False,
            target="0", met=ours.errors == 0),
        Row("outbox lag, worst during load", lag.worst, "s", "", None, higher_is_better=False,
            target="<= 1 s", met=lag.worst <= 1.0),
        Row("outbox rows left 1 s after the load", lag.left, "rows", "", None,
            higher_is_better=False),
        Row(f"bulk import ({ctx.sizes.bulk_lines} labs, {ctx.sizes.patients} patients)", bulk, "events/s",
            "asyncpg COPY", copy_rate, target=">= 10,000 events/s",
            met=None if bulk is None else bulk >= 10_000),
    ]
    return rows


async def bulk_import(base: str, ctx: Context) -> float | None:
    body = ndjson(import_lines(ctx.subjects, ctx.sizes.bulk_lines, enrol=False))
    headers = {"Authorization": f"Bearer {ctx.token}", "Content-Type": "application/x-ndjson"}
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        began = time.perf_counter()
        answer = await client.post("/v1/events:bulk", content=body, headers=headers)
        took = time.perf_counter() - began
    if answer.status_code in (404, 405):
        ctx.notes.append("bulk import: this code has no POST /v1/events:bulk")
        return None
    done = answer.json()
    if answer.status_code != 200 or done["rejected"]:
        raise RuntimeError(f"bulk import refused lines: {answer.text[:500]}")
    return float(done["accepted"]) / took


async def copy_rate_of(ctx: Context, n: int) -> float:
    from bench.naive_app import CREATE, TABLE

    subjects = ctx.subjects
    occurred = datetime.fromisoformat(AT)
    records = [(subjects[k % len(subjects)], "lab", occurred, json.dumps(lab())) for k in range(n)]
    conn = await asyncpg.connect(ctx.dsn)
    try:
        await conn.execute(CREATE)
        began = time.perf_counter()
        await conn.copy_records_to_table(TABLE, records=records, columns=["subject_id", "type", "occurred_at", "data"])
        return n / (time.perf_counter() - began)
    finally:
        await conn.close()


async def drop_stream(url: str, stream: str) -> None:
    import nats

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


async def sqlite_rows(ctx: Context) -> list[Row]:
    """What the embedded default reaches: the same load on SQLite (the naive endpoint stays on PostgreSQL)."""
    if not ctx.sizes.sqlite:
        return []
    url = f"sqlite+aiosqlite:///{ctx.tmp / 'sqlite' / 'trialwatch.db'}"
    from shared.store.engine import migrate

    (ctx.tmp / "sqlite").mkdir(exist_ok=True)
    await asyncio.to_thread(migrate, url)
    saved, ctx.token = ctx.token, await make_token(url)
    stream = f"TWBENCH{uuid.uuid4().hex[:8].upper()}"
    env = source_env(ctx, TRIALWATCH_DATABASE_URL=url, TRIALWATCH_NATS_URL=ctx.nats_url,
                     TRIALWATCH_HTTP_PORT=str(HTTP_PORT), TRIALWATCH_DATA_DIR=str(ctx.tmp / "sqlite"),
                     TRIALWATCH_STREAM_NAME=stream, TRIALWATCH_SUBJECT_PREFIX=stream.lower())
    try:
        async with serving([sys.executable, "-m", "services", "ingest"], env, HTTP_PORT, ctx.tmp / "sqlite.log",
                           ctx.source) as base:
            await enrol_all(base, ctx)
            ours = await load(base, ctx)
    finally:
        ctx.token = saved
        with contextlib.suppress(Exception):
            await drop_stream(ctx.nats_url, stream)
    return [Row("ingest req/s (embedded SQLite)", ours.rate, "req/s", "", None),
            Row("ingest p99 (embedded SQLite)", ours.p99_ms, "ms", "", None, higher_is_better=False),
            Row("ingest errors (embedded SQLite)", ours.errors, "", "", None, higher_is_better=False)]


async def append_rows(ctx: Context) -> list[Row]:
    """The store's append at 1 and 100 events a transaction, sequentially, one stream per 100.

    Each size twice: as its own transaction (an append on PostgreSQL is one statement, so on a
    connection in autocommit it commits as it returns, the way the ingest's group commit stores a
    batch and the way ``eventsourcing``'s ``save`` commits), and inside a BEGIN ... COMMIT the
    caller opens (two round trips more, one for each)."""
    from shared.events import NewEvent
    from shared.store import eventstore
    from shared.store.engine import make_engine

    single, batches = ctx.sizes.append_single, ctx.sizes.append_batches
    engine = make_engine(ctx.sqlalchemy_url)
    occurred = datetime.fromisoformat(AT)

    def event() -> Any:
        return NewEvent(type="lab", subject_id="S01-A", occurred_at=occurred, recorded_by="bench", data=lab())

    hundred_cpu = Cpu()

    async def own_transactions(name: str, appends: int, size: int, cpu: Cpu | None = None) -> float:
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            backend = [int((await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one())]
            began, client, server = time.perf_counter(), time.process_time(), backend_cpu_s(backend)
            for i in range(appends):
                await eventstore.append(conn, f"{name}-{i * size // 100}", [event() for _ in range(size)])
            took = time.perf_counter() - began
            if cpu is not None:
                cpu.measured(appends * size, time.process_time() - client, backend_cpu_s(backend), server)
            return appends * size / took

    async def in_begin_commit(name: str, appends: int, size: int) -> float:
        began = time.perf_counter()
        for i in range(appends):
            async with engine.begin() as conn:
                await eventstore.append(conn, f"{name}-{i * size // 100}", [event() for _ in range(size)])
        return appends * size / (time.perf_counter() - began)

    try:
        own_one = await own_transactions("bench-own-one", single, 1)
        ours_one = await in_begin_commit("bench-one", single, 1)
        own_hundred = await own_transactions("bench-own-hundred", batches, 100, hundred_cpu)
        ours_hundred = await in_begin_commit("bench-hundred", batches, 100)
    finally:
        await engine.dispose()
    raw_one, raw_hundred = await asyncpg_append(ctx, single, batches)
    es_hundred_cpu = Cpu()
    es_one, es_hundred = await asyncio.to_thread(eventsourcing_append, ctx, single, batches, es_hundred_cpu)

    def against_es(figure: str, ours: float, es: float | None) -> Row:
        return Row(figure, ours, "events/s", "eventsourcing 9.x", es, target=">= 2x",
                   met=None if es is None else ours >= 2 * es)

    return [
        against_es("append 1/txn, its own transaction", own_one, es_one),
        against_es("append 1/txn, in BEGIN ... COMMIT", ours_one, es_one),
        Row("append 1/txn, in BEGIN ... COMMIT", ours_one, "events/s", "raw asyncpg INSERT", raw_one),
        against_es("append 100/txn, its own transaction", own_hundred, es_hundred),
        against_es("append 100/txn, in BEGIN ... COMMIT", ours_hundred, es_hundred),
        Row("append 100/txn, in BEGIN ... COMMIT", ours_hundred, "events/s", "raw asyncpg executemany", raw_hundred),
        # Where the time of "its own transaction" goes, per event: less noisy than the rates on a
        # shared machine (a process waiting for the CPU uses none), and it says which side to cut.
        Row("append 100/txn, client CPU per event", hundred_cpu.client_us, "us", "eventsourcing 9.x",
            es_hundred_cpu.client_us, higher_is_better=False),
        Row("append 100/txn, PostgreSQL CPU per event", hundred_cpu.server_us, "us", "eventsourcing 9.x",
            es_hundred_cpu.server_us, higher_is_better=False),
    ]


@dataclass
class Cpu:
    """CPU microseconds per event: the client's (this process, or the baseline's thread) and the
    PostgreSQL backends' it talked to (None when the server is not on this machine)."""

    client_us: float | None = None
    server_us: float | None = None

    def measured(self, events: int, client_s: float, server_after: float | None,
                 server_before: float | None) -> None:
        self.client_us = client_s / events * 1e6
        if server_after is not None and server_before is not None:
            self.server_us = (server_after - server_before) / events * 1e6


def backend_cpu_s(pids: list[int]) -> float | None:
    """The CPU seconds PostgreSQL backends have used (``cpu_account``: clock ticks, 10 ms apiece,
    so only the full sizes measure it well); None unless every pid is a postgres process here."""
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
                return None
        except OSError:
            return None
    return sum(cpu_seconds(pid) for pid in pids)


async def asyncpg_append(ctx: Context, single: int, batches: int) -> tuple[float, float]:
    from bench.naive_app import CREATE, TABLE

    occurred = datetime.fromisoformat(AT)
    statement = f"insert into {TABLE} (subject_id, type, occurred_at, data) values ($1, $2, $3, $4)"
    data = json.dumps(lab())
    conn = await asyncpg.connect(ctx.dsn)
    try:
        await conn.execute(CREATE)
        began = time.perf_counter()
        for _ in range(single):
            async with conn.transaction():
                await conn.execute(statement, "S01-A", "lab", occurred, data)
        one = single / (time.perf_counter() - began)
        began = time.perf_counter()
        for _ in range(batches):
            async with conn.transaction():
                await conn.executemany(statement, [("S01-A", "lab", occurred, data)] * 100)
        hundred = batches * 100 / (time.perf_counter() - began)
    finally:
        await conn.close()
    return one, hundred


def _eventsourcing(ctx: Context, **env: str) -> tuple[Any, Any] | None:
    """The ``eventsourcing`` library's Application on this run's PostgreSQL and an aggregate that
    records a lab; None (noted once) when the ``bench`` extra is not installed."""
    try:
        from eventsourcing.application import Application
        from eventsourcing.domain import Aggregate, event
    except ImportError:
        note = "eventsourcing is not installed: pip install -e '.[bench]'"
        if note not in ctx.notes:
            ctx.notes.append(note)
        return None
    from sqlalchemy.engine import make_url

    url = make_url(ctx.sqlalchemy_url)
    app = Application(env={
        "PERSISTENCE_MODULE": "eventsourcing.postgres", "POSTGRES_DBNAME": url.database or "",
        "POSTGRES_HOST": url.host or "127.0.0.1", "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": url.username or "postgres", "POSTGRES_PASSWORD": url.password or "",
        "CREATE_TABLE": "y", **env})
    return app, _lab_aggregate(Aggregate, event)


@functools.cache
def _lab_aggregate(aggregate: Any, event: Any) -> Any:
    """One aggregate class for every run (the library registers each class by its topic, once)."""

    class Patient(aggregate):
        @event("LabRecorded")
        def record_lab(self, value: float) -> None:
            self.last = value

    return Patient


def eventsourcing_append(ctx: Context, single: int, batches: int,
                         cpu: Cpu | None = None) -> tuple[float | None, float | None]:
    found = _eventsourcing(ctx)
    if found is None:
        return None, None
    app, Patient = found  # noqa: N806 - the aggregate class
    try:
        patients = [Patient() for _ in range(max(1, single // 100))]
        app.save(*patients)
        began = time.perf_counter()
        for i in range(single):
            patient = patients[i // 100]
            patient.record_lab(4.0)
            app.save(patient)
        one = single / (time.perf_counter() - began)
        patient = Patient()
        app.save(patient)
        backends = _backends_of(ctx.dsn)  # the library's pool's, on this run's database
        began, client, server = time.perf_counter(), time.thread_time(), backend_cpu_s(backends)
        for _ in range(batches):
            for _ in range(100):
                patient.record_lab(4.0)
            app.save(patient)
        hundred = batches * 100 / (time.perf_counter() - began)
        if cpu is not None:
            cpu.measured(batches * 100, time.thread_time() - client, backend_cpu_s(backends), server)
    finally:
        app.close()
    return one, hundred


def _backends_of(dsn: str) -> list[int]:
    """The other client backends on this run's database (here: the baseline library's pool)."""
    import psycopg  # eventsourcing's driver: there whenever the library is

    with psycopg.connect(dsn, autocommit=True) as conn:
        return [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'")]


async def concurrent_append_rows(ctx: Context) -> list[Row]:
    """One event per call from 32 concurrent callers: through the ingest's group commit here, one
    transaction each for asyncpg and eventsourcing (32 connections, 32 threads)."""
    n = ctx.sizes.append_single * 3
    ours = await group_commit_rate(ctx, n)
    raw = await asyncpg_concurrent_rate(ctx, n)
    es = await asyncio.to_thread(eventsourcing_concurrent_rate, ctx, n)
    return [
        Row("append 1/call, 32 callers", ours, "events/s", "eventsourcing 9.x, 32 threads", es, target=">= 2x",
            met=None if es is None or ours is None else ours >= 2 * es),
        Row("append 1/call, 32 callers", ours, "events/s", "raw asyncpg, 32 connections", raw),
    ]


async def group_commit_rate(ctx: Context, n: int) -> float | None:
    try:
        from services.ingest.unit_of_work import UnitOfWork
    except ImportError:
        return None
    from services.ingest.idempotency import Answer
    from shared.events import NewEvent
    from shared.store.engine import make_engine

    if not hasattr(UnitOfWork, "write"):
        ctx.notes.append("append 1/call, 32 callers: this code has no group commit")
        return None
    engine = make_engine(ctx.sqlalchemy_url)
    uow = UnitOfWork(engine, lambda: datetime.now(UTC))
    occurred = datetime.fromisoformat(AT)

    async def caller(k: int) -> None:
        for i in range(k, n, 32):
            event = NewEvent(type="lab", subject_id="S01-C", occurred_at=occurred, recorded_by="bench", data=lab())
            await uow.write(lambda ledger, e=event, s=f"bench-concurrent-{i % 32}": ledger.batch.add(
                s, [e], recorded_at=ledger.now), lambda stored: Answer(201, {}))

    try:
        began = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(32)))
        return n / (time.perf_counter() - began)
    finally:
        await engine.dispose()


async def asyncpg_concurrent_rate(ctx: Context, n: int) -> float:
    from bench.naive_app import CREATE, TABLE

    occurred, data = datetime.fromisoformat(AT), json.dumps(lab())
    statement = f"insert into {TABLE} (subject_id, type, occurred_at, data) values ($1, $2, $3, $4)"
    pool = await asyncpg.create_pool(ctx.dsn, min_size=32, max_size=32)
    try:
        async with pool.acquire() as conn:
            await conn.execute(CREATE)

        async def caller(k: int) -> None:
            for _ in range(k, n, 32):
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute(statement, "S01-C", "lab", occurred, data)

        began = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(32)))
        return n / (time.perf_counter() - began)
    finally:
        await pool.close()


def eventsourcing_concurrent_rate(ctx: Context, n: int) -> float | None:
    from concurrent.futures import ThreadPoolExecutor

    found = _eventsourcing(ctx, POSTGRES_POOL_SIZE="32")
    if found is None:
        return None
    app, Patient = found  # noqa: N806 - the aggregate class
    try:
        patients = [Patient() for _ in range(32)]
        app.save(*patients)

        def caller(k: int) -> None:
            for _ in range(k, n, 32):
                patients[k].record_lab(4.0)
                app.save(patients[k])

        began = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(caller, range(32)))
        return n / (time.perf_counter() - began)
    finally:
        app.close()


async def replay_rows(ctx: Context) -> list[Row]:
    """``trialwatch replay``'s function over this run's store, against reading and decoding the
    same table into the store's own ``StoredEvent`` (bench_safety's baseline). Alone
    (``--only replay_rows``) the store is first filled as the ingest rows would leave it."""
    from bench.bench_safety import asyncpg_decode
    from services.runner import replay_projections
    from shared.settings import Settings

    conn = await asyncpg.connect(ctx.dsn)
    try:
        count = int(await conn.fetchval("select count(*) from events"))
    finally:
        await conn.close()
    if count == 0:
        count = await _fill_as_ingest_would(ctx)
    began = time.perf_counter()
    await asyncpg_decode(ctx.dsn)
    decoded = count / (time.perf_counter() - began)
    settings = Settings(database_url=ctx.sqlalchemy_url, data_dir=ctx.tmp / "var")
    began = time.perf_counter()
    await replay_projections(settings)
    replayed = count / (time.perf_counter() - began)
    return [Row(f"replay ({count} events)", replayed, "events/s", "asyncpg cursor + pydantic decode", decoded,
                target=">= 0.5x", met=replayed >= 0.5 * decoded)]


async def _fill_as_ingest_would(ctx: Context) -> int:
    """The sizes' patients enrolled and as many grade-0 labs as the ingest load and the bulk import
    store, appended straight to the store (``bench/workload.py``'s records, with their derived grade)."""
    from shared.events import NewEvent, patient_stream
    from shared.store import eventstore
    from shared.store.engine import make_engine

    engine, at = make_engine(ctx.sqlalchemy_url), datetime.fromisoformat(AT)
    lines = list(import_lines(ctx.subjects, 4 * ctx.sizes.bulk_lines))
    try:
        for begin in range(0, len(lines), 1000):
            async with engine.begin() as conn:
                batch = await eventstore.Batch.begin(conn)
                for line in lines[begin:begin + 1000]:
                    if line["type"] == "enrolment":
                        data = {k: v for k, v in line.items() if k not in ("type", "enrolled_at")}
                        event = NewEvent(type="patient_enrolled", subject_id=line["subject_id"], recorded_by="bench",
                                         occurred_at=datetime.fromisoformat(line["enrolled_at"]), data=data)
                    else:
                        data = {k: v for k, v in line.items() if k not in ("type", "occurred_at", "subject_id")}
                        event = NewEvent(type="lab", subject_id=line["subject_id"], recorded_by="bench", occurred_at=at,
                                         data=data | {"grade": 0, "scale": "CTCAE-5.0"})
                    await batch.add(patient_stream(line["subject_id"]), [event], recorded_at=datetime.now(UTC))
                await batch.flush()
    finally:
        await engine.dispose()
    return len(lines)


# --------------------------------------------------------------------------- safety pace (issue 8)

SAFETY_SIZES = {  # (small trial, large trial, events of the load, patients of the summary)
    "smoke": (25, 40, 50, 40),
    "small": (30, 600, 200, 1_000),
    "full": (30, 3_000, 600, 10_000),
}
LATENCY_SIZES = {  # (events/s, seconds, patients)
    "smoke": ((10,), 2.0, 20),
    "small": ((50,), 10.0, 200),
    "full": ((50, 150, 250), 30.0, 1_000),
}


def _size_name(ctx: Context) -> str:
    return next(name for name, sizes in SIZES.items() if sizes is ctx.sizes)


async def safety_rows(ctx: Context) -> list[Row]:
    """The safety service by trial size (bench/bench_safety.py): events/s batched, replay, the summary."""
    from bench import bench_safety

    small, large, load, summary_size = SAFETY_SIZES[_size_name(ctx)]
    figures = await bench_safety.figures(small, large, load, summary_size, ctx.tmp)
    s, big, summary = figures["small"], figures["large"], figures["summary"]
    rate = {k: v["half"] / v["batched_s"] for k, v in (("s", s), ("l", big))}
    single = big["half"] / big["single_s"]
    rows = [
        Row(f"safety, batched, {large} patients", rate["l"], "events/s", f"the same at {small} patients", rate["s"],
            target=">= 0.8x", met=rate["l"] >= 0.8 * rate["s"]),
        Row(f"safety at {large}: batched vs one event per transaction", rate["l"], "events/s",
            "one event per transaction (the old consumer's shape)", single),
    ]
    if "decode_s" in big:
        replayed, decoded = big["events"] / big["replay_s"], big["events"] / big["decode_s"]
        rows.append(Row(f"safety replay ({large} patients, {big['events']:.0f} events)", replayed, "events/s",
                        "asyncpg cursor + pydantic", decoded, target=">= 0.5x", met=replayed >= 0.5 * decoded))
    rows.append(Row(f"DSMB summary build, {summary_size} patients", summary["summary_s"], "s", "the target", 10.0,
                    higher_is_better=False, target="< 10 s", met=summary["summary_s"] < 10))
    return rows


async def alert_latency_rows(ctx: Context) -> list[Row]:
    """POST -> urgent mail under an open-loop load, the services as processes (bench/bench_alert_latency.py)."""
    from bench import bench_alert_latency

    rates, seconds, patients = LATENCY_SIZES[_size_name(ctx)]
    rows = []
    for rate in rates:
        r = await bench_alert_latency.run_rate(rate, seconds, patients, ctx.tmp, nats_url=ctx.nats_url)
        rows.append(Row(f"POST -> urgent mail p99 at {rate} events/s ({patients} patients, {r['sent']} urgent, "
                        f"{'each mailed exactly once' if r['exactly_once'] else 'NOT each mailed exactly once'})",
                        r["p99"], "s", "the target", 1.0, higher_is_better=False, target="< 1 s",
                        met=r["p99"] < 1 and r["exactly_once"]))
    return rows


# --------------------------------------------------------------------------- the table

Section = Callable[[Context], Awaitable[list[Row]]]

# Every section, in the table's order. The safety-pace rows go here: add an async function
# ``(ctx) -> list[Row]`` (``ctx.dsn`` holds this run's events after the ingest and bulk rows).
SECTIONS: list[Section] = [
    ingest_rows,
    sqlite_rows,
    append_rows,
    concurrent_append_rows,
    replay_rows,
    safety_rows,
    alert_latency_rows,
]


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{text} {unit}".strip()


def render(rows: list[Row]) -> str:
    header = ("figure", "this code", "baseline (same run)", "baseline", "ratio", "target", "met")
    lines = [header]
    for r in rows:
        ratio = r.ratio
        lines.append((r.figure, _fmt(r.value, r.unit), r.baseline or "-", _fmt(r.baseline_value, r.unit)
                      if r.baseline else "-", f"{ratio:.2f}x" if ratio is not None else "-", r.target or "-",
                      {True: "yes", False: "NO", None: "-"}[r.met]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the issue's sizes (minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: proves the benchmarks run (CI)")
    parser.add_argument("--source", type=Path, default=REPO, help="the checkout whose code is measured")
    parser.add_argument("--database-url", default=os.environ.get(
        "TRIALWATCH_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--nats-url", default=os.environ.get("TRIALWATCH_BENCH_NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("--only", action="append", default=[], metavar="SECTION",
                        help="run only these sections: " + ", ".join(s.__name__ for s in SECTIONS))
    args = parser.parse_args(argv)
    sizes = SIZES["full" if args.full else "smoke" if args.smoke else "small"]
    admin = args.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tw-bench-") as tmp:
        async with own_database(admin) as dsn:
            ctx = Context(sizes, args.source.resolve(), admin, args.nats_url, Path(tmp), dsn=dsn)
            from shared.store.engine import migrate

            await asyncio.to_thread(migrate, ctx.sqlalchemy_url)
            rows: list[Row] = []
            for section in SECTIONS:
                if not args.only or section.__name__ in args.only:
                    rows += await section(ctx)
    print(f"TrialWatch benchmarks ({'full' if args.full else 'smoke' if args.smoke else 'small'} sizes, code: "
          f"{ctx.source}, load: {'wrk' if shutil.which('wrk') else 'asyncio+httpx'}, 32 connections, "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {time.perf_counter() - began:.0f} s)")
    print(render(rows))
    for note in ctx.notes:
        print(f"note: {note}")
    return 0


def _measure_source_first(argv: list[str]) -> None:
    """With ``--source``, run again from that checkout with its code first on the path (this
    table's ``bench`` package still comes from here: the older checkout's ``bench`` has no
    ``__init__``)."""
    if "--source" not in argv or os.environ.get("TW_BENCH_SOURCE_FIRST"):
        return
    source = Path(argv[argv.index("--source") + 1]).resolve()
    if source == REPO:
        return
    os.chdir(source)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(source), str(REPO)]), "TW_BENCH_SOURCE_FIRST": "1"}
    os.execve(sys.executable, [sys.executable, "-m", "bench.table", *argv], env)


if __name__ == "__main__":
    _measure_source_first(sys.argv[1:])
    sys.exit(asyncio.run(main(sys.argv[1:])))
