"""Incidence endpoints and the patient's outcome at a data cutoff (CONTRACT.md sections 3 and 4).

Rules:

- 2-week incidences (window ``day14``): CRS any grade (grade 0 = no CRS) and grade >= 3; ICANS any
  grade; infection any grade and grade >= 3; haematological AE grade >= 3 = a lab of CTCAE grade >= 3.
  A death caused by CRS or by infection is that event at grade 5 (ASTCT 2019: "grade 5 = death due
  to CRS"; CTCAE v5: "G5 death related to AE"), so it counts even when no grade was recorded. (A
  GVHD death is not counted as acute GVHD: the death's cause does not say acute or chronic.)
- 100-day incidences (window ``day100``): acute GVHD any grade (grade >= 1) and grade III-IV;
  chronic GVHD of any severity; ``nrm_100d`` = a death not caused by relapse.
- An endpoint is ``True`` when its event happened in its window; ``False`` once the window has
  closed without it; ``None`` (not evaluable) while the window is open, when there is no anchor, or
  when the patient died or withdrew before the window closed without the event -- unless the rule
  counts such patients (``count_dead`` / ``count_withdrawn``): then ``False``. The first of death
  and withdrawal decides which flag applies.
- Outcome (``PatientOutcome``): origin = course-1 day 1 (usual care, or no dose yet: the enrolment
  day); last contact = the latest day of any effective event incl. enrolment (the death day if
  dead); relapse = the first relapse on or after origin; aGVHD onsets = the first acute GVHD of
  grade >= 1 / >= 2 at or after the first DLI; chronic GVHD severity = the worst NIH 2014 global
  severity recorded, at any time (chronic GVHD mostly begins after day 100, so it is not limited to
  the 100-day window); each endpoint is evaluated with the evaluability flags of the protocol's
  stopping rule on it, if any (so the report and the rule agree).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from shared.clinical.cgvhd_severity import SEVERITIES
from shared.clinical.chart import Chart
from shared.clinical.history import Fact
from shared.clinical.records import ENDPOINT_NAMES, PatientOutcome


def _acute(f: Fact) -> bool:
    return f.type == "gvhd" and f.data.get("form") == "acute"


def _fatal(cause: str) -> Callable[[Fact], bool]:
    """A death from ``cause``: that adverse event at grade 5 (CTCAE; ASTCT: death due to CRS)."""
    return lambda f: f.type == "death" and f.data.get("cause") == cause


def _graded(type_: str, least: int) -> Callable[[Fact], bool]:
    fatal = _fatal(type_)
    return lambda f: (f.type == type_ and f.grade >= least) or fatal(f)


ENDPOINTS: dict[str, tuple[str, Callable[[Fact], bool]]] = {
    "crs_any_2w": ("day14", _graded("crs", 1)),
    "crs_grade_3_plus_2w": ("day14", _graded("crs", 3)),
    "icans_any_2w": ("day14", lambda f: f.type == "icans" and f.grade >= 1),
    "infection_any_2w": ("day14", _graded("infection", 1)),
    "infection_grade_3_plus_2w": ("day14", _graded("infection", 3)),
    "heme_ae_grade_3_plus_2w": ("day14", lambda f: f.type == "lab" and f.grade >= 3),
    "agvhd_any_100d": ("day100", lambda f: _acute(f) and f.grade >= 1),
    "agvhd_grade_3_4_100d": ("day100", lambda f: _acute(f) and f.grade >= 3),
    "cgvhd_any_100d": ("day100", lambda f: f.type == "gvhd" and f.data.get("form") == "chronic"),
    "nrm_100d": ("day100", lambda f: f.type == "death" and f.data.get("cause") != "relapse"),
}


class UnknownEndpointError(KeyError):
    """An endpoint name that is not one of ``ENDPOINT_NAMES``."""


def counts_toward(chart: Chart, fact: Fact) -> list[str]:
    """The endpoints this event is an event of (it matches and falls in the window)."""
    return [name for name, (window, hit) in ENDPOINTS.items()
            if hit(fact) and chart.windows[window].contains(fact.day)]


def endpoint(chart: Chart, name: str, *, count_withdrawn: bool = False,
             count_dead: bool = False) -> bool | None:
    found = endpoint_at(chart, name, count_withdrawn=count_withdrawn, count_dead=count_dead)
    return found[0] if found is not None else None


def endpoint_at(chart: Chart, name: str, *, count_withdrawn: bool = False,
                count_dead: bool = False) -> tuple[bool, datetime] | None:
    """The endpoint's value and the moment the patient became evaluable for it (the event, the
    death or withdrawal that counted, or the window's close); ``None`` while not evaluable."""
    found = endpoint_unless_recorded(chart, name, count_withdrawn=count_withdrawn, count_dead=count_dead)
    if found is None:
        return None
    event, when, counts_from = found
    return (event, when) if counts_from is None or chart.now >= counts_from else None


