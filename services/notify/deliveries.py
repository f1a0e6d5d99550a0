"""Alert mail as a ledger: one ``deliveries`` row per (alert event, recipient), sent exactly once.

Business rules (CONTRACT.md section 4):

- Only ``urgent`` and ``high`` alerts are mailed: to the investigators, and a crossed stopping
  boundary (audience ``investigators_and_dsmb``) also to the DSMB.
- A withdrawn notice goes only to those who got (or are queued for) the alert it withdraws, and is
  held back until their copy of that alert has gone, so nobody reads "withdrawn" first.
- ``enqueue`` runs inside the consumer's transaction and ignores rows that already exist (the
  unique (alert_event_id, recipient) constraint), so replays and redeliveries queue nothing new.
- ``DeliverySender`` (sender.py) claims a due row with a conditional UPDATE (a lease in ``claimed_until``), so
  two replicas never both send it; it sends outside any transaction, then marks the row sent.
  A failure is recorded and retried with exponential backoff (2, 4, … capped at 300 s), never
  dropped and never given up; past 10 attempts each failure is logged at ERROR for an operator.

The one gap no SMTP client can close: if the process dies (or loses its lease) after the server
accepted the message but before "sent" is committed, the row is claimed again once the lease runs
out and the message is sent a second time. Every copy carries the same deterministic Message-ID
(``<event_id>.<sha256(recipient)[:16]>@trialwatch``), so mail systems that de-duplicate by
Message-ID drop it, and a reader's client threads it with the first.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.events import ALERT_RAISED, ALERT_WITHDRAWN, STOPPING_BOUNDARY_CROSSED, StoredEvent, alert_stream
from shared.store.eventstore import now_utc, utc
from shared.store.tables import deliveries, events

log = logging.getLogger(__name__)

MAILED_SEVERITIES = frozenset({"urgent", "high"})
RAISE_TYPES = (ALERT_RAISED, STOPPING_BOUNDARY_CROSSED)
MAILED_TYPES = frozenset({*RAISE_TYPES, ALERT_WITHDRAWN})
MAX_BACKOFF_S = 300
LOUD_AFTER_ATTEMPTS = 10


# --------------------------------------------------------------------------- who gets what


def recipients_for(data: dict[str, Any], *, investigators: Sequence[str], dsmb: Sequence[str]) -> list[str]:
    """The addresses a raised alert goes to (empty for ``info``), de-duplicated ignoring case."""
    if data.get("severity") not in MAILED_SEVERITIES:
        return []
    wanted = list(investigators)
    if data.get("audience") == "investigators_and_dsmb":
        wanted += list(dsmb)
    return _unique(wanted)


async def recipients_of_alert(conn: AsyncConnection, alert_id: object) -> list[str]:
    """Everyone who got, or is queued for, any raise of this alert (in the order first queued)."""
    raised = select(events.c.event_id).where(
        events.c.stream_id == alert_stream(str(alert_id)), events.c.type.in_(RAISE_TYPES)
    )
    rows = await conn.execute(
        select(deliveries.c.recipient).where(deliveries.c.alert_event_id.in_(raised)).order_by(deliveries.c.id)
    )
    return _unique(r.recipient for r in rows)


async def recipients_for_event(
    conn: AsyncConnection, event: StoredEvent, *, investigators: Sequence[str], dsmb: Sequence[str]
) -> list[str]:
    """Whom a stored alert event is mailed to: the rule above for a raise, the raise's for a withdrawal."""
    if event.type in RAISE_TYPES:
        return recipients_for(event.data, investigators=investigators, dsmb=dsmb)
    if event.type == ALERT_WITHDRAWN:
        return await recipients_of_alert(conn, event.data["alert_id"])
    return []


def message_id_for(event_id: object, recipient: str) -> str:
    digest = hashlib.sha256(_normal(recipient).encode()).hexdigest()[:16]
    return f"<{event_id}.{digest}@trialwatch>"


def _normal(address: str) -> str:
    return address.strip().lower()


def _unique(addresses: Any) -> list[str]:
    seen: dict[str, str] = {}
    for address in addresses:
        if address.strip():
            seen.setdefault(_normal(address), address.strip())
    return list(seen.values())


# --------------------------------------------------------------------------- queueing


async def enqueue(
    conn: AsyncConnection, event: StoredEvent, recipients: Sequence[str], *, now: datetime | None = None
) -> int:
    """Queue ``event`` for each recipient inside the caller's transaction; returns how many rows
    are new (0 on a replay). Addresses are stored lower-cased, so a re-cased setting is no new one."""
    if event.type not in MAILED_TYPES:
        raise ValueError(f"{event.type!r} events are not mailed (only {sorted(MAILED_TYPES)})")
    when = utc(now or now_utc())
    queued = 0
    for recipient in {_normal(r): None for r in recipients if r.strip()}:
        row = {
            "alert_event_id": str(event.event_id),
            "recipient": recipient,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": when,
            "message_id": message_id_for(event.event_id, recipient),
            "created_at": when,
        }
        queued += await _insert_if_new(conn, row)
    return queued


async def _insert_if_new(conn: AsyncConnection, row: dict[str, Any]) -> int:
    dialect = conn.dialect.name
    if dialect in ("postgresql", "sqlite"):
        make = pg_insert if dialect == "postgresql" else sqlite_insert
        statement = make(deliveries).values(**row).on_conflict_do_nothing(
            index_elements=["alert_event_id", "recipient"]
        )
        return (await conn.execute(statement)).rowcount
    try:  # any other dialect: let the unique constraint decide, inside a savepoint
        async with conn.begin_nested():
            await conn.execute(insert(deliveries).values(**row))
        return 1
    except IntegrityError:
        return 0
