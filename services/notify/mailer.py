"""Sending mail: the ``Mailer`` port, its aiosmtplib adapter and a recording fake.

The port knows nothing about alerts or deliveries: it takes a finished ``EmailMessage`` (recipients
in its headers) and either hands it to a mail server or raises ``MailerUnavailable``. Retrying is
the caller's business (``sender.DeliverySender``), so the adapter never retries by itself.
"""

from __future__ import annotations

import email.policy
import functools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib

log = logging.getLogger(__name__)

# Headers are not folded below RFC 5322's 998-character line limit: the standard policy folds at
# 78 and, for a subject with a 32-character subject id, puts the whole value on a continuation
# line, so a compat32 reader sees a subject that starts with a line break. Messages are built with
# it (rendering.py) and put on the wire with it (aiosmtplib's own flattening would fold again).
# 7bit from the start: a text that is not ASCII is encoded (quoted-printable or base64) as it is
# composed; composed "8bit", the 7-bit wire flattening deep-copied the message to encode it again.
MAIL_POLICY = email.policy.default.clone(max_line_length=998, cte_type="7bit")
_WIRE_POLICY = MAIL_POLICY.clone(linesep="\r\n")  # 7bit, as composed: any server takes it


def wire_bytes(message: EmailMessage) -> bytes:
    """The message as it goes to the SMTP server: CRLF lines, 7-bit clean, headers unfolded."""
    return message.as_bytes(policy=_WIRE_POLICY)


# The name this host gives in its EHLO, looked up once per process. Left to aiosmtplib it is looked
# up (``socket.getfqdn``: a resolver query, in a thread) on every connection, which is every mail
# here: a slow resolver would hold up each alert, and the look-up alone was 2.5 % of the
# notifier's CPU at 250 events/s (py-spy, 2026-12-01).
_this_host = functools.cache(socket.getfqdn)


# scheme -> (default port, implicit TLS, STARTTLS)
_SCHEMES: dict[str, tuple[int, bool, bool]] = {
    "smtp": (25, False, False),
    "smtp+starttls": (587, False, True),
    "smtps": (465, True, False),
}


class MailerUnavailable(Exception):
    """The message was not accepted: server unreachable, timed out, or answered 4xx/5xx.

    ``code`` is the SMTP reply code when the server gave one (5xx: permanent by RFC 5321, yet the
    delivery ledger still retries, since a mis-set relay is fixed by an operator, not by waiting).
    """

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class Mailer(Protocol):
    """Hand one message to a mail system; return only once it was accepted.

    ``handed``, if given, is called the moment the whole message is out of this process's hands
    (in the kernel's socket buffer, on its way to the server: a crash of the process from then on
    cannot stop it), before the server can have answered; a mailer that cannot tell does not call
    it. ``accepted``, if given, is called the moment the mail system has taken the message, before
    anything else of the conversation (an SMTP server's QUIT) can fail or a crash can lose the news.
    """

    async def send(self, message: EmailMessage, *, accepted: Callable[[], None] | None = None,
                   handed: Callable[[], None] | None = None) -> None: ...


