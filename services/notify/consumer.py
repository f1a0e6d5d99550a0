"""JetStream entrypoint of the notify service: its durable consumer, fetched in batches.

Only the mailed types and digest requests are read; every other event is acked unread
(shared/consuming.py ``BatchPuller``). Alert mails are queued a batch to a transaction; a digest
request is taken on its own (it sends, or queues a retry, in transactions of its own).
"""

from __future__ import annotations

from typing import Any

from services.notify.deliveries import MAILED_TYPES
from shared.bus import BusNames
from shared.consuming import BatchPuller, BatchSubscription, Subscription
from shared.events import DIGEST_REQUESTED

DURABLE = "notify"
BATCH_SIZE = 50


class NotifyIntake:
    """A fetched batch: its mailed events to ``mail`` whole, its digest requests to ``single``."""

    def __init__(self, names: BusNames, mail: BatchSubscription, single: Subscription) -> None:
        self.digest_subject = names.subject(DIGEST_REQUESTED)
        self.mail, self.single = mail, single

    async def handle(self, raws: list[Any]) -> None:
        mailed = [raw for raw in raws if raw.subject != self.digest_subject]
        if mailed:
            await self.mail.handle(mailed)
        for raw in raws:
            if raw.subject == self.digest_subject:
                await self.single.handle_raw(raw)


def build_puller(nats_url: str, names: BusNames, intake: NotifyIntake, *, durable: str = DURABLE,
                 batch_size: int = BATCH_SIZE, ack_wait: float = 60.0) -> BatchPuller:
    return BatchPuller(nats_url, names, intake, durable=durable, batch_size=batch_size, ack_wait=ack_wait,
                       types=MAILED_TYPES | {DIGEST_REQUESTED})
