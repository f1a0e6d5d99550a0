"""Consuming events from JetStream: exactly-once effects over at-least-once delivery.

- ``process_once`` writes the consumer's "I processed event X" row in the *same* transaction as
  the handler's effects (eventsourcing's ``Follower.process_event``): a redelivered or replayed
  event finds its row and changes nothing.
- ``Subscription.handle`` is the subscriber body shared by the safety and notify services:
  explicit acks. A failing message is nak'ed with a growing delay; each failure is counted in
  ``delivery_failures`` (the server's delivery count is only a hint: it has been seen to restart
  at 1 after a delayed nak). On its ``max_deliver``-th failure the message is written to
  ``dead_letters`` (which an operator lists and replays with ``trialwatch dead-letters``) and
  acked, so it neither loops forever nor vanishes.
- The server itself never gives up on a message (its ``max_deliver`` is unlimited): while the
  database cannot even record a failure, the message is nak'ed and waits, however long that takes,
  and a process killed in the middle of a delivery costs no attempt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from faststream import AckPolicy
from faststream.nats import JStream, NatsMessage, NatsRouter, PullSub
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.bus import BusNames
from shared.events import StoredEvent
from shared.store.eventstore import now_utc
from shared.store.tables import dead_letters, delivery_failures, processed_messages
from shared.store.upsert import upsert_returning

log = logging.getLogger(__name__)

Work = Callable[[AsyncConnection, StoredEvent], Awaitable[None]]


async def process_once(engine: AsyncEngine, consumer: str, event: StoredEvent, work: Work) -> bool:
    """Run ``work`` for ``event`` unless this consumer already did; True if it ran now."""
    async with engine.begin() as conn:
        seen = await conn.scalar(
            select(processed_messages.c.event_id).where(
                processed_messages.c.consumer == consumer, processed_messages.c.event_id == str(event.event_id)
            )
        )
        if seen:
            return False
        await conn.execute(
            insert(processed_messages).values(consumer=consumer, event_id=str(event.event_id), processed_at=now_utc())
        )
        await work(conn, event)
    return True


async def record_dead_letter(
    engine: AsyncEngine, consumer: str, *, subject: str, payload: str, error: str, deliveries: int
) -> None:
    try:  # only a real event id names the message; anything else is unnamed garbage
        event_id: str | None = str(uuid.UUID(str(json.loads(payload)["event_id"])))
    except (ValueError, TypeError, KeyError):
        event_id = None
    now = now_utc()
    async with engine.begin() as conn:
        existing = None if event_id is None else await conn.scalar(select(dead_letters.c.id).where(
            dead_letters.c.consumer == consumer, dead_letters.c.event_id == event_id))
        if existing is None:
            await conn.execute(insert(dead_letters).values(
                consumer=consumer, event_id=event_id, subject=subject, payload=payload,
                error=error[:4000], deliveries=deliveries, created_at=now,
            ))
        else:  # a replay failed again: show it as waiting once more, with the new error
            log.warning("%s: event %s failed again after a replay", consumer, event_id)
            await conn.execute(update(dead_letters).where(dead_letters.c.id == existing).values(
                error=error[:4000], deliveries=deliveries, created_at=now, replayed_at=None,
            ))


async def count_failure(engine: AsyncEngine, consumer: str, message: str, error: str) -> int:
    """Record one more failed delivery of ``message``; the number of failures so far."""
    async with engine.begin() as conn:
        return await upsert_returning(
            conn, delivery_failures,
            {"consumer": consumer, "message": message, "failures": 1, "last_error": error[:4000],
             "updated_at": now_utc()},
            keys=("consumer", "message"), increment="failures",
        )


async def forget_failures(engine: AsyncEngine, consumer: str, message: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(delete(delivery_failures).where(
            delivery_failures.c.consumer == consumer, delivery_failures.c.message == message))


def message_key(raw: Any) -> str:
    """What names one message across its redeliveries: its stream and stream sequence."""
    metadata = getattr(raw, "metadata", None)
    try:
        return f"{metadata.stream}:{metadata.sequence.stream}"
    except AttributeError:  # not a JetStream message (a test broker): its subject and content
        return f"{raw.subject}:{hashlib.sha256(raw.data).hexdigest()}"


NAK_DELAY_CAP_S = 30.0


class Subscription:
    """The body of a JetStream subscriber: parse, handle once, ack; or retry, then dead-letter."""

    def __init__(
        self, engine: AsyncEngine, consumer: str, handler: Callable[[StoredEvent], Awaitable[Any]], *,
        max_deliver: int,
    ) -> None:
        self.engine, self.consumer, self.handler, self.max_deliver = engine, consumer, handler, max_deliver

    async def handle(self, body: Any, msg: NatsMessage) -> None:
        raw = msg.raw_message
        delivered = int(getattr(getattr(raw, "metadata", None), "num_delivered", 1) or 1)
        try:
            event = StoredEvent.model_validate(body if isinstance(body, dict) else json.loads(body))
            await self.handler(event)
        except Exception as exc:
            await self.failed(msg, delivered, f"{type(exc).__name__}: {exc}")
            return
        if delivered > 1:  # it failed before (or was only slow): its failure count has done its work
            try:
                await forget_failures(self.engine, self.consumer, message_key(raw))
            except Exception:  # a stale count names a sequence number never delivered again: harmless
                log.warning("%s: could not clear the failure count of %s", self.consumer, raw.subject, exc_info=True)
        await msg.ack()

    async def failed(self, msg: NatsMessage, delivered: int, error: str) -> None:
        """Count the failure; retry later, or after ``max_deliver`` failures dead-letter and ack."""
        raw, key = msg.raw_message, message_key(msg.raw_message)
        try:
            failures = await count_failure(self.engine, self.consumer, key, error)
            if failures >= self.max_deliver:
                await record_dead_letter(
                    self.engine, self.consumer, subject=raw.subject, payload=raw.data.decode("utf-8", "replace"),
                    error=error, deliveries=failures,
                )
                await forget_failures(self.engine, self.consumer, key)
        except Exception:  # the database cannot even take the failure: wait for it, never give up
            log.exception("%s: cannot record the failure of %s (%s); will retry", self.consumer, raw.subject, error)
            await msg.nack(delay=NAK_DELAY_CAP_S)
            return
        if failures >= self.max_deliver:
            log.error("%s: gave up on %s after %d failed deliveries (server count %d): %s", self.consumer,
                      raw.subject, failures, delivered, error)
            await msg.ack()
            return
        log.warning("%s: delivery %d of %s failed (%s); will retry", self.consumer, failures, raw.subject, error)
        await msg.nack(delay=min(2.0 ** failures, NAK_DELAY_CAP_S))


def durable_router(names: BusNames, subscription: Subscription, *, durable: str) -> NatsRouter:
    """One durable pull consumer over every event subject, explicit acks.

    One message at a time (batch_size=1, one worker): a pull subscriber with several workers
    fetches ahead and lets messages time out into redelivery; the durable "processed" rows make
    any redelivery harmless anyway.
    """
    router = NatsRouter()

    @router.subscriber(
        names.all_events,
        stream=JStream(names.stream, declare=False),
        durable=durable,
        pull_sub=PullSub(batch_size=1, timeout=1.0),
        config=ConsumerConfig(
            durable_name=durable,
            deliver_policy=DeliverPolicy.ALL,
            max_deliver=-1,  # unlimited: only our own count (Subscription.failed) gives up
            ack_wait=60,
        ),
        ack_policy=AckPolicy.MANUAL,
    )
    async def on_event(body: Any, msg: NatsMessage) -> None:
        await subscription.handle(body, msg)

    return router