@dataclass(frozen=True)
class SmtpMailer:
    """The aiosmtplib adapter: one connection per message (alerts are few; no pool to go stale)."""

    hostname: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    use_tls: bool = False
    start_tls: bool = False
    timeout: float = 10
    local_hostname: str = field(default_factory=_this_host)  # the EHLO name

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 10) -> SmtpMailer:
        """``smtp://[user:pass@]host[:port]`` plain (port 25), ``smtp+starttls://…`` (587),
        ``smtps://…`` implicit TLS (465). User and password are percent-decoded."""
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise ValueError(
                f"SMTP URL {_redact(url)!r}: scheme {parts.scheme!r} is not one of {sorted(_SCHEMES)}"
            )
        if not parts.hostname:
            raise ValueError(f"SMTP URL {_redact(url)!r}: no host (expected {scheme}://host:port)")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"SMTP URL {_redact(url)!r}: bad port ({exc})") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"SMTP URL {_redact(url)!r}: unexpected path, query or fragment")
        if (parts.username is None) != (parts.password is None):
            raise ValueError(f"SMTP URL {_redact(url)!r}: give both user and password, or neither")
        default_port, use_tls, start_tls = _SCHEMES[scheme]
        return cls(
            hostname=parts.hostname,
            port=port or default_port,
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
            use_tls=use_tls,
            start_tls=start_tls,
            timeout=timeout,
        )

    def describe(self) -> str:
        mode = "smtps" if self.use_tls else "smtp+starttls" if self.start_tls else "smtp"
        return f"{mode}://{self.hostname}:{self.port}"

    async def send(self, message: EmailMessage, *, accepted: Callable[[], None] | None = None,
                   handed: Callable[[], None] | None = None) -> None:
        recipients = [address for _, address in getaddresses(
            [*message.get_all("To", []), *message.get_all("Cc", [])])]
        # aiosmtplib.send's own steps, so that ``accepted`` runs between the DATA's 250 and the QUIT.
        client = aiosmtplib.SMTP(hostname=self.hostname, port=self.port, username=self.username,
                                 password=self.password, use_tls=self.use_tls, start_tls=self.start_tls,
                                 timeout=self.timeout, local_hostname=self.local_hostname)
        try:
            async with client:
                if handed is not None:
                    _call_when_handed(client, handed)
                refused, _ = await client.sendmail(str(message["From"]), recipients, wire_bytes(message))
                if not refused and accepted is not None:
                    accepted()
        except aiosmtplib.SMTPResponseException as exc:
            raise MailerUnavailable(
                f"{self.describe()} answered {exc.code} {exc.message}", code=exc.code
            ) from exc
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            raise MailerUnavailable(
                f"{self.describe()} refused every recipient: {exc}", code=max(codes, default=None)
            ) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise MailerUnavailable(f"{self.describe()} unavailable: {exc or type(exc).__name__}") from exc
        if refused:
            raise MailerUnavailable(
                f"{self.describe()} refused {sorted(refused)}",
                code=max(r.code for r in refused.values()),
            )


def _call_when_handed(client: aiosmtplib.SMTP, handed: Callable[[], None]) -> None:
    """Call ``handed`` right after the write that ends the message (its closing ``.``), in the same
    step of the event loop, if that write went whole into the kernel's socket buffer.

    The server's "250" comes a round trip, the server's own storing and a turn of this process's
    event loop later; a process killed in that window had sent a mail it had no record of (the
    fault matrix's ``notify`` row caught four at once). The kernel sends what a killed process
    wrote and then closes the connection in order, so from this write on, the mail reaches the
    server whatever becomes of the process. aiosmtplib has no hook there, so the one connection's
    protocol object has its ``write`` wrapped. Over TLS the bytes pass an SSL buffer first, and a
    message larger than the free socket buffer keeps its tail in the transport: ``handed`` is then
    not called, and the "250" (``accepted``) is the sender's first news, as before.
    """
    protocol = client.protocol
    if protocol is None:
        return
    write = protocol.write

    def write_then_tell(data: bytes) -> None:
        write(data)
        # Only the message ends so: a command has one CRLF, at its end (aiosmtplib refuses others).
        if data.endswith(b"\r\n.\r\n"):
            # Asked, not isinstance-checked: uvloop's transports (the services' loop) are not
            # asyncio.WriteTransport subclasses. Both count what waits in their own queues.
            transport = protocol.transport
            if transport is not None and transport.get_extra_info("ssl_object") is None:
                buffered = getattr(transport, "get_write_buffer_size", None)
                if buffered is not None and buffered() == 0:
                    handed()

    protocol.write = write_then_tell  # type: ignore[method-assign]


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


class RecordingMailer:
    """A fake that keeps every accepted message; ``fail_next(n)`` makes the next n sends fail."""

    def __init__(self) -> None:
        self.sent: list[EmailMessage] = []
        self.attempts = 0
        self._failures = 0
        self._error = "told to fail"

    def fail_next(self, n: int = 1, *, error: str = "told to fail") -> None:
        self._failures, self._error = n, error

    async def send(self, message: EmailMessage, *, accepted: Callable[[], None] | None = None,
                   handed: Callable[[], None] | None = None) -> None:
        self.attempts += 1
        if self._failures > 0:
            self._failures -= 1
            raise MailerUnavailable(f"recording mailer: {self._error}")
        self.sent.append(message)
        if handed is not None:
            handed()
        if accepted is not None:
            accepted()

    def to(self, recipient: str) -> list[EmailMessage]:
        """The messages addressed to one recipient (compared case-insensitively)."""
        return [m for m in self.sent if str(m["To"]).lower() == recipient.lower()]
