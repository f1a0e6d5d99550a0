"""JetStream subscriber of the notifier: alert events and digest requests, explicit acks."""

from __future__ import annotations

from typing import Any

from faststream import AckPolicy
from faststream.nats import JStream, NatsMessage, NatsRouter, PullSub
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared.bus import BusNames
from shared.consuming import Subscription

DURABLE = "notify"


def build_router(names: BusNames, subscription: Subscription, *, durable: str = DURABLE) -> NatsRouter:
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
