"""The bulk import, ``POST /v1/events:bulk`` (CONTRACT.md section 2), and the group commit under it."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest import bulk
from services.ingest.app import create_app
from services.safety.handlers import SafetyMonitor
from shared.events import ALERT_TYPES, patient_stream
from shared.protocol import Protocol
from shared.settings import Settings
from shared.store import eventstore
from shared.store.tables import patient_heads
from tests.support.api import bearer, enrol, enrolment, post_event, subject

AT = "2025-12-01T10:00:00+08:00"
NDJSON = {"Content-Type": "application/x-ndjson"}


def ndjson(*lines: dict[str, Any] | str) -> bytes:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode() + b"\n"


def lab(subject_id: str, value: float = 0.4, at: str = AT) -> dict[str, Any]:
    return {"subject_id": subject_id, "type": "lab", "occurred_at": at, "test": "neutrophils", "value": value,
            "unit": "10^9/L"}


async def import_(client: httpx.AsyncClient, token: str, body: bytes, **headers: str) -> httpx.Response:
    return await client.post("/v1/events:bulk", content=body, headers=bearer(token, **NDJSON, **headers))


async def history(engine: AsyncEngine, subject_id: str) -> list[eventstore.StoredEvent]:
    async with engine.connect() as conn:
        return await eventstore.read_stream(conn, patient_stream(subject_id))


async def test_an_enrolment_and_its_events_in_one_file_are_all_accepted_in_order(
        client: httpx.AsyncClient, tokens: dict[str, str], engine: AsyncEngine) -> None:
    sid = subject()
    lines = [{"type": "enrolment", **enrolment(sid)}, lab(sid, 0.4), lab(sid, 0.9),
             {"subject_id": sid, "type": "crs", "occurred_at": AT, "grade": 2}]

    answer = await import_(client, tokens["staff_s01"], ndjson(*lines))

    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": 4, "rejected": []}
    stored = await history(engine, sid)
    assert [e.type for e in stored] == ["patient_enrolled", "lab", "lab", "crs"]
    assert [e.stream_version for e in stored] == [1, 2, 3, 4]
    assert stored[1].data["grade"] == 4 and stored[1].data["scale"] == "CTCAE-5.0"  # derived as a single POST does
    async with engine.connect() as conn:
        head = (await conn.execute(select(patient_heads).where(patient_heads.c.stream_id == patient_stream(sid)))).one()
        checked, bad, why = await eventstore.verify_chain(conn)
    assert (head.site_id, head.stream_version) == ("S01", 4)
    assert bad is None and why == ""


async def test_each_bad_line_is_named_and_the_good_ones_are_stored(
        client: httpx.AsyncClient, tokens: dict[str, str], engine: AsyncEngine) -> None:
    sid, other = subject(), subject()
    lines: list[dict[str, Any] | str] = [
        {"type": "enrolment", **enrolment(sid)},
        lab(sid) | {"unit": "g/dL"},                                                  # 2: invalid field
        lab(other),                                                                   # 3: unknown patient
        {"subject_id": sid, "type": "death", "occurred_at": AT, "cause": "other"},    # 4: fine
        lab(sid, at="2025-12-03T10:00:00+08:00"),                                      # 5: after the death
        f'{{"subject_id": "{sid}", "type": "relapse", "occurred_at": "{AT}", "type": "relapse"}}',  # 6: dup key
        "not json",                                                                   # 7
        {"type": "relapse", "occurred_at": AT},                                       # 8: whose?
        {"type": "enrolment", **enrolment(site="S02")},                               # 9: another site
        {"type": "enrolment", **enrolment(sid)},                                      # 10: enrolled already
        "",                                                                           # 11: blank, skipped
        {"subject_id": sid, "type": "follow_up", "occurred_at": AT},                  # 12: fine (day of death)
    ]

    answer = await import_(client, tokens["staff_s01"], ndjson(*lines))

    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["accepted"] == 3
    by_line = {r["line"]: r for r in result["rejected"]}
    assert {k: r["status"] for k, r in by_line.items()} == {
        2: 422, 3: 404, 5: 422, 6: 422, 7: 422, 8: 422, 9: 403, 10: 409}
    assert [e["path"] for e in by_line[2]["errors"]] == ["unit"]
    assert [e["path"] for e in by_line[5]["errors"]] == ["occurred_at"]
    assert "death" in by_line[5]["errors"][0]["message"]
    assert "more than once" in by_line[6]["errors"][0]["message"]
    assert [e["path"] for e in by_line[8]["errors"]] == ["subject_id"]
    assert [e.type for e in await history(engine, sid)] == ["patient_enrolled", "death", "follow_up"]


async def test_a_line_bad_in_its_single_post_form_is_refused_the_same_way(
        client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    sid = await enrol(client, tokens["staff_s01"])
    single = await post_event(client, tokens["staff_s01"], sid,
                              {"type": "crs", "occurred_at": AT, "max_temp_c": 39.0})
    answer = await import_(client, tokens["staff_s01"], ndjson(
        {"subject_id": sid, "type": "crs", "occurred_at": AT, "max_temp_c": 39.0}))
    [line] = answer.json()["rejected"]
    assert (line["status"], line["errors"]) == (single.status_code, single.json()["errors"])


async def test_a_sites_staff_import_only_their_sites_lines(
        client: httpx.AsyncClient, tokens: dict[str, str], engine: AsyncEngine) -> None:
    theirs = await enrol(client, tokens["staff_s02"], site="S02")
    elsewhere = subject()
    answer = await import_(client, tokens["staff_s01"], ndjson(
        lab(theirs), {"type": "enrolment", **enrolment(elsewhere), "site_id": "S02"}))
    assert answer.json()["accepted"] == 0
    # Another site's patient is answered as an unknown one (no probing); enrolling there is refused.
    assert [r["status"] for r in answer.json()["rejected"]] == [404, 403]
    assert len(await history(engine, theirs)) == 1
    refused = await import_(client, tokens["investigator"], ndjson(lab(theirs)))
    assert refused.status_code == 403


async def test_the_idempotency_key_covers_the_whole_request(
        client: httpx.AsyncClient, tokens: dict[str, str], engine: AsyncEngine) -> None:
    sid = subject()
    body = ndjson({"type": "enrolment", **enrolment(sid)}, lab(sid), lab(sid, 0.2))
    key = str(uuid.uuid4())

    first = await import_(client, tokens["staff_s01"], body, **{"Idempotency-Key": key})
    again = await import_(client, tokens["staff_s01"], body, **{"Idempotency-Key": key})
    other = await import_(client, tokens["staff_s01"], ndjson(lab(sid)), **{"Idempotency-Key": key})

    assert first.json() == again.json() == {"accepted": 3, "rejected": []}
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert other.status_code == 422
    assert len(await history(engine, sid)) == 3


async def test_too_many_lines_or_bytes_is_413_and_stores_nothing(
        client: httpx.AsyncClient, tokens: dict[str, str], engine: AsyncEngine,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sid = subject()
    body = ndjson({"type": "enrolment", **enrolment(sid)}, lab(sid), lab(sid))
    monkeypatch.setattr(bulk, "MAX_LINES", 2)
    assert (await import_(client, tokens["staff_s01"], body)).status_code == 413
    monkeypatch.setattr(bulk, "MAX_LINES", 100)
    monkeypatch.setattr(bulk, "MAX_BYTES", len(body) - 1)
    too_big = await import_(client, tokens["staff_s01"], body)
    assert too_big.status_code == 413 and too_big.headers["content-type"].startswith("application/problem+json")
    assert await history(engine, sid) == []


async def test_lines_must_be_sent_as_ndjson(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    answer = await client.post("/v1/events:bulk", content=ndjson(lab(subject())),
                               headers=bearer(tokens["staff_s01"], **{"Content-Type": "application/json"}))
    assert answer.status_code == 415
    assert [e["path"] for e in answer.json()["errors"]] == ["Content-Type"]


# --- the group commit under every patient write ------------------------------------------

async def test_concurrent_writes_share_commits_and_a_bad_one_spoils_none_of_the_others(
        client: httpx.AsyncClient, tokens: dict[str, str], engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tokens["staff_s01"]
    patients = [await enrol(client, token) for _ in range(3)]
    bodies = [(p, {"type": "lab", "occurred_at": AT, "test": "platelets", "value": 40 + k, "unit": "10^9/L"})
              for k in range(10) for p in patients]
    bad = (patients[0], {"type": "lab", "occurred_at": AT, "test": "platelets", "value": 40, "unit": "g/dL"})

    # A batch is stored by one flush (one transaction, or on PostgreSQL one autocommitted call).
    flushes = 0
    flush = eventstore.Batch.flush

    async def counted(self: eventstore.Batch, *args: Any, **kwargs: Any) -> None:
        nonlocal flushes
        flushes += 1
        await flush(self, *args, **kwargs)

    monkeypatch.setattr(eventstore.Batch, "flush", counted)
    answers = await asyncio.gather(*(post_event(client, token, p, b)
                                     for p, b in [*bodies[:15], bad, *bodies[15:]]))

    assert [a.status_code for a in answers] == [201] * 15 + [422] + [201] * 15
    assert flushes < 30  # writes that arrived together were stored together
    async with engine.connect() as conn:
        for p in patients:
            stream = await eventstore.read_stream(conn, patient_stream(p))
            assert [e.stream_version for e in stream] == list(range(1, 12))
        heads = await eventstore.read_patient_heads(conn, [patient_stream(p) for p in patients])
        assert {h.stream_version for h in heads.values()} == {11}
        _, bad_event, why = await eventstore.verify_chain(conn)
    assert bad_event is None and why == ""


async def test_a_stream_appended_to_elsewhere_has_its_head_built_again(
        client: httpx.AsyncClient, tokens: dict[str, str], engine: AsyncEngine) -> None:
    sid = await enrol(client, tokens["staff_s01"])
    death = {"type": "death", "occurred_at": AT, "cause": "other"}
    async with engine.begin() as conn:  # not through the ingest: the head row goes
        [stored] = await eventstore.append(conn, patient_stream(sid), [eventstore_event(sid, death)])
    later = await post_event(client, tokens["staff_s01"], sid, {"type": "relapse",
                                                                 "occurred_at": "2025-12-05T10:00:00+08:00"})
    assert later.status_code == 422 and str(stored.event_id) in later.text
    assert (await post_event(client, tokens["staff_s01"], sid, {"type": "follow_up", "occurred_at": AT},
                             **{"If-Match": "2"})).status_code == 201


def eventstore_event(sid: str, body: dict[str, Any]) -> Any:
    from shared.events import NewEvent

    data = {k: v for k, v in body.items() if k not in ("type", "occurred_at")}
    return NewEvent(type=body["type"], subject_id=sid, occurred_at=datetime.fromisoformat(body["occurred_at"]),
                    recorded_by="elsewhere", data=data)


# --- safety does not raise and withdraw line by line while an import lands -----------------

SHANGHAI = ZoneInfo("Asia/Shanghai")
DAY1 = datetime(2025, 12, 1, tzinfo=SHANGHAI).date()


def day(n: int, hour: int = 10) -> datetime:
    return datetime.combine(DAY1 + timedelta(days=n - 1), time(hour), tzinfo=SHANGHAI)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now.astimezone(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def ward(engine: AsyncEngine, protocol: Protocol, tmp_path: Path,
               tokens: dict[str, str]) -> AsyncIterator[tuple[httpx.AsyncClient, SafetyMonitor, Clock]]:
    clock = Clock(day(33))  # a month after the course began
    app = create_app(Settings(data_dir=tmp_path), engine=engine, protocol=protocol)
    app.state.clock = clock
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
        yield client, SafetyMonitor(engine, protocol, clock), clock


async def deliver_all(engine: AsyncEngine, monitor: SafetyMonitor, subject_id: str, after: int = 0) -> None:
    """Each imported event to the safety monitor, one by one, as the bus consumer would."""
    for event in await history(engine, subject_id):
        if event.stream_version > after:
            async with engine.begin() as conn:
                await monitor.on_event(conn, event)


def month_old_course(sid: str) -> list[dict[str, Any]]:
    dose = {"subject_id": sid, "type": "blinatumomab_dose", "course": 1, "dose_ug": 28.0}
    return [{"type": "enrolment", **enrolment(sid, cohort="mrd_positive", enrolled_at=day(0, 9).isoformat())},
            dose | {"occurred_at": day(1).isoformat(), "day": 1}, dose | {"occurred_at": day(5).isoformat(), "day": 5}]


DAY14 = {"type": "assessment_completed", "occurred_at": day(14, 16).isoformat(), "timepoint": "day14"}


@pytest.mark.parametrize("split", [False, True], ids=["one-import", "two-imports-seconds-apart"])
async def test_a_month_old_course_and_its_day14_assessment_raise_and_withdraw_nothing(
        ward: tuple[httpx.AsyncClient, SafetyMonitor, Clock], tokens: dict[str, str], engine: AsyncEngine,
        protocol: Protocol, split: bool) -> None:
    client, monitor, clock = ward
    sid = subject()
    first = month_old_course(sid) + ([] if split else [DAY14 | {"subject_id": sid}])
    assert (await import_(client, tokens["staff_s01"], ndjson(*first))).json()["rejected"] == []
    await deliver_all(engine, monitor, sid)
    if split:  # the rest of the file a few seconds later: inside the settle period
        clock.now += timedelta(seconds=protocol.entry.settle_seconds / 2)
        assert (await import_(client, tokens["staff_s01"], ndjson(DAY14 | {"subject_id": sid}))).status_code == 200
        await deliver_all(engine, monitor, sid, after=3)

    clock.now += timedelta(seconds=protocol.entry.settle_seconds) + timedelta(hours=1)
    await monitor.check(sid)

    async with engine.connect() as conn:
        alerts = await eventstore.read_types(conn, ALERT_TYPES, subject_id=sid)
    assert [(a.type, a.data.get("kind")) for a in alerts] == []


async def test_after_the_database_dropped_every_connection_one_request_at_most_fails(
        client: httpx.AsyncClient, tokens: dict[str, str], engine: AsyncEngine) -> None:
    """No ping per checkout: the first statement on a dead connection fails (503, Retry-After) and
    empties the pool; the next request runs on fresh connections."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no server to drop connections")
    import asyncpg

    sid = await enrol(client, tokens["staff_s01"])
    url = engine.url
    outside = await asyncpg.connect(user=url.username, password=url.password, host=url.host, port=url.port,
                                    database=url.database)
    try:  # what a server restart does to every pooled connection
        await outside.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                              "where datname = current_database() and pid <> pg_backend_pid()")
    finally:
        await outside.close()

    body = {"type": "follow_up", "occurred_at": AT}
    first = await post_event(client, tokens["staff_s01"], sid, body)
    second = await post_event(client, tokens["staff_s01"], sid, body)

    assert first.status_code in (201, 503), first.text
    assert second.status_code == 201, second.text


