"""A notifier that dies once its mail is on the way to the SMTP server does not send it again, and
one whose attempt failed does not count it sent (services/notify/sent_journal.py).

The fault matrix caught a notifier SIGKILLed after the server had stored four mails and before
their "250" reached it: all four went out again after the lease. The sender now writes down the
moment the end of the message is in the kernel's hands, before the server can answer.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy.ext.asyncio import AsyncEngine

from services.notify.deliveries import message_id_for
from services.notify.mailer import RecordingMailer, SmtpMailer
from services.notify.sender import DeliverySender
from services.notify.sent_journal import SentJournal
from shared.store.eventstore import now_utc
from tests.integration.test_email import TRIAL, address, queue, raise_alert, rows_of

LEASE = timedelta(seconds=120)


class Server:
    """An SMTP server on loopback; ``answer`` says what it does once a message has come whole:
    it is kept in ``messages`` first, as a real server queues it before answering."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.answer = "250 Message accepted for delivery"
        self.stall = False  # keep the message and never answer (until the test ends)
        self.got = asyncio.Event()
        self.at_data: list[str] = []  # the journal's text the moment each message came whole
        self.notes: list[str] = []  # what happened, in order (the test's callbacks add theirs)
        self.journal: Path | None = None
        self._ended = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        if self.journal is not None:
            self.at_data.append(self.journal.read_text() if self.journal.exists() else "")
        self.messages.append(envelope.original_content or b"")
        self.notes.append("the server has it")
        self.got.set()
        if self.stall:
            await self._ended.wait()
            return "421 shutting down"
        return self.answer

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: SMTP(self, hostname="journal-test"), "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self._ended.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, int]]:
    running = Server()
    port = await running.start()
    try:
        yield running, port
    finally:
        await running.stop()


def a_sender(engine: AsyncEngine, mailer: Any, journal: Path) -> DeliverySender:
    return DeliverySender(engine, mailer, mail_from="trialwatch@localhost", api_base_url="http://127.0.0.1:8000",
                          trial_title=TRIAL, lease=LEASE, journal=SentJournal(journal))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_smtp_mailer_says_handed_before_the_server_has_the_message(loop: str) -> None:
    """On both loops the services may run on: uvloop's transports are not asyncio's classes, and
    an isinstance check there once kept ``handed`` from ever being called in the services."""
    import uvloop

    async def scenario() -> list[str]:
        smtp = Server()
        port = await smtp.start()
        try:
            message = EmailMessage()
            message["From"], message["To"], message["Subject"] = "trialwatch@localhost", "pi@example.org", "CRS"
            message.set_content("Grade 4 CRS.\n.\nA line that is only a dot, above.\n")
            await SmtpMailer("127.0.0.1", port, timeout=5).send(
                message, handed=lambda: smtp.notes.append("handed"), accepted=lambda: smtp.notes.append("accepted"))
        finally:
            await smtp.stop()
        return smtp.notes

    factory = asyncio.new_event_loop if loop == "asyncio" else uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(scenario()) == ["handed", "the server has it", "accepted"]


async def test_the_journal_has_the_mail_before_the_server_answers(
        own_engine: AsyncEngine, data_dir: Path, server: tuple[Server, int]) -> None:
    """Waiting for the "250" left a round trip, the server's storing and a turn of the event loop
    in which a kill made a duplicate; the line is written with the write that ends the message."""
    smtp, port = server
    smtp.journal = data_dir / "mail-sent.journal"
    pi = address("pi")
    event = await raise_alert(own_engine, title="Grade 4 CRS")
    await queue(own_engine, event, [pi])
    assert await a_sender(own_engine, SmtpMailer("127.0.0.1", port, timeout=5), smtp.journal).send_due() == 1
    [before_answer] = smtp.at_data
    assert f"{message_id_for(event.event_id, pi)} handed " in before_answer
    assert [r.status for r in await rows_of(own_engine, event)] == ["sent"]


_DYING_SENDER = """
import asyncio, sys
from datetime import timedelta
from pathlib import Path
from services.cli import event_loop_factory
from services.notify.mailer import SmtpMailer
from services.notify.sender import DeliverySender
from services.notify.sent_journal import SentJournal
from shared.store.engine import make_engine

async def main(url, port, journal):
    engine = make_engine(url)
    sender = DeliverySender(engine, SmtpMailer("127.0.0.1", int(port), timeout=300), mail_from="trialwatch@localhost",
                            api_base_url="http://127.0.0.1:8000", trial_title="t", lease=timedelta(seconds=120),
                            journal=SentJournal(Path(journal)))
    await sender.send_due()

with asyncio.Runner(loop_factory=event_loop_factory()) as runner:  # the services' loop (uvloop)
    runner.run(main(*sys.argv[1:]))
"""


