"""The alerts a patient's effective history justifies now (CONTRACT.md section 4; protocol ``alerts``).

Rules:

- One alert per effective event that qualifies, keyed by its original ``event_id`` and its grade
  or severity (so a correction of the time alone keeps the alert id; one that changes the grade or
  the kind withdraws it and raises another, whose mail says the new grade):
  - CRS (ASTCT, DOMAIN.md a): grade >= 3 -> ``crs_grade_3_plus``; 1-2 -> ``crs_low_grade``; 0 = no CRS.
  - ICANS (ASTCT, DOMAIN.md a): grade >= 3 -> ``icans_grade_3_plus``; 1-2 -> ``icans_low_grade``;
    0 = no ICANS. The action counts the patient's seizures up to this event (label: discontinue
    permanently if more than one seizure occurs; a prolonged or repetitive one is more than one).
  - Acute GVHD (MAGIC, DOMAIN.md b): III-IV -> ``agvhd_grade_3_4``; I-II -> ``agvhd_grade_1_2``;
    chronic GVHD (NIH, DOMAIN.md c), any severity -> ``cgvhd``.
  - Infection (CTCAE, DOMAIN.md d): grade >= 4 -> ``infection_grade_4_plus``; 3 -> ``infection_grade_3``.
  - Lab of CTCAE grade >= 3 -> ``heme_ae_grade_3_plus``.
  - ``death``, ``relapse``, ``withdrawal``: each such event.
- One ``protocol_deviation`` per deviation (``deviations.py``), keyed by code and what it is about
  (its cause event, or the course for a course's deviations).
- ``assessment_overdue`` per timepoint whose assessment is overdue (``windows.py``), keyed by the
  timepoint; it cites the anchor event.
- Alerts on something *missing* (``by_absence``: an overdue assessment, a deviation in
  ``BY_ABSENCE``) are not *raised* until the patient's record has been quiet for the protocol's
  ``entry.settle_seconds`` (``Chart.settled``; ``PatientState.held_alert_ids``): a late history
  entered event by event would otherwise raise them and withdraw them a moment later. One that is
  open stays open meanwhile, and a withdrawal is never held. Everything else is raised at once.
- Severity is ``protocol.severity(kind)``; actions follow the label and reporting practice
  (``actions.py``); deaths and grade >= 4 events say to report an SAE within 24 h (DOMAIN.md g).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.clinical import actions
from shared.clinical.chart import Chart
from shared.clinical.deviations import BY_ABSENCE, Deviation
from shared.clinical.endpoints import counts_toward
from shared.clinical.history import Fact
from shared.clinical.wording import (
    ROMAN,
    cgvhd_basis,
    crs_basis,
    deviation_title,
    gvhd_basis,
    icans_basis,
    lab_basis,
    lab_term,
    window_label,
)
from shared.events import AlertRaised, alert_id_for


@dataclass(frozen=True)
class Draft:
    """An alert before its id, severity and cause bookkeeping are filled in."""

    kind: str
    key: str
    title: str
    detail: str
    action: str
    rule: str
    causes: tuple[Fact, ...]
    facts: Mapping[str, Any] = field(default_factory=dict)


def desired_alerts(chart: Chart, deviations: tuple[Deviation, ...]) -> list[AlertRaised]:
    drafts = [d for f in chart.facts if (rule := EVENT_RULES.get(f.type)) and (d := rule(chart, f))]
    drafts += [_deviation(chart, d) for d in deviations]
    drafts += [_overdue(chart, name) for name, w in chart.windows.items()
               if w.is_overdue(chart.of_type("assessment_completed"), chart.left, chart.now)]
    alerts = [_raise(chart, d) for d in drafts]
    return sorted(alerts, key=lambda a: (a.cause_occurred_at, a.kind, str(a.alert_id)))


def by_absence(alert: AlertRaised) -> bool:
    """An alert on something missing: it waits for the record to settle before it is raised."""
    return alert.kind == "assessment_overdue" or (
        alert.kind == "protocol_deviation" and alert.facts.get("code") in BY_ABSENCE)


def _raise(chart: Chart, draft: Draft) -> AlertRaised:
    enrolled = chart.enrolment
    return AlertRaised(
        alert_id=alert_id_for(enrolled.subject_id, draft.kind, draft.key),
        kind=draft.kind,
        severity=chart.protocol.severity(draft.kind),
        subject_id=enrolled.subject_id,
        site_id=enrolled.site_id,
        title=draft.title,
        detail=draft.detail,
        action=draft.action,
        rule=draft.rule,
        cause_event_ids=tuple(dict.fromkeys(i for c in draft.causes for i in c.cause_ids)),
        cause_occurred_at=draft.causes[0].occurred_at,
        cause_recorded_at=max(c.recorded_at for c in draft.causes),
        facts=dict(draft.facts),
    )


def _event(chart: Chart, fact: Fact, kind: str, title: str, finding: str, rule: str, why: str,
           action: str, numbers: Mapping[str, Any]) -> Draft:
    """An alert about one clinical event: when it happened, what was found, which rule fired."""
    when, timing = chart.clinical_time(fact.occurred_at)
    toward = counts_toward(chart, fact)
    detail = f"{title} on {when}: {finding}. Rule {rule}: {why}."
    if toward:
        detail += f" Counts toward {', '.join(_with_rules(chart, toward))}."
    facts = {**numbers, **timing, "counts_toward": toward}
    return Draft(kind, _event_key(fact, numbers), title, detail, action, rule, (fact,), facts)


def _event_key(fact: Fact, numbers: Mapping[str, Any]) -> str:
    """The event, and its grade (or severity) where it has one: a correction from grade 3 to 4
    withdraws the grade-3 alert and raises a grade-4 one, so investigators learn of the change."""
    for name in ("grade", "severity"):
        if name in numbers:
            return f"{fact.event_id}|{name} {numbers[name]}"
    return str(fact.event_id)


def _with_rules(chart: Chart, endpoints: list[str]) -> list[str]:
    rules = {r.endpoint: r.id for r in chart.protocol.stopping_rules}
    return [f"{e} (stopping rule {rules[e]})" if e in rules else e for e in endpoints]


def _crs(chart: Chart, f: Fact) -> Draft | None:
    g, weight = f.grade, chart.enrolment.weight_kg
    if g < 1:
        return None
    if g >= 3:
        return _event(chart, f, "crs_grade_3_plus", f"Grade {g} CRS", crs_basis(f), "crs_grade>=3",
                      "CRS of grade 3 or more is urgent", actions.crs(g, weight), {"grade": g})
    return _event(chart, f, "crs_low_grade", f"Grade {g} CRS", crs_basis(f), "crs_grade_1-2",
                  "CRS of grade 1-2 is reported for information", actions.crs(g, weight), {"grade": g})


def _icans(chart: Chart, f: Fact) -> Draft | None:
    g = f.grade
    if g < 1:
        return None
    dose = chart.treatment.last_dose_before(f.occurred_at)
    running = chart.treatment.running_at(f.occurred_at)
    dose_ug = float(dose.data["dose_ug"]) if dose is not None and running is not None else None
    seizures = _seizures(chart, f)
    action = actions.icans(g, chart.enrolment.weight_kg, dose_ug, seizures)
    finding = icans_basis(f) + (f" on {dose_ug:g} µg/day" if dose_ug else "")
    numbers = {"grade": g, "dose_ug": dose_ug} | ({"seizures": seizures} if seizures else {})
    if g >= 3:
        return _event(chart, f, "icans_grade_3_plus", f"Grade {g} ICANS", finding, "icans_grade>=3",
                      "ICANS of grade 3 or more is urgent", action, numbers)
    return _event(chart, f, "icans_low_grade", f"Grade {g} ICANS", finding, "icans_grade_1-2",
                  "ICANS of grade 1-2 is reported for information", action, numbers)


def _seizures(chart: Chart, f: Fact) -> int:
    """Seizures recorded with ICANS up to and including ``f``: a resolved one counts 1, a prolonged
    or repetitive one 2 (repetitive seizures are more than one; label, DOMAIN.md e)."""
    counts = {"resolved": 1, "prolonged_or_repetitive": 2}
    return sum(counts.get(str(e.data.get("seizure")), 0) for e in chart.of_type("icans") if e.order <= f.order)


def _gvhd(chart: Chart, f: Fact) -> Draft | None:
    if f.data.get("form") == "chronic":
        severity = str(f.data.get("severity"))
        return _event(chart, f, "cgvhd", f"Chronic GVHD ({severity})", cgvhd_basis(f),
                      "cgvhd_any", "chronic GVHD of any severity is reported for information",
                      actions.cgvhd(severity, scored="organ_scores" in f.data), {"severity": severity})
    g = f.grade
    if g < 1:
        return None
    title, numbers = f"Grade {ROMAN[g]} acute GVHD", {"grade": g, "stages": f.data.get("stages")}
    if g >= 3:
        return _event(chart, f, "agvhd_grade_3_4", title, gvhd_basis(f), "agvhd_grade_3-4",
                      "acute GVHD of grade III-IV is urgent", actions.agvhd(g), numbers)
    return _event(chart, f, "agvhd_grade_1_2", title, gvhd_basis(f), "agvhd_grade_1-2",
                  "acute GVHD of grade I-II is reported for information", actions.agvhd_low(g), numbers)


def _infection(chart: Chart, f: Fact) -> Draft | None:
    g, site = f.grade, str(f.data.get("site", ""))
    organism = f.data.get("organism")
    finding = f"CTCAE v5.0 grade {g} infection, site {site}" + (f", {organism}" if organism else "")
    numbers = {"grade": g, "site": site, "organism": organism}
    if g >= 4:
        return _event(chart, f, "infection_grade_4_plus", f"Grade {g} infection ({site})", finding,
                      "infection_grade>=4", "infection of grade 4 or more is urgent",
                      actions.infection(g), numbers)
    if g == 3:
        return _event(chart, f, "infection_grade_3", f"Grade 3 infection ({site})", finding,
                      "infection_grade_3", "grade 3 infection is reported for information",
                      actions.infection(g), numbers)
    return None


def _lab(chart: Chart, f: Fact) -> Draft | None:
    g = f.grade
    if g < 3:
        return None
    numbers = {"grade": g, "test": f.data.get("test"), "value": f.data.get("value"),
               "unit": f.data.get("unit"), "lln": f.data.get("lln")}
    return _event(chart, f, "heme_ae_grade_3_plus", f"Grade {g} {lab_term(f)}", lab_basis(f),
                  "lab_ctcae_grade>=3", "a haematological adverse event of CTCAE grade 3 or more is "
                  "reported for information", actions.heme(g), numbers)


def _death(chart: Chart, f: Fact) -> Draft:
    cause = str(f.data.get("cause"))
    return _event(chart, f, "death", "Death", f"death, cause: {cause}", "death_any",
                  "every death is urgent", actions.death(), {"cause": cause})


def _relapse(chart: Chart, f: Fact) -> Draft:
    return _event(chart, f, "relapse", "Relapse", "relapse recorded", "relapse_any",
                  "a relapse is reported for information", actions.relapse(), {})


def _withdrawal(chart: Chart, f: Fact) -> Draft:
    reason = str(f.data.get("reason", ""))
    return _event(chart, f, "withdrawal", "Withdrawal from the study", f"withdrawn: {reason}",
                  "withdrawal_any", "a withdrawal is reported for information", actions.withdrawal(),
                  {"reason": reason})


EVENT_RULES: dict[str, Callable[[Chart, Fact], Draft | None]] = {
    "crs": _crs, "icans": _icans, "gvhd": _gvhd, "infection": _infection, "lab": _lab,
    "death": _death, "relapse": _relapse, "withdrawal": _withdrawal,
}


def _deviation(chart: Chart, d: Deviation) -> Draft:
    when, timing = chart.clinical_time(d.cause.occurred_at)
    detail = f"Protocol deviation {d.code} ({when}): {d.detail}."
    return Draft("protocol_deviation", f"{d.code}|{d.key}", deviation_title(d.code),
                 detail, actions.deviation(d.code), f"deviation:{d.code}", (d.cause, *d.related),
                 {"code": d.code, **d.facts, **timing})


def _overdue(chart: Chart, name: str) -> Draft:
    window = chart.windows[name]
    anchor = window.anchor_fact
    assert anchor is not None and window.due is not None and window.overdue_from is not None
    label = window_label(name)
    detail = (f"The {label} assessment was due by {window.due} (window {window.start} to {window.end} "
              f"+ {window.grace_days} days grace, trial zone {chart.protocol.trial.timezone}); none "
              f"was recorded before {window.overdue_from.isoformat()}. Rule assessment_overdue: an "
              "anchored window whose assessment is past due is a high-priority alert.")
    return Draft("assessment_overdue", name, f"{label.capitalize()} assessment overdue", detail,
                 actions.overdue(label, window.due.isoformat()), f"assessment_overdue:{name}",
                 (anchor,), {"timepoint": name, "anchor": str(window.anchor), "due": window.due.isoformat(),
                             "overdue_from": window.overdue_from.isoformat()})