async def test_a_stream_another_process_appends_to_after_the_batch_read_it_is_decided_again(
        client: httpx.AsyncClient, tokens: dict[str, str], engine: AsyncEngine) -> None:
    """The batch reads before it holds the chain head (PostgreSQL: the flush's one statement takes
    it; SQLite: the batch is decided on a read snapshot, then stored in a write transaction): a
    write by another process in between makes the flush store nothing, and the batch runs again
    with the lock taken first."""
    from services.ingest.idempotency import Answer
    from services.ingest.ledger import Ledger
    from services.ingest.unit_of_work import UnitOfWork
    from shared.events import NewEvent, StoredEvent

    sid = await enrol(client, tokens["staff_s01"])
    elsewhere = [eventstore_event(sid, {"type": "follow_up", "occurred_at": AT})]
    decided: list[int] = []

    async def work(ledger: Ledger) -> StoredEvent:
        head = await ledger.head(sid)
        assert head is not None
        decided.append(head.stream_version)
        if len(decided) == 1:  # another process appends after this batch read the head
            async with engine.begin() as conn:
                await eventstore.append(conn, patient_stream(sid), elsewhere)
        event = NewEvent(type="follow_up", subject_id=sid, occurred_at=datetime.fromisoformat(AT),
                         recorded_by="test", data={})
        return await ledger.append(head, event)

    uow = UnitOfWork(engine, lambda: datetime.now(UTC))
    answer = await uow.write(work, lambda stored: Answer(201, stored.public()), subjects=(sid,))

    assert decided == [1, 2] and answer.body["stream_version"] == 3
    async with engine.connect() as conn:
        stream = await eventstore.read_stream(conn, patient_stream(sid))
        assert [(e.stream_version, e.recorded_by) for e in stream][1:] == [(2, "elsewhere"), (3, "test")]
        assert (await eventstore.read_patient_heads(conn, [patient_stream(sid)]))[patient_stream(sid)].stream_version == 3
        assert (await eventstore.verify_chain(conn))[1:] == (None, "")


