"""Protocol deviations, each bound from both sides (bundled protocol: blinatumomab_dli.toml)."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from shared.clinical.patient import fold_patient
from shared.events import alert_id_for
from shared.protocol import Protocol
from tests.unit.patient_history import PROTOCOL, History, at, deviation_codes, kinds

DAY1 = date(2025, 3, 5)
DLI_DAY = date(2025, 3, 20)


def day(n: int) -> date:
    return DAY1 + timedelta(days=n - 1)


# ---------------------------------------------------------------------------- doses


@pytest.mark.parametrize(("day_number", "dose_ug", "deviates"), [
    (5, 11.66, False),
    (5, 11.7, False),  # within 1% of 11.66
    (5, 12.0, True),
    (1, 9.09, False),  # exactly 1% over 9
    (1, 9.1, True),
    (8, 28.0, False),
    (8, 9.0, True),  # the step-up dose on a 28 µg day
])
def test_a_dose_off_the_cohort_schedule_is_a_deviation(day_number, dose_ug, deviates):
    h = History(cohort="hematologic_relapse")
    dose = h.dose(1, day_number, at(day(day_number)), dose_ug=dose_ug)

    state = h.fold(at(day(day_number), 12))

    assert (deviation_codes(state) == ["dose_off_schedule"]) is deviates
    if deviates:
        deviation = state.public()["deviations"][0]
        assert deviation["event_id"] == str(dose.event_id)
        assert f"{dose_ug:g} µg given" in deviation["detail"]


@pytest.mark.parametrize(("day_number", "scheduled"), [(1, 9.0), (5, 11.66), (8, 28.0)])
def test_the_dose_tolerance_is_1_percent_on_either_side_not_a_hair_more(day_number, scheduled):
    # Exactly 1% over and under is on schedule; 1.001% either way is not (1% cannot become 1.1%).
    def deviates(dose_ug: float) -> bool:
        h = History()
        h.dose(1, day_number, at(day(day_number)), dose_ug=dose_ug)
        return deviation_codes(h.fold(at(day(day_number), 12))) == ["dose_off_schedule"]

    assert not deviates(scheduled * 1.01) and not deviates(scheduled * 0.99)
    assert deviates(scheduled * 1.01001) and deviates(scheduled * 0.98999)


def with_a_break(days: range) -> Protocol:
    """The bundled protocol, its MRD-positive schedule pausing on ``days`` (a dosing break)."""
    data = PROTOCOL.model_dump()
    data["cohorts"]["mrd_positive"]["schedule"] = [
        {"from_day": 1, "to_day": days.start - 1, "dose_ug": 28.0},
        {"from_day": days.stop, "to_day": 28, "dose_ug": 28.0},
    ]
    return Protocol.model_validate(data)


def test_a_dose_on_a_day_the_schedule_leaves_out_is_an_unscheduled_day():
    protocol = with_a_break(range(5, 8))
    h = History(cohort="mrd_positive")
    h.dose(1, 4, at(day(4)), dose_ug=28.0)  # the edges of the break are on schedule
    stray = h.dose(1, 5, at(day(5)), dose_ug=28.0)
    h.dose(1, 7, at(day(7)), dose_ug=28.0)
    h.dose(1, 8, at(day(8)), dose_ug=28.0)

    state = fold_patient(h.events, protocol, now=at(day(8), 12))

    unscheduled = [d for d in state.public()["deviations"] if d["code"] == "dose_unscheduled_day"]
    assert [d["event_id"] for d in unscheduled] == [str(stray.event_id), str(h.events[3].event_id)]
    assert "dose_off_schedule" not in deviation_codes(state)
    assert unscheduled[0]["detail"] == ("course 1 day 5: 28 µg given, no dose is scheduled on that day "
                                        "for the MRD-positive cohort")
    assert {a.rule for a in state.desired_alerts()} >= {"deviation:dose_unscheduled_day"}


def test_a_deviation_raises_a_high_alert_keyed_by_code_and_cause():
    h = History()
    dose = h.dose(1, 5, at(day(5)), dose_ug=12.0)

    (alert,) = h.fold(at(day(5), 12)).desired_alerts()

    assert alert.kind == "protocol_deviation" and alert.severity == "high"
    assert alert.alert_id == alert_id_for(h.subject_id, "protocol_deviation", f"dose_off_schedule|{dose.event_id}")
    assert alert.rule == "deviation:dose_off_schedule" and alert.cause_event_ids == (dose.event_id,)
    assert "11.66 µg scheduled" in alert.detail


def test_mrd_positive_patients_get_28_ug_from_day_1():
    h = History(cohort="mrd_positive")
    h.dose(1, 1, at(day(1)), dose_ug=9.0)
    h.dose(1, 2, at(day(2)), dose_ug=28.0)
    assert deviation_codes(h.fold(at(day(3)))) == ["dose_off_schedule"]


@pytest.mark.parametrize(("dose_ug", "deviates"), [(9.0, False), (28.0, False), (11.66, True), (20.0, True)])
def test_a_haematologic_relapse_course_2_may_step_up_again_or_start_at_28_ug(dose_ug, deviates):
    # Course 2 day 1: the cohort's step-up (9 µg) or the label's cycle 2 (28 µg from day 1).
    h = History()
    h.course(1, DAY1, 10)
    h.dli(at(DLI_DAY))
    h.dose(2, 1, at(date(2025, 4, 25)), dose_ug=dose_ug)
    assert ("dose_off_schedule" in deviation_codes(h.fold(at(date(2025, 4, 25), 12)))) is deviates


def test_course_1_of_haematologic_relapse_must_step_up():
    h = History()
    h.dose(1, 1, at(day(1)), dose_ug=28.0)
    state = h.fold(at(day(1), 12))
    assert deviation_codes(state) == ["dose_off_schedule"]
    assert "9 µg scheduled" in state.public()["deviations"][0]["detail"]


# ---------------------------------------------------------------------------- course length


def test_a_7_day_hematologic_relapse_course_is_too_short_once_finished_and_8_days_is_not():
    short, enough = History(), History()
    short.course(1, DAY1, 7)
    enough.course(1, DAY1, 8)
    for h in (short, enough):
        h.dli(at(DLI_DAY))  # the DLI finishes course 1
    now = at(DLI_DAY, 12)
    assert deviation_codes(short.fold(now)) == ["course_too_short"]
    assert deviation_codes(enough.fold(now)) == []


def test_a_short_course_is_not_flagged_while_it_may_still_go_on():
    h = History()
    last = h.course(1, DAY1, 7)[-1]
    assert deviation_codes(h.fold(last.occurred_at + timedelta(days=7, seconds=-1))) == []
    assert deviation_codes(h.fold(last.occurred_at + timedelta(days=7))) == ["course_too_short"]


def test_a_short_course_is_not_flagged_when_the_patient_died_during_it():
    h = History()
    h.course(1, DAY1, 5)
    h.death(at(day(6)), cause="crs")
    assert deviation_codes(h.fold(at(day(30)))) == []


def test_a_short_course_is_flagged_when_the_patient_died_after_it_finished():
    h = History()
    h.course(1, DAY1, 5)
    h.death(at(day(20)), cause="infection")
    assert deviation_codes(h.fold(at(day(30)))) == ["course_too_short"]


def test_a_16_day_mrd_course_is_too_long_at_once_and_15_days_is_not():
    too_long, longest = History(cohort="mrd_positive"), History(cohort="mrd_positive")
    sixteen = too_long.course(1, DAY1, 16)
    longest.course(1, DAY1, 15)
    now = at(day(16), 12)  # course still running

    assert deviation_codes(too_long.fold(now)) == ["course_too_long"]
    assert too_long.fold(now).public()["deviations"][0]["event_id"] == str(sixteen[-1].event_id)
    assert deviation_codes(longest.fold(now)) == []


def test_a_4_day_mrd_course_is_too_short():
    h = History(cohort="mrd_positive")
    h.course(1, DAY1, 4)
    h.dli(at(day(6)))
    assert deviation_codes(h.fold(at(day(7)))) == ["course_too_short"]


def test_a_course_entered_late_one_dose_at_a_time_keeps_one_too_short_alert_until_it_is_long_enough():
    # Data entry a month after the course: after each of the first seven doses the course is short
    # (and long finished by the clock). That is one deviation, about the course: the same alert
    # throughout, not a new alert and a withdrawal per dose; the eighth dose ends it.
    h = History()
    h.enter_late(at(day(40)))
    alert_ids = []
    for n in range(1, 9):
        h.dose(1, n, at(day(n)))
        alert_ids.append([a.alert_id for a in h.fold(at(day(40), 12)).desired_alerts()
                          if a.kind == "protocol_deviation"])

    course_1 = alert_id_for(h.subject_id, "protocol_deviation", "course_too_short|course 1")
    assert alert_ids == [[course_1]] * 7 + [[]]


# ---------------------------------------------------------------------------- DLI


@pytest.mark.parametrize(("mnc", "deviates"), [(5e7, False), (4.9e7, True), (1e8, False), (1.01e8, True)])
def test_a_dli_outside_5e7_to_1e8_mnc_per_kg_is_a_deviation(mnc, deviates):
    h = History()
    h.course(1, DAY1, 10)
    h.dli(at(DLI_DAY), mnc)
    codes = deviation_codes(h.fold(at(DLI_DAY, 12)))
    assert (codes == ["dli_cell_dose"]) is deviates


def test_a_dli_at_the_same_moment_as_the_first_dose_has_no_course_1_before_it():
    same, after = History(), History()
    for h in (same, after):
        h.dose(1, 1, at(DAY1, 9))
    same.dli(at(DAY1, 9))
    after.dli(at(DAY1, 9, second=1))
    assert "dli_without_course1" in deviation_codes(same.fold(at(DAY1, 12)))
    assert "dli_without_course1" not in deviation_codes(after.fold(at(DAY1, 12)))


def test_a_second_course_started_at_the_moment_of_the_dli_has_no_dli_before_it():
    h = History()
    h.course(1, DAY1, 10)
    h.dli(at(date(2025, 4, 20), 9))
    h.dose(2, 1, at(date(2025, 4, 20), 9), dose_ug=28.0)
    assert "second_course_without_dli" in deviation_codes(h.fold(at(date(2025, 4, 20), 12)))


def test_a_dli_without_course_1_before_it_is_a_deviation():
    h = History()
    h.dli(at(DLI_DAY))
    assert deviation_codes(h.fold(at(DLI_DAY, 12))) == ["dli_without_course1"]


# ---------------------------------------------------------------------------- second course


@pytest.mark.parametrize(("start", "deviates"), [
    (date(2025, 4, 19), True),  # 1 month - 1 day
    (date(2025, 4, 20), False),  # exactly 1 month
    (date(2025, 5, 20), False),  # exactly 2 months
    (date(2025, 5, 21), True),  # 2 months + 1 day
])
def test_a_second_course_outside_1_to_2_months_after_the_dli_is_a_deviation(start, deviates):
    h = History()
    h.course(1, DAY1, 10)
    h.dli(at(DLI_DAY))
    h.course(2, start, 10)
    codes = deviation_codes(h.fold(at(start + timedelta(days=10))))
    assert (codes == ["second_course_timing"]) is deviates


def test_calendar_months_clamp_at_the_month_end():
    h = History()
    h.course(1, date(2025, 1, 10), 10)
    h.dli(at(date(2025, 1, 31)))
    h.course(2, date(2025, 2, 28), 10)  # Jan 31 + 1 month = Feb 28
    assert deviation_codes(h.fold(at(date(2025, 3, 10)))) == []


def test_a_second_course_without_a_dli_before_it_is_a_deviation():
    h = History()
    h.course(1, DAY1, 10)
    h.course(2, date(2025, 4, 20), 10)
    assert deviation_codes(h.fold(at(date(2025, 4, 30)))) == ["second_course_without_dli"]


# ---------------------------------------------------------------------------- enrolment and arm


def test_enrolment_with_an_eligibility_override_is_a_deviation():
    h = History(override={"reason": "GVHD grade II resolved on steroids", "approved_by": "PI Wang"})
    (alert,) = h.fold(at(date(2025, 3, 4))).desired_alerts()
    assert alert.kind == "protocol_deviation" and alert.cause_event_ids == (h.enrolment.event_id,)
    assert "approved by PI Wang" in alert.detail
    # This History's patient met every criterion: the alert says so rather than "failed".
    assert "although every criterion recorded was met" in alert.detail and "failed" not in alert.detail


@pytest.mark.parametrize(("age", "over"), [(65, False), (65.5, True), (66, True)])
def test_an_override_names_the_age_only_above_65(age, over):
    h = History(age_years=age, override={"reason": "fit", "approved_by": "PI Wang"})
    (alert,) = h.fold(at(date(2025, 3, 4))).desired_alerts()
    assert (f"age {age:g} > 65" in alert.detail) is over
    assert ("although every criterion recorded was met" in alert.detail) is not over


def test_blinatumomab_or_a_dli_for_a_usual_care_patient_is_a_deviation():
    h = History(arm="usual_care")
    h.dose(1, 1, at(DAY1))
    h.dli(at(DLI_DAY))
    state = h.fold(at(DLI_DAY, 12))
    assert deviation_codes(state) == ["usual_care_blinatumomab", "usual_care_dli"]
    # (their day-14 window anchors on enrolment, 2025-03-03: its assessment is overdue too)
    assert kinds(state) == ["assessment_overdue", "protocol_deviation", "protocol_deviation"]


def test_a_retracted_dose_is_no_deviation():
    h = History()
    wrong = h.dose(1, 5, at(day(5)), dose_ug=12.0)
    h.retract(wrong)
    assert deviation_codes(h.fold(at(day(6)))) == []


def test_a_corrected_dose_is_checked_as_corrected():
    h = History()
    wrong = h.dose(1, 5, at(day(5)), dose_ug=1.166)
    assert deviation_codes(h.fold(at(day(6)))) == ["dose_off_schedule"]
    h.correct(wrong, dose_ug=11.66)
    assert deviation_codes(h.fold(at(day(6)))) == []
