"""Bearer tokens and what each role may do (CONTRACT.md sections 1 and 2).

A token is shown once, when created; only its SHA-256 is stored, so a stolen database yields no
usable token. Roles:

- ``site_staff`` (needs a site): enrol, record and read its own site's patients, list their alerts;
- ``investigator``: read everything, acknowledge alerts — never posts clinical data;
- ``dsmb``: the aggregate stopping-rule report only;
- ``admin``: everything, including triggering the DSMB digest.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.store.eventstore import now_utc
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


@dataclass(frozen=True)
class Principal:
    user: str
    role: str
    site_id: str | None
    token_hash: str

    def may(self, action: str) -> bool:
        return action in PERMISSIONS.get(self.role, frozenset())

    @property
    def site_scope(self) -> str | None:
        """The one site a site's staff reach; None for roles that reach every site."""
        return self.site_id if self.role == "site_staff" else None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(conn: AsyncConnection, *, user: str, role: str, site_id: str | None) -> str:
    """Store a new token's hash and return the token itself (the only time it is seen)."""
    if role not in PERMISSIONS:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    if role == "site_staff" and not site_id:
        raise ValueError("a site_staff token needs a site")
    if not user.strip():
        raise ValueError("a token needs a user name")
    token = secrets.token_urlsafe(32)
    await conn.execute(insert(api_tokens).values(
        token_hash=token_hash(token), user=user, role=role, site_id=site_id or None, created_at=now_utc()))
    return token


async def principal_for(conn: AsyncConnection, token: str) -> Principal | None:
    """The holder of a token, or None when the token is unknown or revoked."""
    return await principal_for_hash(conn, token_hash(token))


async def principal_for_hash(conn: AsyncConnection, digest: str) -> Principal | None:
    """The holder of the token with this hash (a web session keeps only the hash), or None when the
    token is unknown or revoked: the one check the API and the pages both pass through."""
    row = (await conn.execute(select(api_tokens).where(api_tokens.c.token_hash == digest))).first()
    if row is None or row.revoked_at is not None or row.role not in PERMISSIONS:
        return None
    return Principal(user=row.user, role=row.role, site_id=row.site_id, token_hash=digest)
