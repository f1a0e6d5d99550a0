"""The DSMB summary against a real database and a real SMTP server (aiosmtpd on loopback).

Exactly once per period, whoever races for it and whatever dies on the way; late, yet with the
figures it would have shown on time. Time is a ``Clock`` the test moves; mails are matched by the
period's Message-ID, so digests of other tests sharing the session's database never count here.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import TypeAdapter
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.notify.capture import MailCapture
from services.notify.digests import LEASE, DigestNotSentError, DigestService, latest_fire_time
from services.notify.mailer import Mailer, MailerUnavailable, SmtpMailer
from shared.clinical.grading import derive_data
from shared.events import PATIENT_ENROLLED, ClinicalEventBody, Enrolment, NewEvent, patient_stream
from shared.protocol import Protocol
from shared.store.eventstore import append, now_utc, utc
from shared.store.tables import digests, events

DSMB = ["dsmb-chair@trial.test", "dsmb-statistician@trial.test"]
SHANGHAI = ZoneInfo("Asia/Shanghai")
WEEKLY = "0 8 * * mon"  # the bundled protocol's [digest] cron, in the trial's zone
BODIES: TypeAdapter[Any] = TypeAdapter(ClinicalEventBody)


class Clock:
    """The service's notion of now (UTC, as ``now_utc``), moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now.astimezone(UTC)

    def __call__(self) -> datetime:
        return self.now

    def set(self, moment: datetime) -> None:
        self.now = moment.astimezone(UTC)

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class HangingMailer:
    """Accepts the connection, never returns: the replica is stuck (then killed) mid-send."""

    def __init__(self, forward: Mailer | None = None) -> None:
        self.forward, self.entered = forward, asyncio.Event()

    async def send(self, message: EmailMessage, *, accepted: Callable[[], None] | None = None,
                   handed: Callable[[], None] | None = None) -> None:
        if self.forward is not None:
            await self.forward.send(message, accepted=accepted, handed=handed)
        self.entered.set()
        await asyncio.Event().wait()


def shanghai(day: int, hour: int, minute: int = 0, *, month: int = 11) -> datetime:
    return datetime(2025, month, day, hour, minute, tzinfo=SHANGHAI)


def period() -> str:
    return f"request:{uuid.uuid4()}"


def replica(engine: AsyncEngine, protocol: Protocol, mailer: Mailer, clock: Callable[[], datetime],
            name: str) -> DigestService:
    return DigestService(engine, mailer, protocol, recipients=DSMB, mail_from="trialwatch@localhost",
                         clock=clock, replica=name)


async def row_of(engine: AsyncEngine, key: str) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(digests).where(digests.c.period_key == key))).one()


async def mails_of(engine: AsyncEngine, capture: MailCapture, key: str) -> list[EmailMessage]:
    message_id = (await row_of(engine, key)).message_id
    return [m for m in capture.messages() if m["Message-ID"] == message_id]


def summary_json(mail: EmailMessage) -> dict[str, Any]:
    [part] = [p for p in mail.iter_attachments() if p.get_filename() == "summary.json"]
    return json.loads(part.get_content())


def cutoff_of(mail: EmailMessage) -> datetime:
    return datetime.fromisoformat(summary_json(mail)["data_cutoff"])


@pytest.fixture
async def capture(data_dir: Path) -> AsyncIterator[MailCapture]:
    async with MailCapture(data_dir) as running:
        yield running


async def stopped_capture(data_dir: Path) -> MailCapture:
    """An SMTP capture that has a port but is down: start it again to bring the server back."""
    capture = MailCapture(data_dir / "later")
    await capture.start()
    await capture.stop()  # nothing listens on its port now
    return capture


@pytest.fixture
def smtp(capture: MailCapture) -> SmtpMailer:
    return SmtpMailer.from_url(capture.url, timeout=5)


# --------------------------------------------------------------------------- replicas racing


