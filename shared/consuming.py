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

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

import nats
from faststream import AckPolicy
from faststream.nats import JStream, NatsMessage, NatsRouter, PullSub
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.bus import BusNames, nats_servers
from shared.events import StoredEvent
from shared.store.eventstore import now_utc
from shared.store.tables import dead_letters, delivery_failures, processed_messages
from shared.store.upsert import upsert_returning

log = logging.getLogger(__name__)

Work = Callable[[AsyncConnection, StoredEvent], Awaitable[None]]
BatchWork = Callable[[AsyncConnection, list[StoredEvent]], Awaitable[None]]


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


async def process_batch(engine: AsyncEngine, consumer: str, batch: list[StoredEvent], work: BatchWork) -> list[StoredEvent]:
    """``process_once`` for many events: the "processed" rows of those not seen before and the
    work on them, in one transaction; the events that were new (the work saw exactly these)."""
    unique = {str(e.event_id): e for e in batch}
    async with engine.begin() as conn:
        # One statement: the rows of the events not seen before go in, and say which they were.
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(processed_messages).on_conflict_do_nothing(
            index_elements=["consumer", "event_id"]).returning(processed_messages.c.event_id)
        now = now_utc()
        new_ids = set((await conn.execute(statement, [
            {"consumer": consumer, "event_id": event_id, "processed_at": now} for event_id in unique])).scalars())
        fresh = [event for event_id, event in unique.items() if event_id in new_ids]
        if fresh:
            await work(conn, fresh)
    return fresh


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
    metadata: Any = getattr(raw, "metadata", None)
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
        await self.handle_raw(msg.raw_message, body)

    async def handle_raw(self, raw: Any, body: Any = None) -> None:
        """One message: ``body`` decoded already, or None to decode ``raw.data``."""
        delivered = int(getattr(getattr(raw, "metadata", None), "num_delivered", 1) or 1)
        try:
            body = raw.data if body is None else body
            event = StoredEvent.model_validate(body if isinstance(body, dict) else json.loads(body))
            await self.handler(event)
        except Exception as exc:
            await self.failed(raw, delivered, f"{type(exc).__name__}: {exc}")
            return
        if delivered > 1:  # it failed before (or was only slow): its failure count has done its work
            try:
                await forget_failures(self.engine, self.consumer, message_key(raw))
            except Exception:  # a stale count names a sequence number never delivered again: harmless
                log.warning("%s: could not clear the failure count of %s", self.consumer, raw.subject, exc_info=True)
        await _ack(raw)

    async def failed(self, raw: Any, delivered: int, error: str) -> None:
        """Count the failure; retry later, or after ``max_deliver`` failures dead-letter and ack."""
        key = message_key(raw)
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
            await _nak(raw, NAK_DELAY_CAP_S)
            return
        if failures >= self.max_deliver:
            log.error("%s: gave up on %s after %d failed deliveries (server count %d): %s", self.consumer,
                      raw.subject, failures, delivered, error)
            await _ack(raw)
            return
        log.warning("%s: delivery %d of %s failed (%s); will retry", self.consumer, failures, raw.subject, error)
        await _nak(raw, min(2.0 ** failures, NAK_DELAY_CAP_S))


async def _ack(raw: Any) -> None:
    if not getattr(raw, "_ackd", False):
        await raw.ack()


async def _nak(raw: Any, delay: float) -> None:
    if not getattr(raw, "_ackd", False):
        await raw.nak(delay=delay)


OUTAGE_NAK_DELAY_S = 2.0


