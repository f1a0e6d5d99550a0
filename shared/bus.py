"""The bus: one JetStream stream, one subject per event type, and the outbox relay.

- Every stored event is published to ``<prefix>.events.<type>`` on the stream ``<name>``.
- Publishing happens only here, in the relay, never inside a request: the relay reads *every*
  unpublished outbox row in position order (not "rows after the last position seen": a row can
  commit after a higher one), publishes a window of them with their acks in flight together, with
  ``Nats-Msg-Id`` = event id (the server drops a re-publish inside its duplicate window), and
  deletes the rows only after the server's ack, in one statement per window.
- JetStream's duplicate window is minutes long; consumers therefore keep their own durable
  "processed" rows (shared/consuming.py) and never rely on the broker for idempotency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import nats
from faststream.nats import NatsBroker
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.events import StoredEvent
from shared.store.engine import reader
from shared.store.eventstore import to_stored
from shared.store.tables import events, outbox

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 120.0
STREAM_ADMIN_TIMEOUT_S = 20.0  # creating a stream's replicas on a busy cluster takes seconds


@dataclass(frozen=True)
class BusNames:
    stream: str = "TRIALWATCH"
    prefix: str = "trialwatch"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.events.>"

    def subject(self, event_type: str) -> str:
        return f"{self.prefix}.events.{event_type}"


def nats_servers(url: str) -> list[str]:
    """The servers ``TRIALWATCH_NATS_URL`` names: one URL, or the URLs of a cluster's servers
    comma-separated (neither nats-py nor FastStream splits a string; they take a list)."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError(f"no NATS server in {url!r}")
    return servers


def nats_broker(url: str) -> NatsBroker:
    """A FastStream broker on every server ``url`` names, reconnecting without end (to another
    server of the cluster when its own goes away)."""
    return NatsBroker(nats_servers(url), max_reconnect_attempts=-1, reconnect_time_wait=1, connect_timeout=5)