def endpoint_unless_recorded(chart: Chart, name: str, *, count_withdrawn: bool = False,
                             count_dead: bool = False) -> tuple[bool, datetime, datetime | None] | None:
    """What the endpoint will be if nothing more is recorded: (event, evaluable at, counts from).

    ``counts from`` is None when the value holds already, or the window's close when only time
    has to pass (the stopping rules' read model keeps it, so no clock is frozen into the row).
    """
    if name not in ENDPOINTS:
        raise UnknownEndpointError(name)
    window_name, hit = ENDPOINTS[name]
    window = chart.windows[window_name]
    if window.closes_at is None:
        return None
    event = next((f for f in chart.facts if hit(f) and window.contains(f.day)), None)
    if event is not None:
        return True, event.occurred_at, None
    left = chart.left
    if left is not None and left.occurred_at < window.closes_at:
        counted = count_dead if left.type == "death" else count_withdrawn
        return (False, left.occurred_at, None) if counted else None
    return False, window.closes_at, window.closes_at


def outcome(chart: Chart) -> PatientOutcome:
    enrolled, treatment = chart.enrolment, chart.treatment
    course1, dli, death = treatment.course(1), treatment.first_dli, chart.death
    origin = course1.first_dose.day if chart.treated and course1 else enrolled.fact.day
    relapse = next((f.day for f in chart.of_type("relapse") if f.day >= origin), None)
    acute_after_dli = [f for f in chart.facts if _acute(f) and dli and f.occurred_at >= dli.occurred_at]
    return PatientOutcome(
        subject_id=enrolled.subject_id,
        site_id=enrolled.site_id,
        arm=enrolled.arm,
        cohort=enrolled.cohort,
        enrolled_at=enrolled.fact.occurred_at,
        origin=origin,
        last_contact=death.day if death else max([enrolled.fact.day, *(f.day for f in chart.facts)]),
        death_date=death.day if death else None,
        death_cause=str(death.data.get("cause")) if death else None,
        relapse_date=relapse,
        withdrawn_date=chart.withdrawal.day if chart.withdrawal else None,
        courses=len(treatment.courses),
        doses=len(treatment.doses),
        dlis=len(treatment.dlis),
        dli_date=dli.day if dli else None,
        agvhd_onset=next((f.day for f in acute_after_dli if f.grade >= 1), None),
        agvhd_2_4_onset=next((f.day for f in acute_after_dli if f.grade >= 2), None),
        cgvhd_severity=_worst_cgvhd(chart),
        endpoints={name: endpoint(chart, name, **_counting(chart, name)) for name in ENDPOINT_NAMES},
    )


def _worst_cgvhd(chart: Chart) -> str | None:
    found = {str(f.data.get("severity")) for f in chart.of_type("gvhd") if f.data.get("form") == "chronic"}
    return next((s for s in reversed(SEVERITIES) if s in found), None)


def _counting(chart: Chart, name: str) -> dict[str, bool]:
    """The stopping rule's evaluability flags for an endpoint it monitors; the defaults otherwise."""
    rule = next((r for r in chart.protocol.stopping_rules if r.endpoint == name), None)
    if rule is None:
        return {}
    return {"count_withdrawn": rule.count_withdrawn, "count_dead": rule.count_dead}
