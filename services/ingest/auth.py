"""Bearer tokens and what each role may do (CONTRACT.md sections 1 and 2).

A token is shown once, when created; only its SHA-256 is stored, so a stolen database yields no
usable token. Operators name a token by its public id, the first 12 hex digits of that hash
(``token list``, ``token revoke ID``). A token may expire (``--expires-in DAYS``) and be revoked;
either refuses it everywhere within ``PRINCIPAL_CACHE_TTL`` (the lookup is cached that long). Roles:

- ``site_staff`` (needs a site): enrol, record and read its own site's patients, list their alerts;
- ``investigator``: read everything, acknowledge alerts — never posts clinical data;
- ``dsmb``: the aggregate stopping-rule report only;
- ``admin``: everything, including triggering the DSMB digest.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.store.engine import reader
from shared.store.eventstore import now_utc, utc
from shared.store.tables import api_tokens

ENROL, RECORD_EVENT, READ_PATIENTS, READ_ALERTS = "enrol", "record_event", "read_patients", "read_alerts"
ACKNOWLEDGE_ALERT, READ_STOPPING_RULES, REQUEST_DIGEST = "acknowledge_alert", "read_stopping_rules", "request_digest"

PERMISSIONS: dict[str, frozenset[str]] = {
    "site_staff": frozenset({ENROL, RECORD_EVENT, READ_PATIENTS, READ_ALERTS}),
    "investigator": frozenset({READ_PATIENTS, READ_ALERTS, ACKNOWLEDGE_ALERT, READ_STOPPING_RULES}),
    "dsmb": frozenset({READ_STOPPING_RULES}),
    "admin": frozenset({ENROL, RECORD_EVENT, READ_PATIENTS, READ_ALERTS, ACKNOWLEDGE_ALERT,
                        READ_STOPPING_RULES, REQUEST_DIGEST}),
}
ROLES = tuple(PERMISSIONS)
TOKEN_ID_LENGTH = 12
# How long a looked-up token is trusted without asking the store again. A revocation takes effect
# within this much (plus one lookup): the contract allows 5 s.
PRINCIPAL_CACHE_TTL = timedelta(seconds=4)


@dataclass(frozen=True)
class Principal:
    user: str
    role: str
    site_id: str | None
    token_hash: str
    expires_at: datetime | None = None

    def may(self, action: str) -> bool:
        return action in PERMISSIONS.get(self.role, frozenset())

    @property
    def site_scope(self) -> str | None:
        """The one site a site's staff reach; None for roles that reach every site."""
        return self.site_id if self.role == "site_staff" else None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(digest: str) -> str:
    """A token's public id: the start of its hash (enough to name it, useless to sign in)."""
    return digest[:TOKEN_ID_LENGTH]


async def create_token(conn: AsyncConnection, *, user: str, role: str, site_id: str | None,
                       expires_in: timedelta | None = None, now: datetime | None = None) -> str:
    """Store a new token's hash and return the token itself (the only time it is seen)."""
    if role not in PERMISSIONS:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    if role == "site_staff" and not site_id:
        raise ValueError("a site_staff token needs a site")
    if not user.strip():
        raise ValueError("a token needs a user name")
    if expires_in is not None and expires_in <= timedelta(0):
        raise ValueError("--expires-in must be a positive number of days")
    now = now or now_utc()
    token = secrets.token_urlsafe(32)
    await conn.execute(insert(api_tokens).values(
        token_hash=token_hash(token), user=user, role=role, site_id=site_id or None, created_at=now,
        expires_at=now + expires_in if expires_in is not None else None))
    return token


async def principal_for(conn: AsyncConnection, token: str, *, now: datetime | None = None) -> Principal | None:
    """The holder of a token, or None when the token is unknown, revoked or expired."""
    return await principal_for_hash(conn, token_hash(token), now=now)


async def principal_for_hash(conn: AsyncConnection, digest: str, *, now: datetime | None = None) -> Principal | None:
    """The holder of the token with this hash (a web session keeps only the hash), or None when the
    token is unknown, revoked or expired: the one check the API (through ``PrincipalCache``) and
    the pages both pass through."""
    row = (await conn.execute(select(api_tokens).where(api_tokens.c.token_hash == digest))).first()
    if row is None or row.revoked_at is not None or row.role not in PERMISSIONS:
        return None
    principal = Principal(user=row.user, role=row.role, site_id=row.site_id, token_hash=digest,
                          expires_at=utc(row.expires_at) if row.expires_at is not None else None)
    return None if _expired(principal, now or now_utc()) else principal


def _expired(principal: Principal, now: datetime) -> bool:
    return principal.expires_at is not None and principal.expires_at <= now


class PrincipalCache:
    """``principal_for`` with each answer kept for ``ttl``: one store lookup per token per few
    seconds instead of one per request. Only valid tokens are kept (a new token works at once),
    an expiry is checked on every hit, and a revocation is seen once the entry is ``ttl`` old."""

    MAX_ENTRIES = 10_000

    def __init__(self, engine: AsyncEngine, *, ttl: timedelta = PRINCIPAL_CACHE_TTL,
                 clock: Callable[[], datetime] = now_utc) -> None:
        self._engine, self._ttl, self._clock = reader(engine), ttl, clock
        self._entries: dict[str, tuple[Principal, datetime]] = {}

    async def principal(self, token: str) -> Principal | None:
        now, digest = self._clock(), token_hash(token)
        cached = self._entries.get(digest)
        if cached is not None and now < cached[1]:
            return None if _expired(cached[0], now) else cached[0]
        async with self._engine.connect() as conn:
            principal = await principal_for(conn, token, now=now)
        if principal is None:
            self._entries.pop(digest, None)
            return None
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = (principal, now + self._ttl)
        return principal


# --- the operator's commands (``trialwatch token list | revoke``) ------------------------------


async def list_tokens(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Every token, oldest first, by public id; never the token nor its whole hash."""
    rows = await conn.execute(select(api_tokens).order_by(api_tokens.c.created_at, api_tokens.c.token_hash))
    return [
        {"id": token_id(r.token_hash), "user": r.user, "role": r.role, "site": r.site_id,
         "created": utc(r.created_at), "expires": utc(r.expires_at) if r.expires_at else None,
         "revoked": utc(r.revoked_at) if r.revoked_at else None}
        for r in rows
    ]


async def revoke_tokens(conn: AsyncConnection, *, public_id: str | None = None, user: str | None = None,
                        now: datetime | None = None) -> list[str]:
    """Revoke one token by its public id, or every token of a user; returns the ids revoked now
    (a token already revoked keeps its first revocation time)."""
    if (public_id is None) == (user is None):
        raise ValueError("name a token id or --user, not both")
    if public_id is not None:
        if len(public_id) != TOKEN_ID_LENGTH or any(c not in "0123456789abcdef" for c in public_id):
            raise ValueError(f"{public_id!r} is not a token id ({TOKEN_ID_LENGTH} hex digits, see `token list`)")
        which = api_tokens.c.token_hash.startswith(public_id)
    else:
        which = api_tokens.c.user == user
    result = await conn.execute(
        update(api_tokens).where(which, api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now or now_utc()).returning(api_tokens.c.token_hash))
    return sorted(token_id(digest) for digest in result.scalars())
