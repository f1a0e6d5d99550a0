"""The local SMTP capture ``trialwatch up`` runs when no ``TRIALWATCH_SMTP_URL`` is set.

An aiosmtpd server inside the caller's running event loop (no thread, so port 0 works and
``.port`` is the one the OS chose). Every message it accepts is written to
``<data_dir>/mail/<UTC timestamp>-<n>.eml``: the message as received, preceded by
``X-Envelope-From`` / ``X-Envelope-To`` headers naming who it was really addressed to. A file
appears whole (written aside, then renamed), so a reader never sees half a message.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import itertools
import os
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class _Handler:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._counter = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        """Store the message and answer "250" in one step of the event loop, with no await between.

        The file is written here, not in a thread: while a thread wrote it, ``stop`` could close the
        connection in between, and the message was kept but never acknowledged. The sender rightly
        takes an unanswered DATA for a failure and sends again, so every stop of the capture mid-send
        made a duplicate (the fault matrix's ``smtp`` row saw two). A real server can leave the same
        gap when it dies between queueing and answering (RFC 1047); the capture need not imitate it.
        A message is a few kilobytes and the file is not fsync'ed, so the loop waits microseconds.
        """
        head = f"X-Envelope-From: {envelope.mail_from}\r\nX-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        content = envelope.original_content or b""
        self._store(head.encode() + content)
        return "250 Message accepted for delivery"

    def _store(self, raw: bytes) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        while (path := self.folder / f"{stamp}-{next(self._counter)}.eml").exists():
            pass
        partial = path.with_suffix(".eml.part")
        partial.write_bytes(raw)
        os.replace(partial, path)
        return path


class MailCapture:
    """``await start()`` / ``await stop()``, or ``async with MailCapture(data_dir) as capture``.

    ``port=0`` takes a free port on the first start; ``.port`` is it, and a later start reuses it.
    """

    def __init__(self, data_dir: Path | str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.folder = Path(data_dir) / "mail"
        self._handler = _Handler(self.folder)
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()
        self.port = port

    @property
    def url(self) -> str:
        """What to give ``SmtpMailer.from_url`` (``TRIALWATCH_SMTP_URL``) to reach this capture."""
        return f"smtp://{self.host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        # A restart binds the port chosen the first time, so clients configured with it reconnect.
        self._server = await loop.create_server(self._session, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        self._sessions.clear()
        await server.wait_closed()

    def _session(self) -> SMTP:
        session = _TrackedSMTP(self._handler, hostname="trialwatch-capture", ident="TrialWatch capture")
        session.on_close = self._sessions.discard
        self._sessions.add(session)
        return session

    def messages(self) -> list[EmailMessage]:
        """Every stored message, oldest first, parsed."""
        files = sorted(self.folder.glob("*.eml"))
        return [_parse(path.read_bytes()) for path in files]

    async def __aenter__(self) -> MailCapture:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class _TrackedSMTP(SMTP):
    """Tells the capture when its connection ends, so ``stop`` can close the ones still open."""

    on_close: Any = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.on_close is not None:
            self.on_close(self)


def _parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message
