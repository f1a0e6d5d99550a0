"""The fault matrix (issue 9): records go in through the HTTP API while, in turn, each service, the
broker, the database's connections and SMTP fail; then the books are counted.

The three services run as real processes (``python -m services ingest|safety|notify``) on the
given database, a nats-server of the matrix's own (so it can be killed) and an SMTP capture in
this process (so it can be stopped). For each fault a fresh set of patients (enrolled at site S01
with a course-1 dose) gets records from a client that retries as a real one would: on a
connection error or a 503, again and again with the same Idempotency-Key, so a retry never stores
twice. About one record in 25 is a grade 3 ICANS, each on a patient of its own: one urgent alert,
one mail to each investigator (ICANS has no stopping rule, so no rule's mail joins in); the rest
are labs. A quarter of the way into the load the fault starts; it lasts ``fault_s`` seconds:

- ``ingest``, ``safety``, ``notify``: SIGKILL of the process, restarted after ``fault_s``;
- ``broker``: SIGKILL of the nats-server, restarted on the same port and store after ``fault_s``;
- ``database``: PostgreSQL: every other connection to the database terminated, ten times a second;
  SQLite: an exclusive write lock held by another connection;
- ``smtp``: the SMTP server stopped, started again on the same port after ``fault_s``.

Then it waits until the system has settled (outbox empty, both consumers acked the whole stream,
every mail sent) and counts: records acknowledged (201) and stored, urgent events and urgent mails
per investigator, duplicate mails (one Message-ID received twice), dead letters, and how long
the system took from the fault's end to settle. ``Matrix.failures`` names every loss, duplicate
and dead letter; a test fails on any.

One command for the full form (a few thousand records, longer faults):
``.venv/bin/python -m tests.fault_matrix --full`` (``scripts/fault-matrix``); the database is a
fresh one from ``TRIALWATCH_TEST_DATABASE_URL`` (PostgreSQL) or else a SQLite file. The short form
runs in the test suite (``tests/e2e/test_fault_matrix.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.auth import create_token
from services.notify.capture import MailCapture
from shared.embedded_nats import EmbeddedNats, free_port
from shared.store.engine import make_engine
from shared.store.tables import dead_letters, deliveries, events, outbox
from tests.support.faults import NOTIFY, SAFETY, caught_up

FAULTS = ("ingest", "safety", "notify", "broker", "database", "smtp")
SERVICES = ("ingest", "safety", "notify")
INVESTIGATORS = ("pi@matrix.test", "co-pi@matrix.test")
URGENT_EVERY = 25
SENDERS = 8  # concurrent clients, each with a lab patient of its own
ELIGIBLE = {"stable_vital_signs": True, "severe_infection": False, "gvhd_grade_2_to_4": False,
            "organ_failure": False, "cns_leukemia": False, "drug_allergy": False}


@dataclass(frozen=True)
class Form:
    records: int  # per fault
    fault_s: float
    settle_timeout_s: float
    give_up_s: float  # a client stops retrying one record after this long (and the matrix fails)


SHORT = Form(records=50, fault_s=2.0, settle_timeout_s=240.0, give_up_s=180.0)
FULL = Form(records=500, fault_s=10.0, settle_timeout_s=600.0, give_up_s=600.0)


@dataclass
class Row:
    """What one fault did to the books."""

    fault: str
    records: int = 0
    acked: int = 0
    stored: int = 0
    urgent: int = 0
    mailed: dict[str, int] = field(default_factory=dict)  # urgent mails about this fault's patients
    not_once: list[str] = field(default_factory=list)  # "subject -> recipient: n mails" where n != 1
    duplicates: int = 0
    duplicated: list[str] = field(default_factory=list)  # the subject lines of mails received twice
    dead_letters: int = 0
    recovery_s: float | None = None  # None: never settled
    refused: list[str] = field(default_factory=list)  # answers other than 201, 503 (and records given up)

    def failures(self) -> list[str]:
        found = [f"{self.fault}: {problem}" for problem in self.refused[:5]]
        if self.acked != self.records:
            found.append(f"{self.fault}: {self.records - self.acked} of {self.records} records never acknowledged")
        if self.stored != self.acked:
            found.append(f"{self.fault}: {self.acked} records acknowledged, {self.stored} stored")
        found += [f"{self.fault}: {line}" for line in self.not_once[:5]]
        if self.duplicates:
            found.append(f"{self.fault}: {self.duplicates} duplicate mails: {'; '.join(self.duplicated[:5])}")
        if self.dead_letters:
            found.append(f"{self.fault}: {self.dead_letters} dead letters")
        if self.recovery_s is None:
            found.append(f"{self.fault}: the system did not settle")
        return found


def table(rows: list[Row], title: str) -> str:
    head = ("fault", "acked", "stored", "urgent", *(f"mails {i.split('@')[0]}" for i in INVESTIGATORS),
            "duplicates", "dead letters", "recovery s", "ok")
    lines = [title, "| " + " | ".join(head) + " |", "|" + "|".join("---:" if n else "---" for n in range(len(head))) + "|"]
    for r in rows:
        cells = (r.fault, f"{r.acked}/{r.records}", r.stored, r.urgent, *(r.mailed.get(i, 0) for i in INVESTIGATORS),
                 r.duplicates, r.dead_letters, "never" if r.recovery_s is None else f"{r.recovery_s:.1f}",
                 "no" if r.failures() else "yes")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the services


class Services:
    """The three services as child processes; SIGKILL one, start it again with the same settings."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str) -> None:
        with (self.logs / f"{role}.log").open("ab") as log:
            self.processes[role] = subprocess.Popen(
                [sys.executable, "-m", "services", role, "--no-migrate"], env=self.env,
                stdout=subprocess.DEVNULL, stderr=log)

    def kill(self, role: str) -> None:
        process = self.processes[role]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --------------------------------------------------------------------------- the client