async def test_five_replicas_racing_for_one_period_send_one_mail(
    engine: AsyncEngine, protocol: Protocol, capture: MailCapture, smtp: SmtpMailer
) -> None:
    clock, key = Clock(now_utc()), period()
    replicas = [replica(engine, protocol, smtp, clock, f"replica-{n}") for n in range(5)]

    # All of them try the same period at the same moment: one gets in.
    results = await asyncio.gather(*(r.send(key, clock()) for r in replicas))
    assert results.count("sent") == 1
    assert set(results) - {"sent"} <= {"busy", "already_sent"}

    # One mail arrived; the row names the winner; everyone now sees it sent.
    [mail] = await mails_of(engine, capture, key)
    assert sorted(a for _, a in getaddresses([str(mail["To"])])) == sorted(DSMB)
    row = await row_of(engine, key)
    assert (row.status, row.attempts, row.claimed_by) == ("sent", 1, f"replica-{results.index('sent')}")
    assert await asyncio.gather(*(r.send(key, clock()) for r in replicas)) == ["already_sent"] * 5
    assert len(await mails_of(engine, capture, key)) == 1


# --------------------------------------------------------------------------- a replica dies mid-send


async def test_a_replica_killed_before_its_mail_went_out_is_taken_over_after_its_lease(
    engine: AsyncEngine, protocol: Protocol, capture: MailCapture, smtp: SmtpMailer
) -> None:
    clock, key = Clock(now_utc()), period()
    t0 = clock()

    # Replica A claims the period, hangs in the SMTP conversation and is killed.
    stuck = HangingMailer()
    a = replica(engine, protocol, stuck, clock, "replica-a")
    sending = asyncio.create_task(a.send(key, t0))
    await asyncio.wait_for(stuck.entered.wait(), 20)
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)
    row = await row_of(engine, key)
    assert (row.status, row.claimed_by) == ("sending", "replica-a")

    # While A's lease holds, B neither sends it itself nor retries it.
    b = replica(engine, protocol, smtp, clock, "replica-b")
    assert await b.send(key, t0) == "busy"
    clock.advance(seconds=LEASE.total_seconds() - 1)
    await b.retry_unsent()
    assert await mails_of(engine, capture, key) == []

    # The lease runs out: B's retry sends it, once; B's later checks send nothing more.
    clock.advance(seconds=2)
    await b.retry_unsent()
    await b.retry_unsent()
    assert await b.send(key, t0) == "already_sent"
    [mail] = await mails_of(engine, capture, key)
    assert cutoff_of(mail) == t0
    row = await row_of(engine, key)
    assert (row.status, row.claimed_by, row.attempts) == ("sent", "replica-b", 2)


async def test_a_claim_left_by_a_dead_replica_blocks_until_its_lease_has_passed(
    engine: AsyncEngine, protocol: Protocol, capture: MailCapture, smtp: SmtpMailer
) -> None:
    clock, key = Clock(now_utc()), period()
    cutoff = shanghai(24, 8)  # a scheduled fire time, in the trial's zone
    async with engine.begin() as conn:  # as a replica leaves it when its process dies mid-send
        await conn.execute(insert(digests).values(
            period_key=key, status="sending", data_cutoff=cutoff.astimezone(UTC), claimed_by="dead",
            claimed_until=clock() + timedelta(minutes=3), attempts=1, message_id=f"<digest.{uuid.uuid4()}@trialwatch>",
            created_at=clock(),
        ))
    b = replica(engine, protocol, smtp, clock, "replica-b")

    assert await b.send(key, clock()) == "busy"
    await b.retry_unsent()
    assert await mails_of(engine, capture, key) == []

    clock.advance(minutes=3)
    await b.retry_unsent()
    assert await b.send(key, clock()) == "already_sent"
    [mail] = await mails_of(engine, capture, key)
    assert cutoff_of(mail) == cutoff  # the claim's cutoff, not the moment of the retry
    assert (await row_of(engine, key)).claimed_by == "replica-b"


async def test_a_replica_killed_after_the_server_accepted_its_mail_is_resent_with_the_same_message_id(
    engine: AsyncEngine, protocol: Protocol, capture: MailCapture, smtp: SmtpMailer
) -> None:
    """At least once, not exactly once, in this window: the DSMB's mail client deduplicates."""
    clock, key = Clock(now_utc()), period()
    accepted_then_stuck = HangingMailer(forward=smtp)
    a = replica(engine, protocol, accepted_then_stuck, clock, "replica-a")
    sending = asyncio.create_task(a.send(key, clock()))
    await asyncio.wait_for(accepted_then_stuck.entered.wait(), 20)
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)

    b = replica(engine, protocol, smtp, clock, "replica-b")
    clock.advance(seconds=LEASE.total_seconds() + 1)
    await b.retry_unsent()
    await b.retry_unsent()
    first, again = await mails_of(engine, capture, key)
    assert first["Message-ID"] == again["Message-ID"]
    assert (await row_of(engine, key)).status == "sent"