class BatchSubscription:
    """The body of a batch subscriber: many messages, one transaction, acks after the commit.

    ``work`` sees the batch's new events at once (the safety service evaluates each patient once
    per batch). A batch that fails because the store is out (``is_outage``) is nak'ed whole and
    comes back; one that fails otherwise is taken apart and its messages handled one by one by
    ``single``, which counts each one's failures and dead-letters the one that keeps failing, so
    no message can hold the others back.
    """

    def __init__(self, engine: AsyncEngine, consumer: str, work: BatchWork, *, max_deliver: int,
                 is_outage: Callable[[BaseException], bool],
                 after_commit: Callable[[list[StoredEvent]], Awaitable[None]] | None = None,
                 prepare: Callable[[list[StoredEvent]], Awaitable[BatchWork]] | None = None) -> None:
        self.engine, self.consumer, self.work, self.is_outage = engine, consumer, work, is_outage
        self.after_commit, self.prepare = after_commit, prepare
        self.single = Subscription(engine, consumer, self._one, max_deliver=max_deliver)

    async def _one(self, event: StoredEvent) -> None:
        await self.run([event])

    async def run(self, batch: list[StoredEvent]) -> None:
        """The batch in one transaction; ``prepare``, when given, first does what needs no
        transaction and answers the work to run in it (the safety service decides ahead)."""
        work = self.work if self.prepare is None else await self.prepare(batch)
        fresh = await process_batch(self.engine, self.consumer, batch, work)
        if self.after_commit is not None and fresh:
            await self.after_commit(fresh)

    async def handle(self, raws: list[Any]) -> None:
        parsed: list[tuple[Any, StoredEvent]] = []
        for raw in raws:
            try:
                parsed.append((raw, StoredEvent.model_validate_json(raw.data)))
            except ValueError:  # not an event: counted, then dead-lettered, on its own
                await self.single.handle_raw(raw)
        if not parsed:
            return
        try:
            await self.run([event for _, event in parsed])
        except Exception as exc:
            if self.is_outage(exc):
                log.warning("%s: batch of %d failed (%s); will retry", self.consumer, len(parsed), exc)
                for raw, _ in parsed:
                    await _nak(raw, OUTAGE_NAK_DELAY_S)
                return
            log.exception("%s: batch of %d failed; handling its messages one by one", self.consumer, len(parsed))
            for raw, event in parsed:
                await self.single.handle_raw(raw, event.model_dump(mode="json"))
            return
        for raw, _ in parsed:
            await _ack(raw)


def _consumer_config(durable: str, ack_wait: float) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        max_deliver=-1,  # unlimited: only our own count (Subscription.failed) gives up
        ack_wait=ack_wait,
    )


class Intake(Protocol):
    """What takes a fetched batch of raw messages (and acks or naks each)."""

    async def handle(self, raws: list[Any]) -> None: ...


class BatchPuller:
    """One durable pull consumer over every event subject, fetched ``batch_size`` at a time with
    nats-py: one fetch per round, whatever it returns handed to ``subscription`` whole.

    ``types``: the event types the consumer acts on. A message of any other type is acked as it
    arrives, unread (the notifier mails a few types out of every event; NATS 2.9 filters a
    consumer on one subject only).

    Any number of processes may fetch from it: the server hands each batch to one of them.
    (FastStream's batch subscriber fetches again with the time left until its batch is full; a
    fetch whose time runs out with its pull request still open strands what the server sends for
    it until the ack wait: alerts a minute late. One fetch with a real timeout does not.)
    """

    FETCH_TIMEOUT_S = 1.0

    def __init__(self, nats_url: str, names: BusNames, subscription: Intake, *, durable: str,
                 batch_size: int, ack_wait: float = 60.0, types: Collection[str] | None = None) -> None:
        self.nats_url, self.names, self.subscription = nats_url, names, subscription
        self.durable, self.batch_size, self.ack_wait = durable, batch_size, ack_wait
        self.subjects = None if types is None else frozenset(names.subject(t) for t in types)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._pull(stop)
            except Exception:  # the server went away for good, or refused: start over
                log.exception("%s: pulling failed; starting again in 1 s", self.durable)
                await asyncio.sleep(1.0)

    async def _pull(self, stop: asyncio.Event) -> None:
        nc = await nats.connect(nats_servers(self.nats_url), max_reconnect_attempts=-1, reconnect_time_wait=1,
                                connect_timeout=5)
        try:
            pull = await nc.jetstream().pull_subscribe(
                self.names.all_events, durable=self.durable, stream=self.names.stream,
                config=_consumer_config(self.durable, self.ack_wait))
            while not stop.is_set():
                try:
                    batch = await pull.fetch(self.batch_size, timeout=self.FETCH_TIMEOUT_S)
                except TimeoutError:
                    continue
                if self.subjects is not None:
                    for raw in batch:
                        if raw.subject not in self.subjects:
                            await _ack(raw)
                    batch = [raw for raw in batch if raw.subject in self.subjects]
                if batch:
                    await self.subscription.handle(batch)
        finally:
            await nc.close()


def durable_router(names: BusNames, subscription: Subscription, *, durable: str,
                   ack_wait: float = 60.0) -> NatsRouter:
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
        config=_consumer_config(durable, ack_wait),
        ack_policy=AckPolicy.MANUAL,
    )
    async def on_event(body: Any, msg: NatsMessage) -> None:
        await subscription.handle(body, msg)

    return router