async def test_on_sqlite_a_batch_is_decided_while_another_writer_holds_the_lock_and_stored_after(
        client: httpx.AsyncClient, tokens: dict[str, str], engine: AsyncEngine) -> None:
    """SQLite has one write lock: the group commit decides on a read snapshot (no lock), and only
    its store waits for the lock. Deciding inside the write transaction held the lock while the
    safety service and the notifier waited."""
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL has no store-wide write lock: its batch is one statement")
    import sqlite3

    from services.ingest.idempotency import Answer
    from services.ingest.ledger import Ledger
    from services.ingest.unit_of_work import UnitOfWork
    from shared.events import NewEvent, StoredEvent

    sid = await enrol(client, tokens["staff_s01"])
    decided = asyncio.Event()

    async def work(ledger: Ledger) -> StoredEvent:
        head = await ledger.head(sid)
        assert head is not None
        decided.set()
        return await ledger.append(head, NewEvent(type="follow_up", subject_id=sid, recorded_by="test",
                                                  occurred_at=datetime.fromisoformat(AT), data={}))

    uow = UnitOfWork(engine, lambda: datetime.now(UTC))
    holder = sqlite3.connect(str(engine.url.database), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        writing = asyncio.create_task(uow.write(work, lambda stored: Answer(201, stored.public()), subjects=(sid,)))
        await asyncio.wait_for(decided.wait(), 5)  # decided while the lock is held elsewhere
        await asyncio.sleep(0.2)
        assert not writing.done()  # but not stored, nor answered, before the lock is free
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    answer = await asyncio.wait_for(writing, 30)
    assert answer.status == 201 and answer.body["stream_version"] == 2
    async with engine.connect() as conn:
        assert [e.stream_version for e in await eventstore.read_stream(conn, patient_stream(sid))] == [1, 2]
        assert (await eventstore.verify_chain(conn))[1:] == (None, "")


async def test_a_write_with_an_idempotency_key_takes_the_lock_first_only_on_sqlite(
        client: httpx.AsyncClient, tokens: dict[str, str], engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key is looked up and kept in the batch's one transaction. On SQLite that transaction holds
    the write lock from its BEGIN, so the batch is decided under it; on PostgreSQL it is still
    decided before the flush takes the chain head (a bulk import holds it for a moment, not for
    the whole file's checks)."""
    sid = await enrol(client, tokens["staff_s01"])
    batches: list[str] = []
    locked, deferred = eventstore.Batch.begin.__func__, eventstore.Batch.deferred_on.__func__  # type: ignore[attr-defined]

    async def begin(cls: type[eventstore.Batch], conn: Any) -> eventstore.Batch:
        batches.append("lock first")
        return await locked(cls, conn)  # type: ignore[no-any-return]

    def deferred_on(cls: type[eventstore.Batch], conn: Any) -> eventstore.Batch:
        batches.append("decide first")
        return deferred(cls, conn)  # type: ignore[no-any-return]

    monkeypatch.setattr(eventstore.Batch, "begin", classmethod(begin))
    monkeypatch.setattr(eventstore.Batch, "deferred_on", classmethod(deferred_on))
    answer = await post_event(client, tokens["staff_s01"], sid, {"type": "follow_up", "occurred_at": AT},
                              **{"Idempotency-Key": f"k-{uuid.uuid4()}"})
    assert answer.status_code == 201, answer.text
    assert batches == (["decide first"] if engine.dialect.name == "postgresql" else ["lock first"])


async def test_what_a_group_commit_answers_is_what_is_read_back(
        client: httpx.AsyncClient, tokens: dict[str, str], engine: AsyncEngine) -> None:
    """Events of one batch, positions included (on PostgreSQL the server gives them), are the stored ones."""
    from services.ingest.idempotency import Answer
    from services.ingest.ledger import Ledger
    from services.ingest.unit_of_work import UnitOfWork
    from shared.events import NewEvent, StoredEvent

    sids = [await enrol(client, tokens["staff_s01"]) for _ in range(2)]

    async def work(ledger: Ledger, sid: str, k: int) -> StoredEvent:
        head = await ledger.head(sid)
        assert head is not None
        return await ledger.append(head, NewEvent(type="follow_up", subject_id=sid, recorded_by="test",
                                                  occurred_at=datetime.fromisoformat(AT), data={"k": k}))

    uow = UnitOfWork(engine, lambda: datetime.now(UTC))
    answers = await asyncio.gather(*(
        uow.write(lambda ledger, s=sid, k=k: work(ledger, s, k),  # type: ignore[misc]
                  lambda stored: Answer(201, stored.model_dump(mode="json")), subjects=(sid,))
        for k in range(4) for sid in sids))

    async with engine.connect() as conn:
        stored = [e.model_dump(mode="json") for sid in sids for e in await eventstore.read_stream(
            conn, patient_stream(sid)) if e.stream_version > 1]
        assert (await eventstore.verify_chain(conn))[1:] == (None, "")
    assert sorted((a.body for a in answers), key=lambda e: e["position"]) == sorted(stored, key=lambda e: e["position"])
    assert len({a.body["position"] for a in answers}) == 8