async def test_a_sender_killed_while_the_server_answers_does_not_send_the_mail_again(
        own_engine: AsyncEngine, own_database_url: str, data_dir: Path, server: tuple[Server, int]) -> None:
    """A real process, SIGKILLed once the server has the whole message and before it answers: the
    notifier that takes the row over after the lease records the mail as sent and sends nothing."""
    smtp, port = server
    smtp.stall = True
    journal, pi, t0 = data_dir / "mail-sent.journal", address("pi"), now_utc()
    event = await raise_alert(own_engine, title="Grade 4 CRS")
    await queue(own_engine, event, [pi], now=t0)
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", _DYING_SENDER, own_database_url, str(port),
                                                 str(journal))
    try:
        async with asyncio.timeout(60):
            await smtp.got.wait()
        # The line follows the write by microseconds; give a loaded machine time to run it. Before
        # the fix it never came (no answer, no line), and the mail went out twice below.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (journal.exists() and journal.read_text()):
            await asyncio.sleep(0.01)
    finally:
        child.kill()
        await child.wait()
    assert [r.status for r in await rows_of(own_engine, event)] == ["sending"]

    mailer = RecordingMailer()
    successor = a_sender(own_engine, mailer, journal)
    # The child claimed it on its own clock, after its start-up: its lease ends after that.
    assert await successor.send_due(now=now_utc() + LEASE + timedelta(seconds=1)) == 0
    assert mailer.sent == [] and len(smtp.messages) == 1
    assert [r.status for r in await rows_of(own_engine, event)] == ["sent"]


async def test_a_mail_refused_at_its_end_is_sent_again_even_if_its_sender_then_died(
        own_engine: AsyncEngine, data_dir: Path, server: tuple[Server, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The end of the message reached the kernel ("handed"), the server refused it, and the sender
    died before the retry was committed: the attempt's "failed" line keeps the successor from
    counting that mail as sent (a lost alert)."""
    smtp, port = server
    smtp.answer = "554 5.7.1 rejected by policy"
    journal, pi, t0 = data_dir / "mail-sent.journal", address("pi"), now_utc()
    event = await raise_alert(own_engine, title="Grade 4 CRS")
    await queue(own_engine, event, [pi], now=t0)
    dying = a_sender(own_engine, SmtpMailer("127.0.0.1", port, timeout=5), journal)

    async def killed_before_the_retry_commits(*args: Any) -> None:
        return None

    monkeypatch.setattr(dying, "_failed", killed_before_the_retry_commits)
    assert await dying.send_due(now=t0) == 0
    assert [r.status for r in await rows_of(own_engine, event)] == ["sending"]
    mid = message_id_for(event.event_id, pi)
    assert [line.split(" ")[1] for line in journal.read_text().splitlines()] == ["handed", "failed"]

    smtp.answer = "250 Message accepted for delivery"
    successor = a_sender(own_engine, SmtpMailer("127.0.0.1", port, timeout=5), journal)
    assert await successor.send_due(now=t0 + LEASE + timedelta(seconds=1)) == 1
    assert len(smtp.messages) == 2 and [r.status for r in await rows_of(own_engine, event)] == ["sent"]
    assert journal.read_text().splitlines()[-1] == mid  # the 250 of the second attempt


def test_a_handed_line_counts_for_its_own_attempt_only(tmp_path: Path) -> None:
    """An earlier attempt that was handed over and then refused must not make a later attempt,
    killed before its message was on its way, count as sent."""
    journal, t0 = SentJournal(tmp_path / "journal"), now_utc()
    first, second = t0 + LEASE, t0 + 2 * LEASE
    journal.handed("<a@x>", first)
    journal.failed("<a@x>", first)
    journal.handed("<b@x>", first)
    assert not journal.sent_before("<a@x>", first)
    assert not journal.sent_before("<a@x>", second)
    assert journal.sent_before("<b@x>", first)
    assert not journal.sent_before("<b@x>", second)
    assert journal.sent_before("<b@x>", first.replace(tzinfo=None))  # as SQLite reads a lease back
    journal.accepted("<a@x>")  # the server's 250, on whatever attempt
    assert journal.sent_before("<a@x>", second)
    assert not SentJournal(tmp_path / "none").sent_before("<a@x>", first)


async def test_a_journal_that_cannot_be_written_does_not_make_a_sent_mail_look_failed(
        own_engine: AsyncEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk, say: raised from inside the mailer, the error made the server's mail look
    failed, and it went out again on every retry. It is logged, and the mail is sent once."""
    (tmp_path / "not-a-directory").write_text("")
    pi, t0 = address("pi"), now_utc()
    event = await raise_alert(own_engine, title="Grade 4 CRS")
    await queue(own_engine, event, [pi], now=t0)
    mailer = RecordingMailer()
    the_sender = a_sender(own_engine, mailer, tmp_path / "not-a-directory" / "mail-sent.journal")
    assert await the_sender.send_due(now=t0) == 1
    assert await the_sender.send_due(now=t0 + timedelta(hours=1)) == 0
    assert len(mailer.sent) == 1 and [r.status for r in await rows_of(own_engine, event)] == ["sent"]
    assert "could not be written" in caplog.text