class Client:
    """POSTs as a real client would: on a connection error or a 503 it tries again, with the same
    Idempotency-Key, until ``give_up_s`` has passed."""

    def __init__(self, base_url: str, token: str, give_up_s: float) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {token}"})
        self.give_up_s = give_up_s

    async def post(self, path: str, body: dict[str, Any]) -> tuple[bool, str]:
        """(acknowledged, what happened)."""
        key, deadline, pause = str(uuid.uuid4()), time.monotonic() + self.give_up_s, 0.1
        while time.monotonic() < deadline:
            try:
                answer = await self.http.post(path, json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError:
                pass
            else:
                if answer.status_code == 201:
                    return True, ""
                if answer.status_code != 503:
                    return False, f"{path}: {answer.status_code} {answer.text[:200]}"
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
        return False, f"{path}: no answer but connection errors and 503 for {self.give_up_s:.0f} s"

    async def close(self) -> None:
        await self.http.aclose()


def ago(days: float, plus_s: int = 0) -> str:
    return (datetime.now(UTC) - timedelta(days=days) + timedelta(seconds=plus_s)).isoformat()


def enrolment(subject: str) -> dict[str, Any]:
    return {"subject_id": subject, "site_id": "S01", "arm": "blinatumomab_dli", "cohort": "mrd_positive",
            "age_years": 40, "weight_kg": 70.0, "enrolled_at": ago(3), "transplant_date": "2025-03-02",
            "relapse_date": "2025-11-20", "eligibility": ELIGIBLE}


def first_dose() -> dict[str, Any]:
    return {"type": "blinatumomab_dose", "occurred_at": ago(2), "course": 1, "day": 1, "dose_ug": 15.0}


def lab(n: int) -> dict[str, Any]:
    return {"type": "lab", "occurred_at": ago(1, n), "test": "platelets", "value": 200.0, "unit": "10^9/L"}


def icans() -> dict[str, Any]:
    return {"type": "icans", "occurred_at": ago(1), "grade": 3}


# --------------------------------------------------------------------------- the matrix


class Matrix:
    def __init__(self, database_url: str, work: Path, form: Form,
                 progress: Callable[[Row], None] | None = None) -> None:
        self.database_url, self.work, self.form, self.progress = database_url, work, form, progress
        self.rows: list[Row] = []
        self.engine: AsyncEngine = make_engine(database_url)
        self.nats = EmbeddedNats(work / "nats")
        self.capture = MailCapture(work, host="127.0.0.1", port=free_port())
        self.http_port = free_port()
        tag = uuid.uuid4().hex[:10]
        self.stream = f"TWFM_{tag}"
        self.env = {**os.environ, "TRIALWATCH_DATABASE_URL": database_url, "TRIALWATCH_NATS_URL": self.nats.url,
                    "TRIALWATCH_SMTP_URL": self.capture.url, "TRIALWATCH_HTTP_PORT": str(self.http_port),
                    "TRIALWATCH_STREAM_NAME": self.stream, "TRIALWATCH_SUBJECT_PREFIX": f"twfm{tag}",
                    "TRIALWATCH_INVESTIGATOR_EMAILS": ",".join(INVESTIGATORS), "TRIALWATCH_DATA_DIR": str(work),
                    # A killed worker's messages come back after 5 s, not the production minute.
                    "TRIALWATCH_ACK_WAIT_S": "5",
                    # A killed notifier's mail in hand goes out after 10 s, not the production two minutes.
                    "TRIALWATCH_MAIL_LEASE_S": "10"}
        self.env.pop("TRIALWATCH_DSMB_EMAILS", None)
        self.services = Services(self.env, work)
        self.client: Client | None = None

    # ------------------------------------------------------------------ running it

    async def run(self, faults: tuple[str, ...] = FAULTS) -> list[Row]:
        try:
            await self._start()
            for fault in faults:
                self.rows.append(await self._one(fault))
                if self.progress:
                    self.progress(self.rows[-1])
        finally:
            await self._stop()
        return self.rows

    def failures(self) -> list[str]:
        return [problem for row in self.rows for problem in row.failures()]

    async def _start(self) -> None:
        self.nats.start()
        await self.capture.start()
        async with self.engine.begin() as conn:
            token = await create_token(conn, user="fault-matrix", role="site_staff", site_id="S01")
        for role in SERVICES:
            self.services.start(role)
        self.client = Client(f"http://127.0.0.1:{self.http_port}", token, self.form.give_up_s)
        await self._until(self._ready, 120, "the API did not answer /readyz with 200")

    async def _stop(self) -> None:
        if self.client:
            await self.client.close()
        await asyncio.to_thread(self.services.stop_all)
        await self.capture.stop()
        self.nats.stop()
        await self.engine.dispose()

    async def _ready(self) -> bool:
        assert self.client
        with contextlib.suppress(httpx.HTTPError):
            return (await self.client.http.get("/readyz")).status_code == 200
        return False

    @staticmethod
    async def _until(check: Callable[[], Awaitable[bool]], timeout: float, failure: str) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await check():
                return time.monotonic()
            await asyncio.sleep(0.5)
        raise AssertionError(failure)

    # ------------------------------------------------------------------ one fault

    async def _one(self, fault: str) -> Row:
        assert self.client
        row = Row(fault, records=self.form.records)
        tag = fault[:3].upper()
        labs = [f"S01-{tag}L{n}-{uuid.uuid4().hex[:4]}" for n in range(SENDERS)]
        urgent = [f"S01-{tag}U{n}-{uuid.uuid4().hex[:4]}" for n in range(self.form.records // URGENT_EVERY)]
        row.urgent = len(urgent)
        await asyncio.gather(*(self._enrol(subject, row) for subject in labs + urgent))
        dead_before = await self._dead_letters()

        # The records, dealt to the senders: sender i posts to its own lab patient and to some urgent ones.
        plan: list[list[tuple[str, dict[str, Any]]]] = [[] for _ in range(SENDERS)]
        pending_urgent = list(urgent)
        for n in range(self.form.records):
            sender = n % SENDERS
            if n % URGENT_EVERY == URGENT_EVERY // 2 and pending_urgent:
                plan[sender].append((pending_urgent.pop(), icans()))
            else:
                plan[sender].append((labs[sender], lab(n)))
        sent = 0
        started = asyncio.Event()

        async def send(records: list[tuple[str, dict[str, Any]]]) -> None:
            nonlocal sent
            for subject, body in records:
                acked, problem = await self.client.post(f"/v1/patients/{subject}/events", body)  # type: ignore[union-attr]
                row.acked += acked
                if problem:
                    row.refused.append(problem)
                sent += 1
                if sent >= self.form.records // 4:
                    started.set()

        load = asyncio.gather(*(send(records) for records in plan))
        try:
            await asyncio.wait([asyncio.ensure_future(started.wait()), load], return_when=asyncio.FIRST_COMPLETED)
            await self._fault(fault)
            fault_end = time.monotonic()
            await load
        finally:
            load.cancel()  # a fault that failed leaves no client posting

        settle_deadline = time.monotonic() + self.form.settle_timeout_s
        while time.monotonic() < settle_deadline:
            if await self._settled():
                row.recovery_s = time.monotonic() - fault_end
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1)  # a duplicate would come now
        await self._count(row, labs + urgent, set(urgent), dead_before)
        return row

    async def _enrol(self, subject: str, row: Row) -> None:
        assert self.client
        for path, body in (("/v1/patients", enrolment(subject)), (f"/v1/patients/{subject}/events", first_dose())):
            acked, problem = await self.client.post(path, body)
            if not acked:
                row.refused.append(f"enrolment: {problem}")
                return

    # ------------------------------------------------------------------ the faults

    async def _fault(self, fault: str) -> None:
        seconds = self.form.fault_s
        if fault in SERVICES:
            await asyncio.to_thread(self.services.kill, fault)
            await asyncio.sleep(seconds)
            self.services.start(fault)
        elif fault == "broker":
            assert self.nats.process
            self.nats.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(self.nats.process.wait)
            await asyncio.sleep(seconds)
            await asyncio.to_thread(self.nats.start)
        elif fault == "database":
            await self._database_fault(seconds)
        elif fault == "smtp":
            await self.capture.stop()
            await asyncio.sleep(seconds)
            await self.capture.start()
        else:
            raise ValueError(f"no fault named {fault!r}")

    async def _database_fault(self, seconds: float) -> None:
        url = make_url(self.database_url)
        if url.get_backend_name() == "sqlite":
            await asyncio.to_thread(hold_exclusive_lock, str(url.database), seconds)
            return
        conn = await asyncpg.connect(host=url.host, port=url.port or 5432, user=url.username, password=url.password,
                                     database=url.database)
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    # ------------------------------------------------------------------ the books

    async def _settled(self) -> bool:
        """Nothing left to do: the outbox empty, every mail sent, both consumers acked the whole stream."""
        try:
            async with self.engine.connect() as conn:
                unpublished = await conn.scalar(select(func.count()).select_from(outbox))
                unsent = await conn.scalar(select(func.count()).select_from(deliveries)
                                           .where(deliveries.c.status != "sent"))
            if unpublished or unsent:
                return False
            return (await caught_up(self.nats.url, self.stream, SAFETY)
                    and await caught_up(self.nats.url, self.stream, NOTIFY))
        except Exception:  # the broker or the database is not back yet
            return False

    async def _dead_letters(self) -> int:
        async with self.engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(dead_letters)) or 0)

    async def _count(self, row: Row, subjects: list[str], urgent: set[str], dead_before: int) -> None:
        async with self.engine.connect() as conn:
            row.stored = int(await conn.scalar(select(func.count()).select_from(events).where(
                events.c.subject_id.in_(subjects), events.c.type.in_(("lab", "icans")))) or 0)
        row.dead_letters = await self._dead_letters() - dead_before
        copies: Counter[str] = Counter()
        titles: dict[str, str] = {}
        urgent_mails: Counter[tuple[str, str]] = Counter()
        for message in await asyncio.to_thread(self.capture.messages):
            title = str(message["Subject"])
            subject = next((s for s in subjects if s in title), None)
            if subject is None:
                continue
            copies[str(message["Message-ID"])] += 1
            titles[str(message["Message-ID"])] = f"{title} -> {message['X-Envelope-To']}"
            if subject in urgent and " URGENT " in f" {title} ":
                for recipient in str(message["X-Envelope-To"]).split(", "):
                    urgent_mails[(subject, recipient)] += 1
        row.duplicates = sum(n - 1 for n in copies.values())
        row.duplicated = [titles[m] for m, n in copies.items() if n > 1]
        row.mailed = {i: sum(n for (_, r), n in urgent_mails.items() if r == i) for i in INVESTIGATORS}
        row.not_once = [f"{s} -> {i}: {urgent_mails[(s, i)]} urgent mails" for s in sorted(urgent)
                        for i in INVESTIGATORS if urgent_mails[(s, i)] != 1]


