"""Sign-in sessions of the web pages: a random session id in an HttpOnly cookie, its hash in the store.

- The cookie holds only the session id; the store keeps its SHA-256, the token's hash (never the
  token) and the session's CSRF token. A stolen database yields no usable session or token.
- Every request resolves the token again through ``auth.principal_for_hash``, the check the API
  uses, so a revoked or expired token ends its sessions at once.
- A session lasts 8 hours; "Sign out" ends it in the store, not only in the browser.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.ingest.auth import Principal, principal_for, principal_for_hash
from shared.store.eventstore import utc
from shared.store.tables import web_sessions

COOKIE = "tw_session"
LIFETIME = timedelta(hours=8)


@dataclass(frozen=True)
class WebSession:
    principal: Principal
    csrf: str
    expires_at: datetime


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


async def start(conn: AsyncConnection, token: str, now: datetime) -> tuple[str, WebSession] | None:
    """A new session for the token's holder (the session id, for the cookie), or None for a bad token."""
    principal = await principal_for(conn, token)
    if principal is None:
        return None
    await conn.execute(delete(web_sessions).where(web_sessions.c.expires_at < now - timedelta(days=1)))
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    await conn.execute(insert(web_sessions).values(
        session_hash=_hash(session_id), token_hash=principal.token_hash, csrf_token=csrf,
        created_at=now, expires_at=now + LIFETIME))
    return session_id, WebSession(principal, csrf, now + LIFETIME)


async def resume(conn: AsyncConnection, session_id: str, now: datetime) -> WebSession | None:
    """The live session of this id, its token checked again; None once ended, expired or revoked."""
    row = (await conn.execute(select(web_sessions).where(web_sessions.c.session_hash == _hash(session_id)))).first()
    if row is None or row.ended_at is not None or utc(row.expires_at) <= now:
        return None
    principal = await principal_for_hash(conn, row.token_hash)
    return WebSession(principal, row.csrf_token, utc(row.expires_at)) if principal is not None else None


async def end(conn: AsyncConnection, session_id: str, now: datetime) -> None:
    await conn.execute(update(web_sessions).where(web_sessions.c.session_hash == _hash(session_id))
                       .values(ended_at=now))


def same_secret(given: str | None, expected: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())