async def test_smtp_down_leaves_the_period_unsent_and_a_later_retry_sends_it_once(
    engine: AsyncEngine, protocol: Protocol, data_dir: Path
) -> None:
    capture = await stopped_capture(data_dir)
    clock, key = Clock(now_utc()), f"scheduled:{uuid.uuid4().hex[:12]}"
    cutoff = shanghai(24, 8)
    smtp = SmtpMailer.from_url(capture.url, timeout=2)
    a = replica(engine, protocol, smtp, clock, "replica-a")

    # The send fails; the row stays unsent, its lease released at once for the retry job.
    with pytest.raises(MailerUnavailable):
        await a.send(key, cutoff)
    row = await row_of(engine, key)
    assert (row.status, row.attempts) == ("sending", 1)
    assert "MailerUnavailable" in row.last_error

    # Still down at the next check: still unsent, nothing lost.
    clock.advance(minutes=5)
    await a.retry_unsent()
    assert (await row_of(engine, key)).status == "sending"

    # The server is back; another replica's retry sends it once, with the first cutoff.
    await capture.start()
    try:
        clock.advance(minutes=5)
        b = replica(engine, protocol, smtp, clock, "replica-b")
        await b.retry_unsent()
        await b.retry_unsent()
        assert await a.send(key, cutoff) == "already_sent"
        [mail] = await mails_of(engine, capture, key)
        assert cutoff_of(mail) == cutoff
        row = await row_of(engine, key)
        assert (row.status, row.claimed_by, row.attempts) == ("sent", "replica-b", 3)
    finally:
        await capture.stop()


async def test_a_requested_summary_waits_out_a_long_smtp_outage_with_backoff_and_goes_out_once(
    engine: AsyncEngine, protocol: Protocol, data_dir: Path
) -> None:
    capture = await stopped_capture(data_dir)
    clock, key = Clock(now_utc()), period()
    notifier = replica(engine, protocol, SmtpMailer.from_url(capture.url, timeout=2), clock, "notifier")

    # The request finds the server down: queued, not raised (its message is acked, never dead-lettered).
    assert await notifier.request(key, clock()) == "queued"

    # Each failure pushes the next try further off, 2^n s up to the cap; nothing gives up.
    waits = []
    for _ in range(12):
        row = await row_of(engine, key)
        waits.append((utc(row.claimed_until) - clock()).total_seconds())
        clock.set(utc(row.claimed_until))
        await notifier.retry_unsent()
    assert waits[:4] == [2, 4, 8, 16] and waits[-1] == notifier.max_backoff.total_seconds() == 300
    row = await row_of(engine, key)
    assert (row.status, row.attempts) == ("sending", 13) and "MailerUnavailable" in row.last_error
    assert await notifier.request(key, clock()) == "busy"  # a redelivered request waits its turn

    # The server is back: the next due retry sends it, once, with the cutoff of the request.
    await capture.start()
    try:
        clock.set(utc(row.claimed_until))
        await notifier.retry_unsent()
        await notifier.retry_unsent()
        [mail] = await mails_of(engine, capture, key)
        assert (await row_of(engine, key)).status == "sent"
        assert await notifier.request(key, clock()) == "already_sent"
        assert len(await mails_of(engine, capture, key)) == 1
    finally:
        await capture.stop()


