"""What every page shares: the signed-in session, role checks, CSRF on forms, and rendering.

Pages answer HTML, never problem+json: a refusal is a page saying why (403, or 404 for another
site's patient as for an unknown one), and no session sends the browser to the sign-in page.
"""

# No "from __future__ import annotations": FastAPI reads these closures' annotations at runtime.

import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from services.ingest.web import sessions
from services.ingest.web.labels import event_words, field_label, option_words
from services.ingest.web.sessions import WebSession

HERE = Path(__file__).parent
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
}

ACTION_WORDS = {
    "enrol": "enrol patients", "record_event": "record clinical events", "read_patients": "see patient records",
    "read_alerts": "see alerts", "acknowledge_alert": "acknowledge alerts",
    "read_stopping_rules": "see the stopping rules", "request_digest": "request the DSMB summary",
}

templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                        trim_blocks=True, lstrip_blocks=True)
templates.filters.update(event_words=event_words, field_label=field_label, option_words=option_words)


class PageRefused(Exception):
    """A page the session may not see (403) or that does not exist for it (404)."""

    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message
        super().__init__(message)


class SignInNeeded(Exception):
    pass


def now(request: Request) -> datetime:
    return request.app.state.clock()  # type: ignore[no-any-return]


async def signed_in(request: Request) -> WebSession:
    """The request's live session (its token checked again now), else off to the sign-in page."""
    session_id = request.cookies.get(sessions.COOKIE)
    if not session_id:
        raise SignInNeeded()
    async with request.app.state.engine.connect() as conn:
        session = await sessions.resume(conn, session_id, now(request))
    if session is None:
        raise SignInNeeded()
    request.state.session = session
    return session


def allowed(action: str) -> Callable[[Request], Awaitable[WebSession]]:
    """A dependency: the signed-in session, if its role may do ``action`` (else a 403 page)."""

    async def permitted(request: Request) -> WebSession:
        session = await signed_in(request)
        if not session.principal.may(action):
            raise PageRefused(403, f"Your role ({session.principal.role.replace('_', ' ')}) may not "
                                   f"{ACTION_WORDS.get(action, action.replace('_', ' '))}.")
        return session

    return permitted


async def checked_form(request: Request, session: WebSession) -> dict[str, str]:
    """The posted form, if it carries the session's CSRF token (a cross-site post does not)."""
    form = await request.form()
    if not sessions.same_secret(_text(form.get("csrf")), session.csrf):
        raise PageRefused(403, "This form did not come from a TrialWatch page of your session "
                               "(or the session changed). Reload the page and try again.")
    return {key: value for key, value in form.items() if isinstance(value, str)}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def new_form_key() -> str:
    """One per rendered form: the Idempotency-Key its submissions share."""
    return secrets.token_urlsafe(16)


def render(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    session: WebSession | None = getattr(request.state, "session", None)
    protocol = request.app.state.protocol
    html = templates.get_template(template).render(
        session=session, principal=session.principal if session else None, csrf=session.csrf if session else "",
        trial=protocol.trial, zone=protocol.trial.timezone, path=request.url.path, **context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


def local(moment: datetime | str | None, request: Request, fmt: str = "%Y-%m-%d %H:%M") -> str:
    if moment is None:
        return ""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.astimezone(request.app.state.protocol.tz).strftime(fmt)


def safe_next(target: str | None, default: str) -> str:
    """A local path to return to; anything else (another host, a scheme) is the default."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


async def on_refused(request: Request, exc: Exception) -> HTMLResponse:
    assert isinstance(exc, PageRefused)
    title = {403: "Not allowed", 404: "Not found"}.get(exc.status, "Refused")
    return render(request, "refused.html.j2", status=exc.status, title=title, message=exc.message)


async def on_sign_in_needed(request: Request, exc: Exception) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return see_other("/?next=" + quote(target, safe="/") if request.method == "GET" and target != "/" else "/")


def query(values: Mapping[str, str | None]) -> str:
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in values.items() if v)
