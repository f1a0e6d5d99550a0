"""JetStream entrypoint of the safety service: its durable consumer over every event subject,
fetched in batches; any number of safety workers may share it (shared/consuming.py)."""

from __future__ import annotations

from faststream.nats import NatsRouter

from shared.bus import BusNames
from shared.consuming import BatchSubscription, batch_router

DURABLE = "safety"
BATCH_SIZE = 50  # a batch is one transaction: large enough to share the work, short enough not to hold ingest up


def build_router(names: BusNames, subscription: BatchSubscription, *, durable: str = DURABLE,
                 batch_size: int = BATCH_SIZE, ack_wait: float = 60.0) -> NatsRouter:
    return batch_router(names, subscription, durable=durable, batch_size=batch_size, ack_wait=ack_wait)
