"""Alert mails: a pure function from an alert event's data to (subject, text, html).

Written for an investigator reading on a phone: what happened, when (clinical time and when it was
recorded), which rule fired and on which facts, what to do, and a link. Only subject and site ids
identify a patient; fact keys that would name or date a person are dropped (defence in depth: the
safety service should never put them there).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from services.notify.mailer import MAIL_POLICY
from shared.events import ALERT_RAISED, ALERT_WITHDRAWN, STOPPING_BOUNDARY_CROSSED

TEMPLATES = Path(__file__).resolve().parent / "templates"
PREFIX = "[TrialWatch]"
STOPPING_KIND = "stopping_boundary_crossed"
_DEFAULT_ACTION = {
    False: "Review the patient and acknowledge the alert.",
    True: "Review the stopping rule's events and inform the DSMB chair; acknowledge the alert.",
}
_BOUNDARY_KEYS = frozenset({"events", "evaluable", "stop_at", "boundary"})
_IDENTIFYING = re.compile(
    r"(^|_)(name|names|initials|dob|birth|birthdate|mrn|address|phone|email|ssn|nhs|passport)($|_)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class RenderedMail:
    subject: str
    text: str
    html: str


@lru_cache(maxsize=1)
def environment() -> Environment:
    """Built on first use, not at import; ``*.html.j2`` is autoescaped, ``*.txt.j2`` is not."""
    return Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_alert(
    event_type: str,
    data: dict[str, Any],
    *,
    recorded_at: datetime,
    api_base_url: str,
    trial_title: str,
    timezone: str | None = None,
) -> RenderedMail:
    """Render a raised alert (``safety_alert_raised``, ``stopping_boundary_crossed``) or a
    withdrawn notice (``safety_alert_withdrawn``). ``recorded_at``: when the alert event was stored;
    times are shown in ``timezone`` (the trial's) when given."""
    if event_type not in (ALERT_RAISED, STOPPING_BOUNDARY_CROSSED, ALERT_WITHDRAWN):
        raise ValueError(f"no alert mail for event type {event_type!r}")
    view = _view(event_type, data, recorded_at=recorded_at, api_base_url=api_base_url, trial_title=trial_title,
                 zone=ZoneInfo(timezone) if timezone else None)
    env = environment()
    return RenderedMail(
        subject=view["subject"],
        text=env.get_template("alert.txt.j2").render(**view),
        html=env.get_template("alert.html.j2").render(**view),
    )


def compose(
    mail: RenderedMail,
    *,
    mail_from: str,
    to: str,
    message_id: str,
    date: datetime,
    severity: str | None = None,
    in_reply_to: list[str] | None = None,
) -> EmailMessage:
    """The MIME message: text/plain with an HTML alternative, our Message-ID, threading headers."""
    message = EmailMessage(policy=MAIL_POLICY)
    message["Subject"] = mail.subject
    message["From"] = mail_from
    message["To"] = to
    message["Date"] = format_datetime(date.astimezone(UTC))
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-generated"
    if severity == "urgent":
        message["Importance"] = "high"
        message["X-Priority"] = "1"
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to[-1]
        message["References"] = " ".join(in_reply_to)
    message.set_content(mail.text)
    message.add_alternative(mail.html, subtype="html")
    return message


# --------------------------------------------------------------------------- the view model


def _view(
    event_type: str, data: dict[str, Any], *, recorded_at: datetime, api_base_url: str, trial_title: str,
    zone: ZoneInfo | None = None,
) -> dict[str, Any]:
    withdrawn = event_type == ALERT_WITHDRAWN
    stopping = event_type == STOPPING_BOUNDARY_CROSSED or data.get("kind") == STOPPING_KIND
    subject_id = data.get("subject_id")
    title = _one_line(str(data.get("title") or data.get("kind") or "safety alert"))
    severity = str(data.get("severity") or "info")
    label = "WITHDRAWN" if withdrawn else severity.upper()
    base = api_base_url.rstrip("/")
    facts = {k: v for k, v in (data.get("facts") or {}).items()
             if not _IDENTIFYING.search(str(k)) and v not in (None, "", [], {})}
    boundary = _boundary(facts) if stopping else None
    if boundary:
        facts = {k: v for k, v in facts.items() if k not in _BOUNDARY_KEYS}
    return {
        "subject": _subject(label, subject_id, title, stopping=stopping),
        "trial_title": trial_title,
        "label": label,
        "severity": severity,
        "withdrawn": withdrawn,
        "stopping": stopping,
        "title": title,
        "detail": str(data.get("detail") or ""),
        "reason": str(data.get("reason") or ""),
        "action": str(data.get("action") or _DEFAULT_ACTION[stopping]),
        "rule": str(data.get("rule") or ""),
        "kind": str(data.get("kind") or ""),
        "subject_id": subject_id,
        "site_id": data.get("site_id"),
        "occurred_at": _iso(data.get("cause_occurred_at"), zone),
        "cause_recorded_at": _iso(data.get("cause_recorded_at"), zone),
        "event_recorded_at": _iso(recorded_at, zone),
        "facts": [(str(k).replace("_", " "), _value(v)) for k, v in facts.items()],
        "boundary": boundary,
        "link": f"{base}/stopping-rules" if stopping or not subject_id else  # the web pages, not the JSON API
                f"{base}/patients/{quote(str(subject_id), safe='')}",
        "alert_id": str(data.get("alert_id") or ""),
    }


def _subject(label: str, subject_id: str | None, title: str, *, stopping: bool) -> str:
    if subject_id:
        return f"{PREFIX} {label} {_one_line(subject_id)}: {title}"
    if stopping:
        return f"{PREFIX} {label} stopping rule crossed: {title.removeprefix('Stopping boundary crossed: ')}"
    return f"{PREFIX} {label} {title}"


def _boundary(facts: dict[str, Any]) -> dict[str, str] | None:
    """events / evaluable and the boundary at this look, from the stopping-rule facts."""
    events, evaluable = facts.get("events"), facts.get("evaluable")
    stop_at = facts.get("stop_at", facts.get("boundary"))
    if events is None and evaluable is None and stop_at is None:
        return None
    return {"events": _value(events), "evaluable": _value(evaluable), "stop_at": _value(stop_at)}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _iso(value: object, zone: ZoneInfo | None = None) -> str | None:
    """ISO 8601 with its offset, to the second, in the trial's zone when given."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            return text
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        if zone is not None:
            value = value.astimezone(zone)
        return value.isoformat(timespec="seconds")
    return str(value)


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return "—" if value is None else str(value)