async def ensure_stream(url: str, names: BusNames, *, replicas: int | None = None) -> None:
    """Create the stream, or bring an existing one to this configuration.

    ``replicas`` is how many servers of a cluster keep a copy (``TRIALWATCH_STREAM_REPLICAS``).
    Without it an existing stream keeps the number it has and a new one gets 1, so a caller that
    does not know the setting never shrinks a replicated stream. A stream already as wanted is
    left alone: several services starting at once on a cluster would otherwise queue proposals
    for the same change behind the creation of the replicas.
    """
    nc = await nats.connect(nats_servers(url), connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = nc.jetstream(timeout=STREAM_ADMIN_TIMEOUT_S)
        try:
            await _apply_stream(js, names, replicas)
        except (BadRequestError, NatsTimeoutError):  # another process was creating it meanwhile
            await _apply_stream(js, names, replicas)
    finally:
        await nc.close()


async def _apply_stream(js: JetStreamContext, names: BusNames, replicas: int | None) -> None:
    try:
        current: StreamConfig | None = (await js.stream_info(names.stream)).config
    except NotFoundError:
        current = None
    config = StreamConfig(
        name=names.stream,
        subjects=[names.all_events],
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas or (current.num_replicas if current else None) or 1,
    )
    if current is None:
        await js.add_stream(config)
    elif (current.subjects, current.duplicate_window, current.num_replicas) != (
            config.subjects, config.duplicate_window, config.num_replicas):
        await js.update_stream(config)


async def check_nats(url: str) -> None:
    """Readiness: a server answers and JetStream is on (refused ports fail at once; of a
    cluster's servers, one that answers is enough)."""
    reachable = []
    for server in nats_servers(url):
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222), 2)
        except (OSError, TimeoutError):
            continue
        writer.close()
        reachable.append(server)
    if not reachable:
        raise ConnectionRefusedError(f"no NATS server answers at {url}")
    nc = await nats.connect(reachable, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
    try:
        await nc.jetstream().account_info()
    finally:
        await nc.close()


class OutboxRelay:
    """Publishes outbox rows to JetStream; safe to run in several processes at once.

    Each round reads up to ``batch`` rows, oldest first, and publishes them ``window`` at a time with
    the window's acks in flight together (one connection, so they go on the wire in position
    order); the rows whose publish the server acknowledged are deleted with one statement, the
    others keep their row with one more failed attempt counted, and the first failure is raised
    (the round stops at the window it happened in).
    """

    def __init__(self, engine: AsyncEngine, broker: NatsBroker, names: BusNames, *, batch: int = 500,
                 window: int = 64, ack_timeout_s: float = 5.0, gather_s: float | None = None) -> None:
        self.engine, self.broker, self.names, self.batch, self.window = engine, broker, names, batch, window
        self.ack_timeout_s = ack_timeout_s
        # After a poke, how long the commits right behind it may join the round. On SQLite each
        # round ends in a delete that waits for the one write lock: fewer, larger rounds.
        self.gather_s = gather_s if gather_s is not None else 0.01 if engine.dialect.name == "postgresql" else 0.1
        self.reads = reader(engine)  # SQLite: the rows are read apart from their delete
        self._wake = asyncio.Event()
        # SQLite, in ``run``: rows published whose delete has not committed yet, and the deletes
        # (and failed attempts) still to write (``_settle_behind``).
        self._settling: set[int] = set()
        self._behind: tuple[list[int], list[tuple[int, BaseException]]] = ([], [])
        self._settler: asyncio.Task[None] | None = None
        self._js: JetStreamContext | None = None
        self._js_of: object = None  # the connection ``_js`` belongs to

    def poke(self) -> None:
        """Publish now, not at the next interval: what its process just committed (the API's
        group commit, the safety service's batch) goes out within ``gather_s``."""
        self._wake.set()

    def _jetstream(self) -> JetStreamContext:
        """The JetStream context of the broker's connection, made once per connection (each one
        subscribes to its own inbox for the acks)."""
        connection = self.broker.connection
        if self._js is None or self._js_of is not connection:
            self._js, self._js_of = connection.jetstream(), connection
        return self._js

    async def _send(self, js: JetStreamContext, event: StoredEvent) -> asyncio.Future[Any]:
        """Put one event on the wire; the future is the server's ack. The message is the one
        FastStream's ``publish`` makes of ``event.to_message()`` (its JSON body, content type and
        correlation id), sent by nats-py's pipelined ``publish_async``: FastStream's publish awaits
        each ack in its own request, and its layers cost the relay a third of its CPU."""
        event_id = str(event.event_id)
        return await js.publish_async(
            self.names.subject(event.type), event.model_dump_json().encode(), stream=self.names.stream,
            headers={"content-type": "application/json", "Nats-Msg-Id": event_id,
                     "correlation_id": str(event.correlation_id) if event.correlation_id else event_id})

    async def publish_pending(self, *, settle_behind: bool = False) -> int:
        """Publish what is waiting; returns how many rows were published (and deleted, or, with
        ``settle_behind``, on their way to being deleted).

        On PostgreSQL the rows are taken ``FOR UPDATE SKIP LOCKED`` in the transaction that
        deletes them: the ingest's and the safety service's relays (and every replica's) publish
        disjoint rows instead of racing each other to the same ones (the server would drop the
        copy, but each was read, encoded and sent twice). SQLite has one writer and no row locks:
        there the rows are read, published, then deleted in a second transaction. That delete
        waits for the one write lock, behind the API's commits and the consumers' batches, so
        ``run`` leaves it to a task of its own (``settle_behind``) and goes on publishing what came
        meanwhile, skipping the rows whose delete is still on its way.
        """
        if self.engine.dialect.name == "postgresql":
            async with self.engine.begin() as conn:
                pending = await self._pending(conn, lock=True)
                acked, failed = await self._publish_all(pending)
                await self._settle(conn, acked, failed)
        else:
            async with self.reads.connect() as conn:
                pending = [e for e in await self._pending(conn, lock=False, skip=len(self._settling))
                           if e.position not in self._settling][:self.batch]
            acked, failed = await self._publish_all(pending)
            if settle_behind:
                self._settle_behind(acked, failed)
            else:
                async with self.engine.begin() as conn:
                    await self._settle(conn, acked, failed)
        if failed:
            error = failed[0][1]
            raise error if isinstance(error, Exception) else RuntimeError(repr(error))
        return len(acked)

    async def _pending(self, conn: AsyncConnection, *, lock: bool, skip: int = 0) -> list[StoredEvent]:
        """The oldest waiting rows: ``batch`` of them, and ``skip`` more (those still settling)."""
        query = select(events).join(outbox, outbox.c.position == events.c.position).order_by(events.c.position)
        if lock:
            query = query.with_for_update(of=outbox, skip_locked=True)
        return [to_stored(row) for row in await conn.execute(query.limit(self.batch + skip))]

    def _settle_behind(self, acked: list[int], failed: list[tuple[int, BaseException]]) -> None:
        """Delete the published rows (count the failed attempts) in a task of their own; the ones
        that come while a delete waits for the lock go together in the next transaction."""
        self._settling.update(acked)
        self._behind[0].extend(acked)
        self._behind[1].extend(failed)
        if self._settler is None or self._settler.done():
            self._settler = asyncio.create_task(self._settle_all_behind(), name="outbox-settle")

    async def _settle_all_behind(self) -> None:
        while self._behind[0] or self._behind[1]:
            (acked, failed), self._behind = self._behind, ([], [])
            try:
                async with self.engine.begin() as conn:
                    await self._settle(conn, acked, failed)
            except Exception:  # the rows stay: published again, the server drops the copies by id
                log.warning("outbox relay: %d published rows not deleted; they will be published again",
                            len(acked), exc_info=True)
            finally:
                self._settling.difference_update(acked)

    async def settled(self) -> None:
        """Wait until every delete left behind by ``run`` has been written or given up."""
        if self._settler is not None:
            await asyncio.wait([self._settler])

    async def _publish_all(self, pending: list[StoredEvent]) -> tuple[list[int], list[tuple[int, BaseException]]]:
        acked: list[int] = []
        failed: list[tuple[int, BaseException]] = []
        js = self._jetstream() if pending else None
        for start in range(0, len(pending), self.window):  # a window at a time: requests run between them
            assert js is not None
            window = pending[start:start + self.window]
            outcomes = await self._window(js, window)
            acked += [e.position for e, outcome in zip(window, outcomes, strict=True) if outcome is None]
            failed += [(e.position, outcome) for e, outcome in zip(window, outcomes, strict=True) if outcome is not None]
            if failed:
                break
        return acked, failed

    async def _window(self, js: JetStreamContext, window: list[StoredEvent]) -> list[BaseException | None]:
        """Each event's outcome: None once the server acknowledged it, else why not (an event that
        could not be sent fails, and so does every one after it; an ack not back within
        ``ack_timeout_s`` is a timeout)."""
        acks: list[asyncio.Future[Any]] = []
        unsent: BaseException | None = None
        for event in window:  # sent one after another: they go on the wire in position order
            try:
                acks.append(await self._send(js, event))
            except Exception as exc:
                unsent = exc
                break
        if acks:
            _, late = await asyncio.wait(acks, timeout=self.ack_timeout_s)
            for ack in late:
                ack.cancel()
        outcomes: list[BaseException | None] = [
            NatsTimeoutError() if ack.cancelled() else ack.exception() for ack in acks]
        return outcomes + [unsent] * (len(window) - len(acks))

    @staticmethod
    async def _settle(conn: AsyncConnection, acked: list[int], failed: list[tuple[int, BaseException]]) -> None:
        if acked:
            await conn.execute(delete(outbox).where(outbox.c.position.in_(acked)))
        if failed:
            await conn.execute(update(outbox).where(outbox.c.position.in_([p for p, _ in failed]))
                               .values(attempts=outbox.c.attempts + 1))

    async def run(self, stop: asyncio.Event, *, interval: float = 0.2) -> None:
        try:
            await self._run(stop, interval)
        finally:  # a stopping relay does not wait out a long lock: rows it leaves are published
            with contextlib.suppress(TimeoutError):  # again by whoever runs next, the copies dropped
                async with asyncio.timeout(5.0):
                    await self.settled()

    async def _run(self, stop: asyncio.Event, interval: float) -> None:
        backoff, behind = interval, self.engine.dialect.name == "sqlite"
        while not stop.is_set():
            # Cleared before the round reads, not after: a poke while it publishes (a commit it
            # did not see) must start the next round at once, not wait out the interval.
            self._wake.clear()
            try:
                published = await self.publish_pending(settle_behind=behind)
                backoff = interval
            except Exception as exc:  # the broker is down or slow: wait and try again, keep the rows
                log.warning("outbox relay: publish failed (%s); retrying in %.1f s", exc, backoff)
                published, backoff = 0, min(backoff * 2, 5.0)
            if published >= self.batch:
                continue
            try:
                async with asyncio.timeout(backoff):
                    await self._wake.wait()
            except TimeoutError:
                continue
            await asyncio.sleep(self.gather_s)  # poked: the commits right behind join the round
