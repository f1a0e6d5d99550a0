"""Nothing clinical happens after a patient's recorded death.

The death that counts is the one in the effective history (``shared/clinical/history.py``): a
retracted death no longer counts, a corrected one counts at its corrected time. A wrong death is
fixed by correcting or retracting it, so corrections and retractions are always let through.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from pydantic import BaseModel

from services.ingest.domain.errors import FieldProblem
from shared.clinical.history import effective_history
from shared.events import OBSERVATION_TYPES, StoredEvent

# Only these can change which death the corrected history has (a correction's replacement has its
# target's type, so only a death's correction makes or moves one).
DEATH_CHANGING_TYPES = frozenset({"death", "correction", "retraction"})


@dataclass(frozen=True)
class RecordedDeath:
    event_id: uuid.UUID
    occurred_at: datetime  # in the offset it was entered in

    def day(self, tz: ZoneInfo) -> date:
        return self.occurred_at.astimezone(tz).date()


def recorded_death(history: Sequence[StoredEvent], tz: ZoneInfo) -> RecordedDeath | None:
    """The patient's death as the corrected history has it, if any."""
    _, facts = effective_history(history, tz)
    death = next((f for f in facts if f.type == "death"), None)
    return RecordedDeath(death.event_id, death.occurred_at) if death else None


def describe(death: RecordedDeath, tz: ZoneInfo) -> str:
    return (f"the patient's death is recorded on {death.day(tz).isoformat()} ({death.occurred_at.isoformat()}, "
            f"event {death.event_id}); correct or retract that event if it is wrong")


def after_death_problems(body: BaseModel, death: RecordedDeath | None, tz: ZoneInfo) -> list[FieldProblem]:
    """Refuse a second death, and any observation on a day after the recorded death.

    - A ``death`` while a death is recorded is refused (named at ``type``).
    - Any other observation on a later trial-zone day than the death is refused (named at
      ``occurred_at``). The day of death itself is accepted whatever the hour: a death is often
      recorded at midnight or at an approximate time, and that day's labs were drawn before it.
    - Corrections and retractions are not checked: they are how a wrong death is fixed.
    """
    kind = getattr(body, "type", None)
    if death is None or kind not in OBSERVATION_TYPES:
        return []
    if kind == "death":
        return [FieldProblem("type", f"a death is already recorded for this patient: {describe(death, tz)}")]
    if body.occurred_at.astimezone(tz).date() > death.day(tz):  # type: ignore[attr-defined]
        return [FieldProblem("occurred_at", f"{body.occurred_at.isoformat()} is after the patient's "  # type: ignore[attr-defined]
                                            f"recorded death: {describe(death, tz)}")]
    return []
