"""The bulkhead's alert: a patient whose record cannot be evaluated is set aside, loudly.

Pure. A patient whose evaluation raises is not monitored until the record is fixed; every other
patient goes on. The investigators must hear of it at once (``urgent``), once per episode: the
alert id is the patient's, so a second failure of the same patient adds nothing, and the first
evaluation that succeeds again withdraws it (the patient's desired alerts do not include it).
"""

from __future__ import annotations

import re

from shared.events import AlertRaised, alert_id_for

KIND = "patient_evaluation_failed"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str, limit: int = 1000) -> str:
    """The error as text any store and any mail takes: no control characters, bounded."""
    return _CONTROL.sub("?", text)[:limit]


def evaluation_failed_alert(subject_id: str, site_id: str | None, error: str) -> AlertRaised:
    return AlertRaised(
        alert_id=alert_id_for("evaluation_failed", subject_id),
        kind=KIND,
        severity="urgent",
        subject_id=subject_id,
        site_id=site_id,
        title=f"Safety monitoring suspended for {subject_id}: the record cannot be evaluated",
        detail=(f"Evaluating the recorded history of {subject_id} failed ({printable(error, 300)}). "
                "No alert is raised for this patient and the stopping rules cannot count it until "
                "the record is fixed; every other patient is still monitored."),
        action=("Review this patient's latest entries and correct or retract the one that cannot be "
                "evaluated; until then assess the patient's safety by hand. The operator finds the "
                "error in the safety service's log and in the patient_failures table."),
        rule="bulkhead",
        facts={"error": printable(error, 300)},
    )
