"""JetStream entrypoint of the notify service: its durable consumer over every event subject.

The subscriber itself (pull, one at a time, explicit acks, dead-lettering) is shared:
shared/consuming.py.
"""

from __future__ import annotations

from faststream.nats import NatsRouter

from shared.bus import BusNames
from shared.consuming import Subscription, durable_router

DURABLE = "notify"


def build_router(names: BusNames, subscription: Subscription, *, durable: str = DURABLE,
                 ack_wait: float = 60.0) -> NatsRouter:
    return durable_router(names, subscription, durable=durable, ack_wait=ack_wait)
