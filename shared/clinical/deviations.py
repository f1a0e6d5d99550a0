"""Protocol deviations: what was done against the protocol file (CONTRACT.md sections 2 and 4).

Rules (bounds come from the protocol's ``cohorts``, ``dosing`` and ``dli``; all inclusive):

- ``eligibility_override``: the patient was enrolled with an eligibility override.
- Blinatumomab + DLI arm:
  - ``dose_off_schedule``: a dose more than ``tolerance_pct`` away from every dose on schedule for
    that course and day (``CohortPlan.doses_for``: the cohort's schedule, and for course 2 also its
    ``later_course_schedule``); ``dose_unscheduled_day``: no dose is scheduled on that ``day``.
  - ``course_too_long``: a dose with ``day`` above ``max_course_days``, flagged at once (cause: the
    first such dose).
  - ``course_too_short``: a finished course (``treatment.py``) whose highest ``day`` is below
    ``min_course_days``; not flagged if the patient died or withdrew before it finished (cause: the
    course's last dose).
  - ``dli_without_course1``: a DLI with no course-1 dose before it.
  - ``dli_cell_dose``: a DLI outside [``min_mnc_per_kg``, ``max_mnc_per_kg``].
  - ``second_course_without_dli``: course 2 started with no DLI before it.
  - ``second_course_timing``: course 2's day 1 outside [DLI day + ``second_course_min_months``,
    DLI day + ``second_course_max_months``] calendar months (``add_months``), from the latest DLI
    before course 2.
- Usual-care arm: ``usual_care_blinatumomab`` for each blinatumomab dose, ``usual_care_dli`` for
  each DLI (nothing else about dosing is checked for them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared.clinical.chart import Chart
from shared.clinical.history import Fact
from shared.clinical.treatment import Course
from shared.protocol import add_months

# Deviations judged from what has not been recorded (yet): they wait for the record to settle
# (protocol ``entry``) before they are alerted.
BY_ABSENCE = frozenset({"course_too_short", "dli_without_course1", "second_course_without_dli"})

EXCLUSIONS = ("severe_infection", "gvhd_grade_2_to_4", "organ_failure", "cns_leukemia", "drug_allergy")


@dataclass(frozen=True)
class Deviation:
    code: str
    detail: str
    cause: Fact
    related: tuple[Fact, ...] = ()
    facts: Mapping[str, Any] = field(default_factory=dict)
    # What makes it the same deviation as the history grows: by default its cause event; a course's
    # deviations are the course's, so entering more of its doses keeps one alert, not a new one
    # (and a withdrawal) per dose.
    about: str = ""

    @property
    def key(self) -> str:
        return self.about or str(self.cause.event_id)

    def public(self) -> dict[str, str]:
        return {"code": self.code, "detail": self.detail, "event_id": str(self.cause.event_id)}


def find_deviations(chart: Chart) -> tuple[Deviation, ...]:
    found = _eligibility(chart)
    if chart.treated:
        found += _doses(chart) + _course_lengths(chart) + _dlis(chart) + _second_course(chart)
    else:
        found += _usual_care(chart)
    return tuple(sorted(found, key=lambda d: (d.cause.order, d.code)))


def pending_deviation_times(chart: Chart) -> list[datetime]:
    """Moments after ``now`` at which a course finishes too short (a deviation by time alone)."""
    if not chart.treated:
        return []
    return [
        at for c in chart.treatment.courses
        if _too_short_once_finished(chart, c) and (at := chart.treatment.finished_at(c)) > chart.now
    ]


def _eligibility(chart: Chart) -> list[Deviation]:
    enrolled, override = chart.enrolment, chart.enrolment.eligibility_override
    if not override:
        return []
    failed = [name for name in EXCLUSIONS if enrolled.eligibility.get(name)]
    if enrolled.eligibility.get("stable_vital_signs") is False:
        failed.insert(0, "unstable vital signs")
    if enrolled.age_years > chart.protocol.trial.max_age_years:
        failed.insert(0, f"age {enrolled.age_years:g} > {chart.protocol.trial.max_age_years:g}")
    approval = f"override approved by {override.get('approved_by')}: {override.get('reason')}"
    detail = (f"enrolled despite failed eligibility ({', '.join(failed)}); {approval}" if failed else
              f"enrolled with an eligibility override although every criterion recorded was met; {approval}")
    return [Deviation("eligibility_override", detail, enrolled.fact, facts={"failed": failed})]


def _doses(chart: Chart) -> list[Deviation]:
    found = []
    tolerance = chart.protocol.dosing.tolerance_pct
    plan = chart.plan
    for dose in chart.treatment.doses:
        course, day, given = int(dose.data["course"]), int(dose.data["day"]), float(dose.data["dose_ug"])
        scheduled = plan.doses_for(course, day)
        if scheduled and not all(abs(given - s) > s * tolerance / 100 * (1 + 1e-9) for s in scheduled):
            continue  # on schedule, the usual case
        where = f"course {course} day {day}"
        numbers = {"course": course, "day": day, "dose_ug": given,
                   "scheduled_ug": scheduled[0] if len(scheduled) == 1 else scheduled or None}
        if not scheduled:
            found.append(Deviation("dose_unscheduled_day", f"{where}: {given:g} µg given, no dose is "
                                   f"scheduled on that day for the {chart.plan.label} cohort", dose,
                                   facts=numbers))
        else:
            expected = " or ".join(f"{s:g} µg" for s in scheduled)
            found.append(Deviation("dose_off_schedule", f"{where}: {given:g} µg given, {expected} "
                                   f"scheduled for the {chart.plan.label} cohort (tolerance "
                                   f"±{tolerance:g}%)", dose, facts=numbers | {"tolerance_pct": tolerance}))
    return found


def _course_lengths(chart: Chart) -> list[Deviation]:
    plan, found = chart.plan, []
    for course in chart.treatment.courses:
        beyond = [d for d in course.doses if int(d.data["day"]) > plan.max_course_days]
        numbers = {"course": course.number, "length_days": course.length,
                   "min_course_days": plan.min_course_days, "max_course_days": plan.max_course_days}
        if beyond:
            found.append(Deviation("course_too_long", f"course {course.number} dosed on day "
                                   f"{beyond[0].data['day']}; the {plan.label} cohort allows "
                                   f"{plan.min_course_days}-{plan.max_course_days} days", beyond[0],
                                   facts=numbers, about=f"course {course.number}"))
        if _too_short_once_finished(chart, course) and chart.now >= chart.treatment.finished_at(course):
            found.append(Deviation("course_too_short", f"course {course.number} ended after day "
                                   f"{course.length}; the {plan.label} cohort needs "
                                   f"{plan.min_course_days}-{plan.max_course_days} days",
                                   course.last_dose, facts=numbers, about=f"course {course.number}"))
    return found


def _too_short_once_finished(chart: Chart, course: Course) -> bool:
    left = chart.left
    left_during = left is not None and left.occurred_at < chart.treatment.finished_at(course)
    return course.length < chart.plan.min_course_days and not left_during


def _dlis(chart: Chart) -> list[Deviation]:
    plan, course1, found = chart.protocol.dli, chart.treatment.course(1), []
    for dli in chart.treatment.dlis:
        mnc = float(dli.data["mnc_per_kg"])
        if course1 is None or course1.first_dose.occurred_at >= dli.occurred_at:
            found.append(Deviation("dli_without_course1", f"DLI on {dli.day} with no course-1 "
                                   "blinatumomab dose before it", dli))
        if not plan.min_mnc_per_kg <= mnc <= plan.max_mnc_per_kg:
            found.append(Deviation("dli_cell_dose", f"DLI of {cells(mnc)} MNC/kg on {dli.day}, outside "
                                   f"{cells(plan.min_mnc_per_kg)}-{cells(plan.max_mnc_per_kg)}/kg", dli,
                                   facts={"mnc_per_kg": mnc, "min_mnc_per_kg": plan.min_mnc_per_kg,
                                          "max_mnc_per_kg": plan.max_mnc_per_kg}))
    return found


def _second_course(chart: Chart) -> list[Deviation]:
    course2 = chart.treatment.course(2)
    if course2 is None:
        return []
    start = course2.first_dose
    dli = max((d for d in chart.treatment.dlis if d.occurred_at < start.occurred_at),
              key=lambda d: d.order, default=None)
    if dli is None:
        return [Deviation("second_course_without_dli", f"course 2 started on {start.day} with no "
                          "DLI before it", start, about="course 2")]
    plan = chart.protocol.dli
    earliest = add_months(dli.day, plan.second_course_min_months)
    latest = add_months(dli.day, plan.second_course_max_months)
    if earliest <= start.day <= latest:
        return []
    detail = (f"course 2 started on {start.day}, {(start.day - dli.day).days} days after the DLI on "
              f"{dli.day}; the protocol allows {earliest} to {latest} "
              f"({plan.second_course_min_months}-{plan.second_course_max_months} months after the DLI)")
    return [Deviation("second_course_timing", detail, start, related=(dli,), about="course 2",
                      facts={"course2_day1": start.day.isoformat(), "dli_date": dli.day.isoformat(),
                             "earliest": earliest.isoformat(), "latest": latest.isoformat()})]


def _usual_care(chart: Chart) -> list[Deviation]:
    doses = [Deviation("usual_care_blinatumomab", f"blinatumomab {d.data['dose_ug']:g} µg recorded on "
                       f"{d.day} for a usual-care patient", d) for d in chart.treatment.doses]
    dlis = [Deviation("usual_care_dli", f"DLI recorded on {d.day} for a usual-care patient", d)
            for d in chart.treatment.dlis]
    return doses + dlis


def cells(count: float) -> str:
    """5e7 -> '5×10^7'; 1.01e8 -> '1.01×10^8'."""
    mantissa, exponent = f"{count:.3e}".split("e")
    return f"{float(mantissa):g}×10^{int(exponent)}"
