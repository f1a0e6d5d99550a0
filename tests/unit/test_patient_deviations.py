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


# ---------------------------------------------------------------------------- what each alert says

def facts_of(state, code: str) -> dict:
    [alert] = [a for a in state.desired_alerts() if a.facts.get("code") == code]
    return {k: v for k, v in alert.facts.items() if k not in ("occurred_at", "recorded_at")}


def test_a_dose_deviation_carries_the_dose_and_what_was_scheduled():
    h = History()
    h.dose(1, 5, at(day(5)), dose_ug=12.0)
    facts = facts_of(h.fold(at(day(5), 12)), "dose_off_schedule")
    assert {k: facts[k] for k in ("course", "day", "dose_ug", "scheduled_ug", "tolerance_pct")} == {
        "course": 1, "day": 5, "dose_ug": 12.0, "scheduled_ug": 11.66, "tolerance_pct": 1.0}


def test_a_course_2_dose_off_both_schedules_names_both():
    h = History()
    h.course(1, DAY1, 10)
    h.dli(at(DLI_DAY))
    h.dose(2, 1, at(date(2025, 4, 25)), dose_ug=20.0)
    state = h.fold(at(date(2025, 4, 25), 12))
    assert facts_of(state, "dose_off_schedule")["scheduled_ug"] == [9.0, 28.0]
    [deviation] = state.public()["deviations"]
    assert "20 µg given, 9 µg or 28 µg scheduled for the Hematologic relapse cohort (tolerance ±1%)" in deviation["detail"]


def test_an_unscheduled_day_carries_no_scheduled_dose():
    h = History(cohort="mrd_positive")
    h.dose(1, 5, at(day(5)), dose_ug=28.0)
    state = fold_patient(h.events, with_a_break(range(5, 8)), now=at(day(5), 12))
    facts = facts_of(state, "dose_unscheduled_day")
    assert (facts["course"], facts["day"], facts["dose_ug"], facts["scheduled_ug"]) == (1, 5, 28.0, None)


def test_the_tolerance_is_a_percentage_of_the_scheduled_dose():
    data = PROTOCOL.model_dump()
    data["dosing"]["tolerance_pct"] = 2.0
    two_percent = Protocol.model_validate(data)
    for dose_ug, deviates in ((28.56, False), (28.57, True), (27.44, False), (27.43, True)):
        h = History(cohort="mrd_positive")
        h.dose(1, 1, at(day(1)), dose_ug=dose_ug)
        codes = deviation_codes(fold_patient(h.events, two_percent, now=at(day(1), 12)))
        assert (codes == ["dose_off_schedule"]) is deviates, dose_ug


def test_course_length_deviations_carry_the_course_and_its_bounds():
    long_course, short_course = History(cohort="mrd_positive"), History()
    long_course.course(1, DAY1, 16)
    short_course.course(1, DAY1, 7)
    short_course.dli(at(DLI_DAY))
    expected = {"course": 1, "min_course_days": 5, "max_course_days": 15}
    too_long = facts_of(long_course.fold(at(day(16), 12)), "course_too_long")
    assert too_long | expected == too_long
    too_short = facts_of(short_course.fold(at(DLI_DAY, 12)), "course_too_short")
    assert too_short | {"course": 1, "length_days": 7, "min_course_days": 8, "max_course_days": 21} == too_short
    detail = short_course.fold(at(DLI_DAY, 12)).public()["deviations"][0]["detail"]
    assert detail == "course 1 ended after day 7; the Hematologic relapse cohort needs 8-21 days"
    long_detail = long_course.fold(at(day(16), 12)).public()["deviations"][0]["detail"]
    assert long_detail == "course 1 dosed on day 16; the MRD-positive cohort allows 5-15 days"


def test_one_too_long_alert_per_course_whatever_the_doses_entered():
    h = History(cohort="mrd_positive")
    h.course(1, DAY1, 17)
    state = h.fold(at(day(17), 12))
    [alert] = [a for a in state.desired_alerts() if a.facts.get("code") == "course_too_long"]
    assert alert.alert_id == alert_id_for(h.subject_id, "protocol_deviation", "course_too_long|course 1")


def test_a_dli_cell_dose_deviation_carries_the_dose_and_the_range():
    h = History()
    h.course(1, DAY1, 10)
    h.dli(at(DLI_DAY), 4.9e7)
    state = h.fold(at(DLI_DAY, 12))
    facts = facts_of(state, "dli_cell_dose")
    assert {k: facts[k] for k in ("mnc_per_kg", "min_mnc_per_kg", "max_mnc_per_kg")} == {
        "mnc_per_kg": 4.9e7, "min_mnc_per_kg": 5e7, "max_mnc_per_kg": 1e8}
    assert state.public()["deviations"][0]["detail"] == (
        f"DLI of 4.9×10^7 MNC/kg on {DLI_DAY}, outside 5×10^7-1×10^8/kg")