async def test_digest_send_that_fails_says_so_and_leaves_nothing_to_go_out_later(
    engine: AsyncEngine, protocol: Protocol, data_dir: Path
) -> None:
    capture = await stopped_capture(data_dir)
    clock = Clock(now_utc())
    cli = replica(engine, protocol, SmtpMailer.from_url(capture.url, timeout=2), clock, "cli")

    # The operator's `trialwatch digest send` fails: it says so, and marks its period failed.
    with pytest.raises(DigestNotSentError, match="MailerUnavailable"):
        await cli.send_now(requested_by="cli")
    async with engine.connect() as conn:
        [failed] = (await conn.execute(select(digests).where(
            digests.c.period_key.startswith("manual:"), digests.c.claimed_by == "cli"))).all()
    assert failed.status == "failed"

    # The running notifier's retries, once the server is back, do not send it behind their back.
    await capture.start()
    try:
        clock.advance(minutes=10)
        await replica(engine, protocol, SmtpMailer.from_url(capture.url, timeout=5), clock, "daemon").retry_unsent()
        assert capture.messages() == []
        assert (await row_of(engine, failed.period_key)).status == "failed"
    finally:
        await capture.stop()


# --------------------------------------------------------------------------- down when due


def test_latest_fire_time_is_the_last_monday_0800_in_the_trial_zone_at_or_before_now() -> None:
    since = shanghai(1, 0)
    assert latest_fire_time(WEEKLY, "Asia/Shanghai", shanghai(26, 10), not_before=since) == shanghai(24, 8)
    assert latest_fire_time(WEEKLY, "Asia/Shanghai", shanghai(24, 8), not_before=since) == shanghai(24, 8)
    assert latest_fire_time(WEEKLY, "Asia/Shanghai", shanghai(24, 7, 59), not_before=since) == shanghai(17, 8)
    # Monday 08:00 in Shanghai is Monday 00:00 UTC, whatever zone "now" is given in.
    fire = latest_fire_time(WEEKLY, "Asia/Shanghai", datetime(2025, 11, 24, 0, 0, tzinfo=UTC), not_before=since)
    assert fire == datetime(2025, 11, 24, 0, 0, tzinfo=UTC) and fire.utcoffset() == timedelta(hours=8)


def test_latest_fire_time_never_goes_before_not_before() -> None:
    assert latest_fire_time(WEEKLY, "Asia/Shanghai", shanghai(24, 7), not_before=shanghai(20, 0)) is None
    assert latest_fire_time(WEEKLY, "Asia/Shanghai", shanghai(26, 10), not_before=shanghai(24, 8, 1)) is None
    assert latest_fire_time(WEEKLY, "Asia/Shanghai", shanghai(26, 10), not_before=shanghai(24, 8)) == shanghai(24, 8)


async def test_a_summary_due_while_the_notifier_was_down_goes_out_once_on_start(
    own_engine: AsyncEngine, protocol: Protocol, capture: MailCapture, smtp: SmtpMailer
) -> None:
    assert (protocol.digest.cron, protocol.digest.timezone) == (WEEKLY, "Asia/Shanghai")
    clock = Clock(shanghai(24, 7))
    notifier = replica(own_engine, protocol, smtp, clock, "notifier-1")

    # First start, Monday 07:00: the baseline. Last Monday's summary fell due before it: never sent.
    assert await notifier.catch_up() is None
    clock.set(shanghai(24, 7, 30))
    assert await notifier.catch_up() is None
    assert capture.messages() == []

    # A patient is enrolled before the 08:00 cutoff, another after it; the notifier is down from
    # Monday 07:30 to Wednesday 10:00.
    await enrol(own_engine, "S01-early", arm="blinatumomab_dli", enrolled=shanghai(24, 7, 40))
    await enrol(own_engine, "S01-late", arm="blinatumomab_dli", enrolled=shanghai(24, 9))

    # On start it sends Monday 08:00's summary, with Monday 08:00's figures.
    clock.set(shanghai(26, 10))
    assert await notifier.catch_up() == "sent"
    [mail] = capture.messages()
    assert cutoff_of(mail) == shanghai(24, 8)
    assert summary_json(mail)["enrolled"]["blinatumomab_dli"] == 1
    assert (await row_of(own_engine, "scheduled:2025-11-24T08:00:00+08:00")).status == "sent"

    # A restart (a new replica) sends nothing more, and the baseline stays the first start.
    clock.advance(minutes=5)
    restarted = replica(own_engine, protocol, smtp, clock, "notifier-2")
    assert await restarted.catch_up() == "already_sent"
    assert await restarted.baseline() == shanghai(24, 7)
    assert len(capture.messages()) == 1

    # Down for two more weeks: only the latest summary goes out; the missed one is superseded.
    clock.set(shanghai(10, 9, month=12))
    assert await restarted.catch_up() == "sent"
    assert await restarted.catch_up() == "already_sent"
    assert [cutoff_of(m) for m in capture.messages()] == [shanghai(24, 8), shanghai(8, 8, month=12)]
    async with own_engine.connect() as conn:
        keys = (await conn.execute(select(digests.c.period_key).where(digests.c.status == "sent"))).scalars()
        assert sorted(keys) == ["scheduled:2025-11-24T08:00:00+08:00", "scheduled:2025-12-08T08:00:00+08:00"]


