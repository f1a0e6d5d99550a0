"""Nothing clinical happens after a patient's recorded death.

The death that counts is the one in the effective history (``shared/clinical/history.py``): a
retracted death no longer counts, a corrected one counts at its corrected time. A wrong death is
fixed by correcting or retracting it, so corrections and retractions are always let through.
"""

from __future__ import annotations

from collections.abc import Sequence
from zoneinfo import ZoneInfo

from pydantic import BaseModel

from services.ingest.domain.errors import FieldProblem
from shared.clinical.history import Fact, effective_history
from shared.events import OBSERVATION_TYPES, StoredEvent


def recorded_death(history: Sequence[StoredEvent], tz: ZoneInfo) -> Fact | None:
    """The patient's death as the corrected history has it, if any."""
    _, facts = effective_history(history, tz)
    return next((f for f in facts if f.type == "death"), None)


def describe(death: Fact) -> str:
    return (f"the patient's death is recorded on {death.day.isoformat()} ({death.occurred_at.isoformat()}, "
            f"event {death.event_id}); correct or retract that event if it is wrong")


def after_death_problems(body: BaseModel, death: Fact | None, tz: ZoneInfo) -> list[FieldProblem]:
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
        return [FieldProblem("type", f"a death is already recorded for this patient: {describe(death)}")]
    if body.occurred_at.astimezone(tz).date() > death.day:  # type: ignore[attr-defined]
        return [FieldProblem("occurred_at", f"{body.occurred_at.isoformat()} is after the patient's "  # type: ignore[attr-defined]
                                            f"recorded death: {describe(death)}")]
    return []
