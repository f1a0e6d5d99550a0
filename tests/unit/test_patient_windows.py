"""Windows, assessment deadlines, next checks and endpoint evaluability, in Asia/Shanghai days."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from shared.clinical.endpoints import UnknownEndpointError
from shared.clinical.patient import PatientState
from shared.events import alert_id_for
from tests.unit.patient_history import PROTOCOL, History, at, kinds, midnight, only

DAY1 = date(2025, 3, 5)
DLI_DAY = date(2025, 3, 20)
DAY14_OVERDUE = midnight(DAY1 + timedelta(days=17))  # the midnight starting day 18
DAY100_OVERDUE = midnight(DLI_DAY + timedelta(days=107))  # the midnight starting day 108


def day(n: int) -> date:
    return DAY1 + timedelta(days=n - 1)


def treated(days: int = 10) -> History:
    h = History()
    h.course(1, DAY1, days)
    return h


# ---------------------------------------------------------------------------- window edges


def test_day_1_is_the_trial_zone_day_of_the_first_dose():
    h = History()
    # 2025-03-04 17:30 UTC is 2025-03-05 01:30 in Shanghai: day 1 is the 5th.
    h.dose(1, 1, datetime(2025, 3, 4, 17, 30, tzinfo=UTC))
    window = h.fold(at(day(2))).public()["windows"]["day14"]
    assert window == {"anchor": "2025-03-05", "start": "2025-03-05", "end": "2025-03-18", "due": "2025-03-21",
                      "overdue_from": DAY14_OVERDUE.isoformat(), "status": "open"}


def test_day_14_23_59_local_is_in_the_2_week_window_and_day_15_00_00_is_out():
    inside, outside = treated(), treated()
    # Both written in UTC: 15:59 UTC and 16:00 UTC on the same UTC day (day 14).
    inside.crs(datetime(2025, 3, 18, 15, 59, tzinfo=UTC), 2)
    outside.crs(datetime(2025, 3, 18, 16, 0, tzinfo=UTC), 2)
    now = at(day(20))

    assert inside.fold(now).endpoint("crs_any_2w") is True
    assert outside.fold(now).endpoint("crs_any_2w") is False
    assert only(inside.fold(now), "crs_low_grade").facts["counts_toward"] == ["crs_any_2w"]
    assert only(outside.fold(now), "crs_low_grade").facts["counts_toward"] == []


def test_day_1_is_in_the_2_week_window_and_the_day_before_is_not():
    on_day1, before = History(), History()
    for h in (on_day1, before):
        h.dose(1, 1, at(DAY1, 9))
    on_day1.crs(midnight(DAY1), 2)  # 00:00 on day 1, before the dose: still day 1
    before.crs(at(DAY1 - timedelta(days=1), 23, 59), 2)
    now = at(day(20))
    assert on_day1.fold(now).endpoint("crs_any_2w") is True
    assert before.fold(now).endpoint("crs_any_2w") is False


def test_the_window_opens_at_the_midnight_starting_day_1():
    h = History()
    h.dose(1, 1, at(DAY1, 9))
    assert h.fold(midnight(DAY1) - timedelta(seconds=1)).public()["windows"]["day14"]["status"] == "not_started"
    assert h.fold(midnight(DAY1)).public()["windows"]["day14"]["status"] == "open"


def test_a_patient_who_left_before_any_dose_needs_no_assessment():
    died, waiting = History(), History()
    died.death(at(DAY1))
    windows = died.fold(at(day(30))).public()["windows"]
    assert windows["day14"]["status"] == windows["day100"]["status"] == "not_required"
    assert waiting.fold(at(day(30))).public()["windows"]["day14"]["status"] == "not_started"


def test_gvhd_on_the_dli_day_is_in_the_100_day_window():
    h = treated()
    h.dli(at(DLI_DAY, 14))
    h.agvhd(midnight(DLI_DAY), 3)
    assert h.fold(at(DLI_DAY + timedelta(days=120))).endpoint("agvhd_grade_3_4_100d") is True


def test_an_assessment_on_day_1_counts_for_the_window_and_one_the_day_before_does_not():
    on_day1, before = History(), History()
    on_day1.assessment(midnight(DAY1), "day14")
    before.assessment(at(DAY1 - timedelta(days=1), 23, 59), "day14")
    for h in (on_day1, before):
        h.course(1, DAY1, 10)
    assert on_day1.fold(DAY14_OVERDUE).public()["windows"]["day14"]["status"] == "completed"
    assert "assessment_overdue" not in kinds(on_day1.fold(DAY14_OVERDUE))
    assert before.fold(DAY14_OVERDUE).public()["windows"]["day14"]["status"] == "overdue"
    assert "assessment_overdue" in kinds(before.fold(DAY14_OVERDUE))


def test_the_100_day_window_runs_from_the_dli_day_for_gvhd():
    inside, outside = treated(), treated()
    for h in (inside, outside):
        h.dli(at(DLI_DAY, 14))
    inside.agvhd(at(DLI_DAY + timedelta(days=99), 23, 59), 3)  # day 100
    outside.agvhd(midnight(DLI_DAY + timedelta(days=100)), 3)  # day 101
    now = at(DLI_DAY + timedelta(days=120))
    assert inside.fold(now).endpoint("agvhd_grade_3_4_100d") is True
    assert outside.fold(now).endpoint("agvhd_grade_3_4_100d") is False


def test_window_status_through_its_life():
    h = treated()
    assert h.fold(at(DAY1 - timedelta(days=1))).public()["windows"]["day14"]["status"] == "not_started"
    assert h.fold(at(day(14), 23, 59)).public()["windows"]["day14"]["status"] == "open"
    assert h.fold(midnight(day(15))).public()["windows"]["day14"]["status"] == "awaiting_assessment"
    assert h.fold(DAY14_OVERDUE).public()["windows"]["day14"]["status"] == "overdue"
    h.assessment(at(day(20)), "day14")  # done late: completed, but it was overdue
    assert h.fold(at(day(21))).public()["windows"]["day14"]["status"] == "completed"
    assert h.fold(at(day(21))).public()["windows"]["day100"] == {
        "anchor": None, "start": None, "end": None, "due": None, "overdue_from": None,
        "status": "not_started"}


def test_usual_care_windows_anchor_on_enrolment_and_on_a_dli_if_one_was_given():
    h = History(arm="usual_care", enrolled=date(2025, 3, 3))
    windows = h.fold(at(date(2025, 3, 4))).public()["windows"]
    assert windows["day14"]["anchor"] == windows["day100"]["anchor"] == "2025-03-03"

    h.dli(at(date(2025, 4, 1)))
    assert h.fold(at(date(2025, 4, 2))).public()["windows"]["day100"]["anchor"] == "2025-04-01"


# ---------------------------------------------------------------------------- overdue assessments


def test_day14_assessment_is_overdue_exactly_at_the_deadline_and_not_a_second_before():
    h = treated()
    assert "assessment_overdue" not in kinds(h.fold(DAY14_OVERDUE - timedelta(seconds=1)))

    alert = only(h.fold(DAY14_OVERDUE), "assessment_overdue")

    assert alert.alert_id == alert_id_for(h.subject_id, "assessment_overdue", "day14")
    assert alert.severity == "high" and alert.title == "Day-14 assessment overdue"
    assert alert.cause_event_ids == (h.events[1].event_id,)  # course 1's first dose anchors it
    assert alert.facts["due"] == "2025-03-21"


def test_day100_assessment_is_overdue_from_the_start_of_day_108():
    h = treated()
    h.assessment(at(day(15)), "day14")
    dli = h.dli(at(DLI_DAY))
    assert kinds(h.fold(DAY100_OVERDUE - timedelta(seconds=1))) == []
    alert = only(h.fold(DAY100_OVERDUE), "assessment_overdue")
    assert alert.cause_event_ids == (dli.event_id,) and alert.facts["timepoint"] == "day100"


def test_death_before_the_deadline_means_no_overdue_alert():
    h = treated()
    h.death(at(day(16)), cause="infection")
    state = h.fold(DAY14_OVERDUE + timedelta(days=5))
    assert kinds(state) == ["death"]
    assert state.public()["windows"]["day14"]["status"] == "not_required"


def test_withdrawal_before_the_deadline_means_no_overdue_alert():
    h = treated()
    h.withdrawal(at(day(16)))
    assert kinds(h.fold(DAY14_OVERDUE)) == ["withdrawal"]


@pytest.mark.parametrize("leaves", ["death", "withdrawal"])
def test_leaving_exactly_at_the_overdue_midnight_is_too_late_and_a_second_before_is_not(leaves):
    at_deadline, just_before = treated(), treated()
    getattr(at_deadline, leaves)(DAY14_OVERDUE)
    getattr(just_before, leaves)(DAY14_OVERDUE - timedelta(seconds=1))
    later = DAY14_OVERDUE + timedelta(days=1)

    assert "assessment_overdue" in kinds(at_deadline.fold(later))
    assert at_deadline.fold(later).public()["windows"]["day14"]["status"] == "overdue"
    assert "assessment_overdue" not in kinds(just_before.fold(later))
    assert just_before.fold(later).public()["windows"]["day14"]["status"] == "not_required"


def test_an_assessment_exactly_at_the_overdue_midnight_is_late():
    at_deadline, just_before = treated(), treated()
    at_deadline.assessment(DAY14_OVERDUE, "day14")
    just_before.assessment(DAY14_OVERDUE - timedelta(seconds=1), "day14")
    assert "assessment_overdue" in kinds(at_deadline.fold(DAY14_OVERDUE))
    assert "assessment_overdue" not in kinds(just_before.fold(DAY14_OVERDUE))


def test_death_after_the_deadline_leaves_the_overdue_alert():
    h = treated()
    h.death(at(day(19)), cause="relapse")
    assert kinds(h.fold(at(day(20)))) == ["assessment_overdue", "death"]


def test_a_late_entered_assessment_done_in_time_removes_the_overdue_alert():
    h = treated()
    assert "assessment_overdue" in kinds(h.fold(at(day(25))))

    h.enter_late(at(day(25)))
    late = h.assessment(at(day(17), 16), "day14")  # done on day 17, entered on day 25
    assert late.recorded_at > DAY14_OVERDUE

    assert "assessment_overdue" not in kinds(h.fold(at(day(25))))


SETTLE = timedelta(seconds=PROTOCOL.entry.settle_seconds)


def raised_now(state: PatientState) -> list[str]:
    """The kinds the safety service would raise now (desired and not held)."""
    held = state.held_alert_ids()
    return [a.kind for a in state.desired_alerts() if a.alert_id not in held]


def test_a_late_history_is_judged_for_what_it_lacks_once_its_entry_has_settled():
    # A month later a nurse enters course 1 (day 1 first) and then the day-14 assessment. After the
    # first dose the course looks finished and too short, and the assessment looks overdue: that
    # is only the entry in progress, so neither is raised until the record has been quiet.
    h = History()
    h.enter_late(at(day(40)))
    first = h.dose(1, 1, at(day(1)))
    meanwhile = h.fold(first.recorded_at + timedelta(seconds=1))
    assert kinds(meanwhile) == ["assessment_overdue", "protocol_deviation"]  # what the history says
    assert raised_now(meanwhile) == []  # what is raised: nothing yet
    assert meanwhile.next_due_at() == first.recorded_at + SETTLE

    # Had nothing more come, both are raised once the record settles.
    settled = h.fold(first.recorded_at + SETTLE)
    assert raised_now(settled) == ["assessment_overdue", "protocol_deviation"]

    # The rest arrives within seconds: once settled there is nothing to say.
    for n in range(2, 9):
        h.dose(1, n, at(day(n)))
    last = h.assessment(at(day(15)), "day14")
    assert kinds(h.fold(last.recorded_at + SETTLE)) == []


def test_alerts_on_what_was_recorded_do_not_wait_for_the_entry_to_settle():
    h = History()
    h.enter_late(at(day(40)))
    h.dose(1, 1, at(day(1)), dose_ug=28.0)  # the haematologic-relapse cohort starts at 9 µg
    crs = h.crs(at(day(2)), 3)
    state = h.fold(crs.recorded_at)
    codes = [a.facts.get("code", a.kind) for a in state.desired_alerts() if a.alert_id not in state.held_alert_ids()]
    assert sorted(codes) == ["crs_grade_3_plus", "dose_off_schedule"]


def test_an_assessment_done_after_the_deadline_does_not_remove_the_overdue_alert():
    h = treated()
    h.assessment(DAY14_OVERDUE, "day14")
    assert "assessment_overdue" in kinds(h.fold(at(day(25))))


def test_an_assessment_dated_before_the_window_opened_does_not_count():
    h = History()
    h.assessment(at(day(0)), "day14")  # the day before the first dose
    h.course(1, DAY1, 10)
    state = h.fold(at(day(25)))
    assert "assessment_overdue" in kinds(state)
    assert state.public()["windows"]["day14"]["status"] == "overdue"


def test_an_assessment_of_the_other_timepoint_does_not_count():
    h = treated()
    h.assessment(at(day(16)), "day100")
    assert "assessment_overdue" in kinds(h.fold(DAY14_OVERDUE))


def test_no_anchor_no_overdue_alert():
    h = History()  # enrolled, never dosed
    assert kinds(h.fold(at(date(2026, 1, 1)))) == []


# ---------------------------------------------------------------------------- next due check


def test_next_due_at_is_the_next_assessment_deadline():
    h = treated()
    assert h.fold(at(day(12))).next_due_at() == DAY14_OVERDUE

    h.assessment(at(day(15)), "day14")
    assert h.fold(at(day(16))).next_due_at() is None  # nothing else is pending by time alone

    h.dli(at(DLI_DAY))
    assert h.fold(at(day(20))).next_due_at() == DAY100_OVERDUE


def test_next_due_at_is_when_a_too_short_course_becomes_finished():
    h = History()
    last = h.course(1, DAY1, 7)[-1]  # hematologic relapse needs 8 days
    finishes = last.occurred_at + timedelta(days=7)

    state = h.fold(at(day(8)))
    assert state.next_due_at() == finishes
    assert "protocol_deviation" not in kinds(state)
    assert "protocol_deviation" in kinds(h.fold(finishes))


def test_no_next_due_once_the_patient_has_died():
    h = treated()
    h.death(at(day(12)))
    assert h.fold(at(day(13))).next_due_at() is None


def test_next_window_close_is_when_endpoints_may_become_evaluable():
    h = treated()
    assert h.fold(at(day(3))).next_window_close_at() == midnight(day(15))
    assert h.fold(midnight(day(15))).next_window_close_at() is None  # no DLI: no 100-day window


def test_next_due_at_is_after_now():
    h = treated()
    assert h.fold(DAY14_OVERDUE).next_due_at() is None  # the deadline itself is not in the future


# ---------------------------------------------------------------------------- endpoint evaluability


def test_an_endpoint_is_not_evaluable_while_its_window_is_open():
    h = treated()
    assert h.fold(at(day(14), 23, 59, 59)).endpoint("crs_grade_3_plus_2w") is None
    assert h.fold(midnight(day(15))).endpoint("crs_grade_3_plus_2w") is False


def test_an_event_makes_the_endpoint_true_at_once():
    h = treated()
    crs = h.crs(at(day(3)), 3)
    state = h.fold(at(day(4)))
    assert state.endpoint("crs_grade_3_plus_2w") is True
    assert state.endpoint_at("crs_grade_3_plus_2w") == (True, crs.occurred_at)


def test_dying_before_the_window_closes_is_evaluable_only_when_the_rule_counts_the_dead():
    h = treated()
    death = h.death(at(day(9)), cause="relapse")
    state = h.fold(at(day(30)))
    assert state.endpoint("crs_grade_3_plus_2w") is None
    assert state.endpoint("crs_grade_3_plus_2w", count_dead=True) is False
    assert state.endpoint_at("crs_grade_3_plus_2w", count_dead=True) == (False, death.occurred_at)
    assert state.endpoint("crs_grade_3_plus_2w", count_withdrawn=True) is None


@pytest.mark.parametrize(("cause", "events"), [
    ("crs", {"crs_any_2w", "crs_grade_3_plus_2w"}),
    ("infection", {"infection_any_2w", "infection_grade_3_plus_2w"}),
    ("gvhd", set()),
    ("relapse", set()),
])
def test_a_death_from_crs_or_infection_in_the_window_is_that_event_at_grade_5(cause, events):
    h = treated()
    death = h.death(at(day(5)), cause=cause)
    state = h.fold(at(day(30)))
    two_weeks = {"crs_any_2w", "crs_grade_3_plus_2w", "icans_any_2w", "infection_any_2w",
                 "infection_grade_3_plus_2w", "heme_ae_grade_3_plus_2w"}
    assert {name for name in two_weeks if state.endpoint(name) is True} == events
    for name in events:
        assert state.endpoint_at(name) == (True, death.occurred_at)


def test_a_death_from_crs_after_the_2_week_window_is_not_a_2_week_event():
    h = treated()
    h.death(at(day(15)), cause="crs")
    assert h.fold(at(day(30))).endpoint("crs_grade_3_plus_2w") is False


def test_withdrawing_before_the_window_closes_is_evaluable_only_when_the_rule_counts_them():
    h = treated()
    h.withdrawal(at(day(9)))
    state = h.fold(at(day(30)))
    assert state.endpoint("icans_any_2w") is None
    assert state.endpoint("icans_any_2w", count_withdrawn=True) is False


def test_leaving_after_the_window_closed_does_not_change_it():
    h = treated()
    h.withdrawal(at(day(20)))
    assert h.fold(at(day(30))).endpoint("crs_any_2w") is False


def test_nrm_is_a_death_not_caused_by_relapse_within_100_days_of_the_dli():
    nrm, relapse = treated(), treated()
    for h in (nrm, relapse):
        h.dli(at(DLI_DAY))
    nrm.death(at(DLI_DAY + timedelta(days=40)), cause="infection")
    relapse.death(at(DLI_DAY + timedelta(days=40)), cause="relapse")
    now = at(DLI_DAY + timedelta(days=41))

    assert nrm.fold(now).endpoint("nrm_100d") is True
    assert relapse.fold(now).endpoint("nrm_100d") is None
    assert relapse.fold(now).endpoint("nrm_100d", count_dead=True) is False


def test_100_day_endpoints_are_not_evaluable_without_a_dli():
    h = treated()
    assert h.fold(at(date(2026, 6, 1))).endpoint("agvhd_any_100d") is None


def test_an_unknown_endpoint_is_refused():
    with pytest.raises(UnknownEndpointError):
        treated().fold(at(day(2))).endpoint("crs_any_3w")