# --------------------------------------------------------------------------- the content


async def enrol(engine: AsyncEngine, subject: str, *, arm: str, enrolled: datetime,
                recorded: datetime | None = None, site: str = "S01") -> None:
    """What ``POST /v1/patients`` stores, recorded at ``recorded`` (default: when enrolled)."""
    enrolment = Enrolment(
        subject_id=subject, site_id=site, arm=arm, enrolled_at=enrolled, age_years=34, weight_kg=61.5,  # type: ignore[arg-type]
        cohort="hematologic_relapse", transplant_date=enrolled.date() - timedelta(days=200),
        relapse_date=enrolled.date() - timedelta(days=5),
        eligibility={"stable_vital_signs": True, "severe_infection": False, "gvhd_grade_2_to_4": False,  # type: ignore[arg-type]
                     "organ_failure": False, "cns_leukemia": False, "drug_allergy": False},
    )
    data = enrolment.model_dump(mode="json") | {"enrolled_at": enrolled.isoformat(), "failed_criteria": []}
    event = NewEvent(type=PATIENT_ENROLLED, subject_id=subject, occurred_at=enrolled, recorded_by="site-nurse",
                     data=data)
    async with engine.begin() as conn:
        await append(conn, patient_stream(subject), [event], expected_version=0,
                     recorded_at=(recorded or enrolled).astimezone(UTC))


async def record(engine: AsyncEngine, subject: str, body: dict[str, Any], protocol: Protocol, *,
                 recorded: datetime | None = None) -> None:
    """What ``POST /v1/patients/{subject}/events`` stores, recorded at ``recorded``."""
    parsed = BODIES.validate_python(body)
    event = NewEvent(type=parsed.type, subject_id=subject, occurred_at=parsed.occurred_at,
                     recorded_by="site-nurse", data=derive_data(parsed, protocol))
    async with engine.begin() as conn:
        await append(conn, patient_stream(subject), [event],
                     recorded_at=(recorded or parsed.occurred_at).astimezone(UTC))


CONTRACT_KEYS = {"generated_at", "data_cutoff", "enrolled", "incidences", "survival", "stopping_rules", "audit"}
INCIDENCE_KEYS = {"name", "arm", "events", "evaluable", "rate", "ci_low", "ci_high"}
SURVIVAL_KEYS = {"endpoint", "arm", "n", "events", "median_days", "at_3y", "ci_low", "ci_high"}
RULE_KEYS = {"rule_id", "evaluable", "events", "stop_at", "crossed"}