def test_a_dli_without_course_1_says_so():
    h = History()
    h.dli(at(DLI_DAY))
    [deviation] = h.fold(at(DLI_DAY, 12)).public()["deviations"]
    assert deviation["detail"] == f"DLI on {DLI_DAY} with no course-1 blinatumomab dose before it"


def test_a_late_second_course_names_the_dli_and_the_allowed_dates():
    h = History()
    h.course(1, DAY1, 10)
    dli = h.dli(at(DLI_DAY))
    start = h.course(2, date(2025, 5, 21), 10)[0]
    state = h.fold(at(date(2025, 6, 1)))
    [alert] = [a for a in state.desired_alerts() if a.facts.get("code") == "second_course_timing"]
    assert alert.cause_event_ids == (start.event_id, dli.event_id)
    assert alert.alert_id == alert_id_for(h.subject_id, "protocol_deviation", "second_course_timing|course 2")
    assert {k: alert.facts[k] for k in ("course2_day1", "dli_date", "earliest", "latest")} == {
        "course2_day1": "2025-05-21", "dli_date": "2025-03-20", "earliest": "2025-04-20", "latest": "2025-05-20"}
    assert state.public()["deviations"][0]["detail"] == (
        "course 2 started on 2025-05-21, 62 days after the DLI on 2025-03-20; the protocol allows "
        "2025-04-20 to 2025-05-20 (1-2 months after the DLI)")


def test_the_second_course_is_timed_from_the_latest_dli_before_it():
    h = History()
    h.course(1, DAY1, 10)
    h.dli(at(DLI_DAY))
    h.dli(at(date(2025, 4, 10)))  # a second DLI: course 2 on 2025-05-21 is within 2 months of it
    h.course(2, date(2025, 5, 21), 10)
    assert "second_course_timing" not in deviation_codes(h.fold(at(date(2025, 6, 1))))


def test_a_second_course_without_a_dli_says_so_and_is_one_alert_for_the_course():
    h = History()
    h.course(1, DAY1, 10)
    h.course(2, date(2025, 4, 20), 10)
    state = h.fold(at(date(2025, 4, 30)))
    [alert] = [a for a in state.desired_alerts() if a.facts.get("code") == "second_course_without_dli"]
    assert alert.alert_id == alert_id_for(h.subject_id, "protocol_deviation", "second_course_without_dli|course 2")
    assert state.public()["deviations"][-1]["detail"] == "course 2 started on 2025-04-20 with no DLI before it"


def test_an_override_names_every_failed_criterion_in_order():
    h = History(age_years=70, override={"reason": "compassionate use", "approved_by": "PI Wang"})
    h.enrolment.data["eligibility"] = {**h.enrolment.data["eligibility"], "stable_vital_signs": False,
                                       "severe_infection": True, "cns_leukemia": True}
    state = h.fold(at(date(2025, 3, 4)))
    [deviation] = state.public()["deviations"]
    assert deviation["code"] == "eligibility_override"
    assert deviation["detail"] == (
        "enrolled despite failed eligibility (age 70 > 65, unstable vital signs, severe_infection, "
        "cns_leukemia); override approved by PI Wang: compassionate use")
    assert facts_of(state, "eligibility_override")["failed"] == [
        "age 70 > 65", "unstable vital signs", "severe_infection", "cns_leukemia"]


def test_a_usual_care_patient_enrolled_by_override_and_dosed_has_both_deviations():
    h = History(arm="usual_care", override={"reason": "r", "approved_by": "PI"})
    h.dose(1, 1, at(DAY1), dose_ug=9.0)
    h.dli(at(DLI_DAY))
    state = h.fold(at(DLI_DAY, 12))
    assert deviation_codes(state) == ["eligibility_override", "usual_care_blinatumomab", "usual_care_dli"]
    details = [d["detail"] for d in state.public()["deviations"]]
    assert f"blinatumomab 9 µg recorded on {DAY1} for a usual-care patient" in details
    assert f"DLI recorded on {DLI_DAY} for a usual-care patient" in details


def test_leaving_exactly_when_a_short_course_finishes_does_not_excuse_it():
    at_the_end, just_before = History(), History()
    for h in (at_the_end, just_before):
        last = h.course(1, DAY1, 5)[-1]
    finished = last.occurred_at + timedelta(days=7)
    at_the_end.death(finished, cause="crs")
    just_before.death(finished - timedelta(seconds=1), cause="crs")
    assert "course_too_short" in deviation_codes(at_the_end.fold(at(day(30))))
    assert "course_too_short" not in deviation_codes(just_before.fold(at(day(30))))


def test_a_course_finishing_now_is_judged_now_not_scheduled_for_later():
    h = History()
    last = h.course(1, DAY1, 5)[-1]
    finished = last.occurred_at + timedelta(days=7)
    before = h.fold(finished - timedelta(seconds=1))
    assert before.next_due_at() == finished
    assert h.fold(finished).next_due_at() != finished
