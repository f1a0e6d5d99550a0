"""Whether a clinical event may join a patient's history.

Nothing is updated or deleted: a correction or retraction is a new event pointing at an earlier
observation of the same patient, so the rules here guard those pointers and clinical time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta, tzinfo

from pydantic import BaseModel

from services.ingest.domain.errors import FieldProblem
from shared.clinical.grading import GradeConflict
from shared.events import OBSERVATION_TYPES, Correction, Crs, Gvhd, Icans, Retraction, StoredEvent

FUTURE_TOLERANCE = timedelta(minutes=5)


def not_ahead(path: str, when: datetime, now: datetime) -> list[FieldProblem]:
    """Clinical time may lie at most 5 minutes ahead of the server's clock (skew, not the future)."""
    if when > now + FUTURE_TOLERANCE:
        return [FieldProblem(path, f"{when.isoformat()} is in the future")]
    return []


def not_after_today(path: str, day: date, now: datetime, tz: tzinfo) -> list[FieldProblem]:
    """A date of the patient's history lies on or before the trial's today."""
    today = now.astimezone(tz).date()
    if day > today:
        return [FieldProblem(path, f"{day.isoformat()} is in the future (today is {today.isoformat()})")]
    return []


def time_problems(body: BaseModel, now: datetime) -> list[FieldProblem]:
    """``occurred_at`` of the body and, for a correction, of its replacement."""
    found = not_ahead("occurred_at", body.occurred_at, now)  # type: ignore[attr-defined]
    if isinstance(body, Correction):
        found += not_ahead("replacement.occurred_at", body.replacement.occurred_at, now)
    return found


def retracted_ids(history: Sequence[StoredEvent]) -> set[str]:
    return {str(e.data.get("retracts_event_id")) for e in history if e.type == "retraction"}


def amendment_problems(body: BaseModel, history: Sequence[StoredEvent]) -> list[FieldProblem]:
    """A correction or retraction must point at a live observation of this same patient.

    - The target is an observation event (not an enrolment, correction or retraction) in this
      patient's stream; another patient's event is refused as if unknown. A retraction may also
      take back a correction: the event reverts to the version before it.
    - A retracted target cannot be corrected or retracted again.
    - A correction's replacement has the target's type.
    """
    if isinstance(body, Correction):
        field, target_id = "corrects_event_id", body.corrects_event_id
    elif isinstance(body, Retraction):
        field, target_id = "retracts_event_id", body.retracts_event_id
    else:
        return []
    target = next((e for e in history if e.event_id == target_id), None)
    allowed = OBSERVATION_TYPES | {"correction"} if isinstance(body, Retraction) else OBSERVATION_TYPES
    if target is None or target.type not in allowed:
        what = "an observation or correction" if isinstance(body, Retraction) else "an observation event"
        return [FieldProblem(field, f"{target_id} is not {what} of this patient")]
    if str(target_id) in retracted_ids(history):
        return [FieldProblem(field, f"{target_id} is already retracted")]
    if isinstance(body, Correction) and body.replacement.type != target.type:
        return [FieldProblem("replacement.type", f"the replacement of a {target.type} event must be a "
                                                 f"{target.type}, not {body.replacement.type}")]
    return []


def _observed(body: BaseModel) -> tuple[str, BaseModel]:
    """The observation a body carries (a correction's replacement) and the path prefix to it."""
    return ("replacement.", body.replacement) if isinstance(body, Correction) else ("", body)


def missing_observations(body: BaseModel) -> list[FieldProblem]:
    """A CRS or ICANS grade derived from observations needs all of them (CONTRACT.md section 2).

    - CRS without a posted ``grade``: each of ``max_temp_c``, ``hypotension``, ``vasopressors`` and
      ``oxygen`` that is missing is named; ``vasopressin`` and ``anticytokine_given`` are optional.
    - ICANS without a posted ``grade``: ``ice_score`` and ``consciousness`` each, if missing (an
      unarousable patient needs no ICE score: it is 0); ``seizure``, ``motor_weakness`` and
      ``raised_icp`` are optional (absent when not given).
    - With a posted grade, observations are optional: those given must agree with it.
    """
    prefix, observed = _observed(body)
    if not isinstance(observed, Crs | Icans) or observed.grade is not None:
        return []
    if isinstance(observed, Crs):
        kind, missing = "CRS", tuple(n for n in Crs.OBSERVATIONS if getattr(observed, n) is None)
    else:
        kind, missing = "ICANS", observed.missing_findings
    return [FieldProblem(prefix + name, f"required to derive the {kind} grade (or post grade 1-4 instead)")
            for name in missing]


def _given(observed: BaseModel) -> tuple[str, ...]:
    """The observation fields a graded body carries (chronic GVHD: its organ scores)."""
    if isinstance(observed, Gvhd) and observed.form == "chronic":
        return ("organ_scores",) if observed.organ_scores is not None else ()
    if isinstance(observed, Crs):
        return observed.given_observations
    return observed.given_findings if isinstance(observed, Gvhd | Icans) else ()


def grade_conflict_problems(body: BaseModel, conflict: GradeConflict) -> list[FieldProblem]:
    """A posted grade (chronic GVHD: severity) the observations contradict: the grade and each
    observation given are named."""
    prefix, observed = _observed(body)
    given = _given(observed)
    kind, field, posted, derived = conflict.kind, conflict.field, conflict.given, conflict.derived_text
    grade = FieldProblem(prefix + field, f"{kind} {field} {posted} was given but {', '.join(given) or 'the observations'} "
                                         f"derive {derived}; correct the {field} or the observations, "
                                         "or send only one of them")
    return [grade, *(FieldProblem(prefix + name, f"with the other observations given it derives {kind} {derived}, "
                                                 f"not the posted {field} {posted}") for name in given)]
