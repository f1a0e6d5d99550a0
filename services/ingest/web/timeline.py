"""A patient's history as the timeline page shows it: clinical time in the trial's zone, derived
grades as "Grade N" with their scale, and which entries a correction or retraction replaced."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.ingest.domain.acceptance import retracted_ids
from services.ingest.web.labels import event_words, field_label, option_words
from shared.clinical.chart import Chart
from shared.events import OBSERVATION_TYPES, StoredEvent

HIDDEN = frozenset({"grade", "scale", "severity", "stages", "type", "occurred_at", "failed_criteria",
                    "eligibility", "eligibility_override", "subject_id", "replacement", "enrolled_at"})


@dataclass(frozen=True)
class Entry:
    event: StoredEvent
    title: str
    when: str  # clinical time in the trial's zone
    course_time: str  # "course 1 day 3, 12 days after DLI"
    recorded: str
    grade: str  # "Grade 3 (ASTCT-2019)" or ""
    details: list[tuple[str, str]]
    status: str = ""  # retracted | corrected | ""
    note: str = ""  # what a correction or retraction did
    may_correct: bool = False
    may_retract: bool = False
    classes: list[str] = field(default_factory=list)


def grade_words(data: dict[str, Any]) -> str:
    scale = f" ({data['scale']})" if data.get("scale") else ""
    if data.get("grade") is not None:
        return f"Grade {data['grade']}{scale}"
    if data.get("severity"):
        return f"{str(data['severity']).capitalize()} chronic GVHD{scale}"
    return ""


def value_words(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{field_label(k)} {value_words(v)}" for k, v in value.items())
    return option_words(str(value)) if isinstance(value, str) and "_" in value else str(value)


def details(data: dict[str, Any]) -> list[tuple[str, str]]:
    return [(field_label(k), value_words(v)) for k, v in data.items() if k not in HIDDEN and v is not None]


def entries(history: list[StoredEvent], chart: Chart, local: Any) -> list[Entry]:
    """Every event of the patient's stream in clinical order (ties in recorded order)."""
    retracted = retracted_ids(history)
    corrected = {str(e.data.get("corrects_event_id")) for e in history
                 if e.type == "correction" and str(e.event_id) not in retracted}
    found = []
    for event in sorted(history, key=lambda e: (e.occurred_at, e.position)):
        eid, data = str(event.event_id), event.data
        status = "retracted" if eid in retracted else "corrected" if eid in corrected else ""
        grade, note, title = grade_words(data), "", event_words(event.type)
        shown = details(data)
        if event.type == "correction":
            replacement = dict(data.get("replacement") or {})
            grade = grade_words(replacement)
            shown = details(replacement) + [("Reason", str(data.get("reason", "")))]
            title = f"Correction: {event_words(str(replacement.get('type', '')))}"
            note = f"Replaces entry {str(data.get('corrects_event_id'))[:8]}"
        elif event.type == "retraction":
            shown = [("Reason", str(data.get("reason", "")))]
            note = f"Takes back entry {str(data.get('retracts_event_id'))[:8]}"
        course_time = chart.clinical_time(event.occurred_at)[0].split(", ", 1)[1:]
        found.append(Entry(
            event=event, title=title, when=local(event.occurred_at),
            course_time=course_time[0] if course_time else "",
            recorded=f"recorded {local(event.recorded_at)} by {event.recorded_by}",
            grade=grade, details=shown, status=status, note=note,
            may_correct=event.type in OBSERVATION_TYPES and status != "retracted",
            may_retract=event.type in OBSERVATION_TYPES | {"correction"} and eid not in retracted,
            classes=[event.type, status]))
    return found