async def test_the_summary_mail_shows_the_store_as_recorded_by_its_cutoff(
    own_engine: AsyncEngine, protocol: Protocol, capture: MailCapture, smtp: SmtpMailer
) -> None:
    cutoff = shanghai(1, 8, month=12)
    after = cutoff + timedelta(days=2)

    # Two patients on blinatumomab + DLI (one dies), one on usual care, all recorded in time...
    await enrol(own_engine, "S01-001", arm="blinatumomab_dli", enrolled=shanghai(1, 9))
    await record(own_engine, "S01-001", {"type": "blinatumomab_dose", "occurred_at": shanghai(2, 9).isoformat(),
                                         "course": 1, "day": 1, "dose_ug": 9}, protocol)
    await enrol(own_engine, "S02-002", arm="blinatumomab_dli", enrolled=shanghai(3, 9), site="S02")
    await record(own_engine, "S02-002", {"type": "blinatumomab_dose", "occurred_at": shanghai(4, 9).isoformat(),
                                         "course": 1, "day": 1, "dose_ug": 9}, protocol)
    await enrol(own_engine, "S01-003", arm="usual_care", enrolled=shanghai(5, 9))
    # ...and, entered late (after the cutoff), a death on day 17 and a fourth enrolment.
    await record(own_engine, "S02-002", {"type": "death", "occurred_at": shanghai(20, 9).isoformat(),
                                         "cause": "infection"}, protocol, recorded=after)
    await enrol(own_engine, "S01-004", arm="usual_care", enrolled=shanghai(25, 9), recorded=after)

    clock = Clock(after + timedelta(hours=1))
    service = replica(own_engine, protocol, smtp, clock, "notifier")
    assert await service.send("scheduled:2025-12-01T08:00:00+08:00", cutoff) == "sent"
    [mail] = capture.messages()

    # Addressed to the DSMB only, on the envelope as in the headers.
    assert sorted(a for _, a in getaddresses([str(mail["To"])])) == sorted(DSMB)
    assert sorted(a.strip() for a in str(mail["X-Envelope-To"]).split(",")) == sorted(DSMB)
    assert "2025-12-01" in str(mail["Subject"])

    # HTML with a plain-text part; every chart inline and referenced from the HTML by its cid.
    plain, html = mail.get_body(("plain",)), mail.get_body(("html",))
    assert plain is not None and html is not None
    assert "S02-002" not in plain.get_content()  # its death was recorded after the cutoff
    pngs = [p for p in mail.walk() if p.get_content_type() == "image/png"]
    assert len(pngs) == 3 + len(protocol.stopping_rules)  # OS, DFS, aGVHD, one per stopping rule
    for png in pngs:
        assert png.get_content_disposition() == "inline"
        assert png.get_content().startswith(b"\x89PNG")
        assert f'cid:{str(png["Content-ID"]).strip().strip("<>")}' in html.get_content()

    # summary.json: the contract's keys, the figures as recorded by the cutoff.
    document = summary_json(mail)
    assert set(document) >= CONTRACT_KEYS
    assert datetime.fromisoformat(document["data_cutoff"]) == cutoff
    assert datetime.fromisoformat(document["generated_at"]) == clock()
    assert document["enrolled"] == {"blinatumomab_dli": 2, "usual_care": 1}
    assert all(set(i) >= INCIDENCE_KEYS for i in document["incidences"]) and document["incidences"]
    assert all(set(s) >= SURVIVAL_KEYS for s in document["survival"])
    assert all(set(r) >= RULE_KEYS for r in document["stopping_rules"])
    assert {r["rule_id"] for r in document["stopping_rules"]} == {r.id for r in protocol.stopping_rules}
    os_by_arm = {s["arm"]: s for s in document["survival"] if s["endpoint"] == "os"}
    assert (os_by_arm["blinatumomab_dli"]["n"], os_by_arm["blinatumomab_dli"]["events"]) == (2, 0)
    assert document["deaths"] == []

    # The audit anchor: the chain at the last event recorded by the cutoff (the 5th of this store),
    # in summary.json and in the text, as the argument `trialwatch verify --anchor` takes.
    anchor = {"position": 5, "hash": await hash_at(own_engine, 5)}
    assert document["audit"] == anchor
    assert f"verify --anchor {anchor['position']}:{anchor['hash']}" in plain.get_content()

    # The late entries are in the store: a summary cut after them counts them.
    later = await service.send(f"manual:{uuid.uuid4()}", after + timedelta(minutes=1))
    assert later == "sent"
    document = summary_json(capture.messages()[-1])
    assert document["enrolled"] == {"blinatumomab_dli": 2, "usual_care": 2}
    os_by_arm = {s["arm"]: s for s in document["survival"] if s["endpoint"] == "os"}
    assert os_by_arm["blinatumomab_dli"]["events"] == 1
    assert [d["subject_id"] for d in document["deaths"]] == ["S02-002"]
    assert document["audit"] == {"position": 7, "hash": await hash_at(own_engine, 7)}


async def hash_at(engine: AsyncEngine, position: int) -> str:
    async with engine.connect() as conn:
        return str(await conn.scalar(select(events.c.hash).where(events.c.position == position)))
