"""JetStream entrypoint of the safety service: its durable consumer over every event subject.

The subscriber itself (pull, one at a time, explicit acks, dead-lettering) is shared:
shared/consuming.py.
"""

from __future__ import annotations

from faststream.nats import NatsRouter

from shared.bus import BusNames
from shared.consuming import Subscription, durable_router

DURABLE = "safety"


def build_router(names: BusNames, subscription: Subscription, *, durable: str = DURABLE) -> NatsRouter:
    return durable_router(names, subscription, durable=durable)