def hold_exclusive_lock(path: str, seconds: float) -> None:
    """Another connection holds SQLite's write lock (BEGIN EXCLUSIVE) for ``seconds``."""
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


# --------------------------------------------------------------------------- one command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="a few thousand records and 10 s faults")
    parser.add_argument("--records", type=int, help="records per fault (default: 50, --full: 500)")
    parser.add_argument("--fault-seconds", type=float, help="how long each fault lasts (default: 2, --full: 10)")
    parser.add_argument("--faults", default=",".join(FAULTS), help="which, in order (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the service logs and mail (and the SQLite file)")
    args = parser.parse_args()
    form = FULL if args.full else SHORT
    form = Form(records=args.records or form.records, fault_s=args.fault_seconds or form.fault_s,
                settle_timeout_s=form.settle_timeout_s, give_up_s=form.give_up_s)
    faults = tuple(f for f in args.faults.split(",") if f)

    from shared.store.engine import migrate
    from tests.support.services import fresh_database

    work = (contextlib.nullcontext(tempfile.mkdtemp(prefix="fault-matrix-")) if args.keep
            else tempfile.TemporaryDirectory(prefix="fault-matrix-"))
    with work as tmp, fresh_database(Path(tmp)) as url:
        migrate(url)
        database = make_url(url).get_backend_name()
        print(f"fault matrix: {form.records} records per fault, faults of {form.fault_s:g} s, {database}; "
              f"service logs in {tmp}", flush=True)
        matrix = Matrix(url, Path(tmp), form, progress=lambda row: print(f"  {row.fault}: done", flush=True))
        started = time.monotonic()
        rows = asyncio.run(matrix.run(faults))
        title = (f"== fault matrix, {database}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
                 f"{time.monotonic() - started:.0f} s in all")
        print(table(rows, title))
        problems = matrix.failures()
        for problem in problems:
            print(f"FAIL {problem}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
