"""JetStream entrypoint of the safety service: its durable consumer over every event subject,
fetched in batches; any number of safety workers may share it (shared/consuming.py). Only the
patients' events are read; the rest (its own alerts coming back, digests) are acked unread."""

from __future__ import annotations

from shared.bus import BusNames
from shared.consuming import BatchPuller, BatchSubscription
from shared.patients import PATIENT_TYPES

DURABLE = "safety"
BATCH_SIZE = 50  # a batch is one transaction: large enough to share the work, short enough not to hold ingest up


def build_puller(nats_url: str, names: BusNames, subscription: BatchSubscription, *, durable: str = DURABLE,
                 batch_size: int = BATCH_SIZE, ack_wait: float = 60.0) -> BatchPuller:
    return BatchPuller(nats_url, names, subscription, durable=durable, batch_size=batch_size, ack_wait=ack_wait,
                       types=PATIENT_TYPES)
