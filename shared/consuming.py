"""Consuming events from JetStream: exactly-once effects over at-least-once delivery.

- ``process_once`` writes the consumer's "I processed event X" row in the *same* transaction as
  the handler's effects (eventsourcing's ``Follower.process_event``): a redelivered or replayed
  event finds its row and changes nothing.
- ``Subscription.handle`` is the subscriber body shared by the safety and notify services:
  explicit acks. A failing message is nak'ed with a growing delay; on its ``max_deliver``-th
  failure it is written to ``dead_letters`` (which an operator lists and replays with
  ``trialwatch dead-letters``) and terminated, so it neither loops forever nor vanishes.
  The server's own ``max_deliver`` is set two above ours, so a process killed in the middle of
  the last attempt still gets one more delivery before the server gives up.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from faststream import AckPolicy
from faststream.nats import JStream, NatsMessage, NatsRouter, PullSub
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.bus import BusNames
from shared.events import StoredEvent
from shared.store.eventstore import now_utc
from shared.store.tables import dead_letters, processed_messages

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


class Subscription:
    """The body of a JetStream subscriber: parse, handle once, ack; or retry, then dead-letter."""

    def __init__(
        self, engine: AsyncEngine, consumer: str, handler: Callable[[StoredEvent], Awaitable[Any]], *,
        max_deliver: int,
    ) -> None:
        self.engine, self.consumer, self.handler, self.max_deliver = engine, consumer, handler, max_deliver

    @property
    def server_max_deliver(self) -> int:
        return self.max_deliver + 2

    async def handle(self, body: Any, msg: NatsMessage) -> None:
        raw = msg.raw_message
        delivered = int(getattr(getattr(raw, "metadata", None), "num_delivered", 1) or 1)
        try:
            event = StoredEvent.model_validate(body if isinstance(body, dict) else json.loads(body))
            await self.handler(event)
        except Exception as exc:
            if delivered >= self.max_deliver:
                log.error("%s: giving up on %s after %d deliveries: %s", self.consumer, raw.subject, delivered, exc)
                await record_dead_letter(
                    self.engine, self.consumer, subject=raw.subject, payload=raw.data.decode("utf-8", "replace"),
                    error=f"{type(exc).__name__}: {exc}", deliveries=delivered,
                )
                await msg.ack()
                return
            log.warning("%s: delivery %d of %s failed (%s); will retry", self.consumer, delivered, raw.subject, exc)
            await msg.nack(delay=min(2.0 ** delivered, 30.0))
            return
        await msg.ack()


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
            max_deliver=subscription.server_max_deliver,
            ack_wait=60,
        ),
        ack_policy=AckPolicy.MANUAL,
    )
    async def on_event(body: Any, msg: NatsMessage) -> None:
        await subscription.handle(body, msg)

    return router
