"""Sign in with an access token, sign out (CONTRACT.md section 5: "/")."""

# No "from __future__ import annotations": FastAPI reads the routes' annotations at runtime.

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from services.ingest.web import sessions
from services.ingest.web.pages import (
    PageRefused,
    SignInNeeded,
    checked_form,
    now,
    render,
    safe_next,
    see_other,
    signed_in,
)
from services.ingest.web.sessions import WebSession

router = APIRouter(include_in_schema=False)
SIGN_IN_COOKIE = "tw_sign_in"  # the sign-in form's own CSRF secret, before there is a session


def home(session: WebSession) -> str:
    """Where a role starts: the DSMB sees only the stopping rules."""
    return "/stopping-rules" if session.principal.role == "dsmb" else "/patients"


def _sign_in_page(request: Request, *, status: int = 200, error: str = "", signed_out: bool = False) -> Response:
    secret = secrets.token_urlsafe(32)
    page = render(request, "sign_in.html.j2", status=status, sign_in_csrf=secret, error=error,
                  signed_out=signed_out, next=request.query_params.get("next", ""))
    page.set_cookie(SIGN_IN_COOKIE, secret, max_age=3600, httponly=True, samesite="strict",
                    secure=request.url.scheme == "https")
    return page


@router.get("/", response_class=HTMLResponse)
async def sign_in_form(request: Request) -> Response:
    try:
        session = await signed_in(request)
    except SignInNeeded:
        return _sign_in_page(request, signed_out=request.query_params.get("signed_out") == "1")
    return see_other(safe_next(request.query_params.get("next"), home(session)))


@router.post("/", response_class=HTMLResponse)
async def sign_in(request: Request) -> Response:
    form = await request.form()
    token, given = str(form.get("token") or "").strip(), str(form.get("csrf") or "")
    if not sessions.same_secret(given, request.cookies.get(SIGN_IN_COOKIE, "\0")):
        raise PageRefused(403, "This sign-in form did not come from this site. Reload the page and sign in again.")
    if not token:
        return _sign_in_page(request, status=422, error="Enter your access token.")
    async with request.app.state.engine.begin() as conn:
        started = await sessions.start(conn, token, now(request))
    if started is None:
        return _sign_in_page(request, status=401, error="That access token is unknown, expired or revoked.")
    session_id, session = started
    answer = see_other(safe_next(str(form.get("next") or ""), home(session)))
    answer.set_cookie(sessions.COOKIE, session_id, max_age=int(sessions.LIFETIME.total_seconds()), httponly=True,
                      samesite="lax", secure=request.url.scheme == "https", path="/")
    answer.delete_cookie(SIGN_IN_COOKIE)
    return answer


@router.post("/sign-out")
async def sign_out(request: Request, session: Annotated[WebSession, Depends(signed_in)]) -> RedirectResponse:
    await checked_form(request, session)
    async with request.app.state.engine.begin() as conn:
        await sessions.end(conn, request.cookies[sessions.COOKIE], now(request))
    answer = see_other("/?signed_out=1")
    answer.delete_cookie(sessions.COOKIE, path="/")
    return answer
