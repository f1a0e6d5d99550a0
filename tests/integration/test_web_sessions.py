"""Sessions of the web pages, in process: what a browser test cannot easily show (a stolen cookie
after sign-out, an expired session, the sign-in form's own CSRF check, the site filter)."""

from __future__ import annotations

import re
from datetime import timedelta

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.app import create_app
from services.ingest.auth import token_hash
from shared.protocol import Protocol
from shared.settings import Settings
from shared.store.eventstore import now_utc
from tests.support.api import enrol, new_token, raise_alert

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def signed_in(client: httpx.AsyncClient, token: str) -> str:
    """Sign in as a browser would; the session's CSRF token of the page it lands on."""
    page = await client.get("/")
    answer = await client.post("/", data={"token": token, "csrf": CSRF.search(page.text).group(1)})  # type: ignore[union-attr]
    assert answer.status_code == 303, answer.text
    landed = await client.get(answer.headers["location"])
    return CSRF.search(landed.text).group(1)  # type: ignore[union-attr]


async def test_the_cookie_holds_neither_token_nor_hash_and_dies_with_sign_out(client: httpx.AsyncClient,
                                                                              engine: AsyncEngine) -> None:
    token = await new_token(engine, "site_staff", "S01")
    csrf = await signed_in(client, token)
    session_id = client.cookies["tw_session"]
    assert token not in session_id and token_hash(token) not in session_id
    assert (await client.get("/patients")).status_code == 200

    assert (await client.post("/sign-out", data={"csrf": csrf})).status_code == 303
    client.cookies.set("tw_session", session_id)  # the cookie kept (stolen) after signing out
    answer = await client.get("/patients")
    assert answer.status_code == 303 and answer.headers["location"].startswith("/?next=")


async def test_sign_in_needs_the_forms_own_secret(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    answer = await client.post("/", data={"token": tokens["staff_s01"], "csrf": "forged"})
    assert answer.status_code == 403 and "tw_session" not in answer.headers.get("set-cookie", "")
    page = await client.get("/")
    answer = await client.post("/", data={"token": "not-a-token", "csrf": CSRF.search(page.text).group(1)})  # type: ignore[union-attr]
    assert answer.status_code == 401 and "unknown, expired or revoked" in answer.text


async def test_a_session_expires_after_eight_hours(settings: Settings, engine: AsyncEngine, protocol: Protocol,
                                                    tokens: dict[str, str]) -> None:
    app = create_app(settings, engine=engine, protocol=protocol)
    start = now_utc()
    app.state.clock = lambda: start
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
        await signed_in(client, tokens["investigator"])
        app.state.clock = lambda: start + timedelta(hours=7, minutes=59)
        assert (await client.get("/alerts")).status_code == 200
        app.state.clock = lambda: start + timedelta(hours=8)
        assert (await client.get("/alerts")).status_code == 303


async def test_investigators_filter_alerts_by_site(client: httpx.AsyncClient, engine: AsyncEngine,
                                                  tokens: dict[str, str]) -> None:
    s01 = await enrol(client, tokens["staff_s01"], site="S01")
    s02 = await enrol(client, tokens["staff_s02"], site="S02")
    await raise_alert(engine, s01, "S01")
    await raise_alert(engine, s02, "S02")
    await signed_in(client, tokens["investigator"])
    page = (await client.get("/alerts?site=S02&severity=urgent")).text
    assert s02 in page and s01 not in page
    everything = (await client.get("/alerts")).text
    assert s01 in everything and s02 in everything


async def test_staff_see_only_their_sites_alerts_whatever_the_filter(client: httpx.AsyncClient, engine: AsyncEngine,
                                                                      tokens: dict[str, str]) -> None:
    s02 = await enrol(client, tokens["staff_s02"], site="S02")
    await raise_alert(engine, s02, "S02")
    await signed_in(client, tokens["staff_s01"])
    page = await client.get("/alerts?site=S02")
    assert page.status_code == 200 and s02 not in page.text
    assert 'action="/alerts/' not in page.text  # staff do not acknowledge
