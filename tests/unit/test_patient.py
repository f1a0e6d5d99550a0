"""The patient fold as stories: record events, fold, look at the state and the alerts."""

from __future__ import annotations

import json
import random
from datetime import date, timedelta

import pytest

from shared.clinical.patient import NotEnrolledError, fold_patient
from shared.clinical.records import ENDPOINT_NAMES
from shared.events import StoredEvent, alert_id_for
from tests.unit.patient_history import PROTOCOL, History, at, kinds, only

DAY1 = date(2025, 3, 5)  # course 1 day 1 (a Wednesday)
DLI_DAY = date(2025, 3, 20)


def day(n: int) -> date:
    """Course-1 day ``n`` as a calendar date."""
    return DAY1 + timedelta(days=n - 1)


def on_course() -> History:
    """A hematologic-relapse patient given 10 days of course 1 on schedule."""
    h = History()
    h.course(1, DAY1, 10)
    return h


NOW = at(day(11))  # after the course, before any assessment is due


# ---------------------------------------------------------------------------- one alert per kind


def key_of(event: StoredEvent) -> str:
    """An event alert's key: the event, and its grade or severity where it has one."""
    for name in ("grade", "severity"):
        if name in event.data:
            return f"{event.event_id}|{name} {event.data[name]}"
    return str(event.event_id)


@pytest.mark.parametrize(("record", "kind", "title"), [
    (lambda h: h.crs(at(day(3)), 3), "crs_grade_3_plus", "Grade 3 CRS"),
    (lambda h: h.crs(at(day(3)), 4), "crs_grade_3_plus", "Grade 4 CRS"),
    (lambda h: h.crs(at(day(3)), 2), "crs_low_grade", "Grade 2 CRS"),
    (lambda h: h.crs(at(day(3)), 1), "crs_low_grade", "Grade 1 CRS"),
    (lambda h: h.icans(at(day(9)), 3), "icans_grade_3_plus", "Grade 3 ICANS"),
    (lambda h: h.icans(at(day(9)), 1), "icans_low_grade", "Grade 1 ICANS"),
    (lambda h: h.agvhd(at(day(10)), 3), "agvhd_grade_3_4", "Grade III acute GVHD"),
    (lambda h: h.agvhd(at(day(10)), 4), "agvhd_grade_3_4", "Grade IV acute GVHD"),
    (lambda h: h.agvhd(at(day(10)), 2), "agvhd_grade_1_2", "Grade II acute GVHD"),
    (lambda h: h.cgvhd(at(day(10)), "mild"), "cgvhd", "Chronic GVHD (mild)"),
    (lambda h: h.infection(at(day(4)), 4), "infection_grade_4_plus", "Grade 4 infection (lung)"),
    (lambda h: h.infection(at(day(4)), 5), "infection_grade_4_plus", "Grade 5 infection (lung)"),
    (lambda h: h.infection(at(day(4)), 3), "infection_grade_3", "Grade 3 infection (lung)"),
    (lambda h: h.lab(at(day(4)), "neutrophils", 0.7, 3), "heme_ae_grade_3_plus",
     "Grade 3 neutrophil count decreased"),
    (lambda h: h.lab(at(day(4)), "platelets", 20, 4), "heme_ae_grade_3_plus",
     "Grade 4 platelet count decreased"),
    (lambda h: h.death(at(day(10))), "death", "Death"),
    (lambda h: h.relapse(at(day(10))), "relapse", "Relapse"),
    (lambda h: h.withdrawal(at(day(10))), "withdrawal", "Withdrawal from the study"),
])
def test_each_qualifying_event_raises_its_alert(record, kind, title):
    h = on_course()
    cause = record(h)

    alert = only(h.fold(NOW), kind)

    assert alert.alert_id == alert_id_for(h.subject_id, kind, key_of(cause))
    assert alert.severity == PROTOCOL.severity(kind)
    assert alert.title == title
    assert (alert.subject_id, alert.site_id) == (h.subject_id, "S01")
    assert alert.cause_event_ids == (cause.event_id,)
    assert alert.cause_occurred_at == cause.occurred_at
    assert alert.cause_recorded_at == cause.recorded_at
    assert alert.detail and alert.action and alert.rule


@pytest.mark.parametrize("record", [
    lambda h: h.crs(at(day(3)), 0),  # observations graded as no CRS
    lambda h: h.infection(at(day(4)), 2),
    lambda h: h.lab(at(day(4)), "neutrophils", 1.2, 2),
    lambda h: h.agvhd(at(day(10)), 0),
    lambda h: h.follow_up(at(day(10))),
])
def test_events_below_the_thresholds_raise_nothing(record):
    h = on_course()
    record(h)
    assert kinds(h.fold(NOW)) == []


def test_a_derived_crs_grade_is_explained_with_its_clinical_time():
    h = on_course()
    h.crs(at(day(3), 10), 3, max_temp_c=39.5, vasopressors=1, oxygen="low_flow_nasal_cannula")

    alert = only(h.fold(NOW), "crs_grade_3_plus")

    assert "derived ASTCT grade 3 from 39.5 °C, 1 vasopressor, low-flow nasal cannula" in alert.detail
    assert "2025-03-07 10:00 Asia/Shanghai, course 1 day 3" in alert.detail
    assert "stopping rule crs_grade_3_plus" in alert.detail
    assert alert.facts["course_day"] == 3 and alert.facts["grade"] == 3
    assert "Interrupt blinatumomab" in alert.action and "dexamethasone 8 mg" in alert.action
    assert "restart at 9 µg/day" in alert.action


def test_grade_4_crs_means_permanent_discontinuation_and_an_sae_report():
    h = on_course()
    h.crs(at(day(3)), 4)
    action = only(h.fold(NOW), "crs_grade_3_plus").action
    assert "Discontinue blinatumomab permanently" in action and "within 24 h" in action


def test_crs_action_for_a_patient_under_45_kg_uses_body_surface_dosing():
    h = History(weight_kg=40)
    h.course(1, DAY1, 10)
    h.crs(at(day(3)), 3)
    action = only(h.fold(NOW), "crs_grade_3_plus").action
    assert "5 mg/m² (max 8 mg)" in action and "5 µg/m²/day" in action


def test_grade_3_icans_at_9_ug_means_permanent_discontinuation():
    h = on_course()
    h.icans(at(day(2), 15), 3)  # days 1-4 are 9 µg/day
    alert = only(h.fold(NOW), "icans_grade_3_plus")
    assert "discontinue blinatumomab permanently" in alert.action
    assert alert.facts["dose_ug"] == 9.0


def test_death_tells_to_report_an_sae_immediately():
    h = on_course()
    h.death(at(day(10)), cause="infection")
    alert = only(h.fold(NOW), "death")
    assert alert.severity == "urgent" and "within 24 h" in alert.action
    assert alert.facts["cause"] == "infection"


def test_events_after_the_dli_are_timed_from_it():
    h = on_course()
    h.dli(at(DLI_DAY))
    h.agvhd(at(DLI_DAY + timedelta(days=30)), 3)
    alert = only(h.fold(at(DLI_DAY + timedelta(days=31))), "agvhd_grade_3_4")
    assert "30 days after DLI" in alert.detail and alert.facts["days_after_dli"] == 30
    assert "agvhd_grade_3_4_100d (stopping rule agvhd_grade_3_4)" in alert.detail


# ---------------------------------------------------------------------------- corrections


def test_a_correction_from_grade_2_to_3_raises_the_urgent_alert():
    h = on_course()
    crs = h.crs(at(day(3)), 2)
    assert kinds(h.fold(NOW)) == ["crs_low_grade"]

    fix = h.correct(crs, grade=3)
    alert = only(h.fold(NOW), "crs_grade_3_plus")

    assert kinds(h.fold(NOW)) == ["crs_grade_3_plus"]  # the low-grade alert is no longer desired
    assert alert.alert_id == alert_id_for(h.subject_id, "crs_grade_3_plus", f"{crs.event_id}|grade 3")
    assert alert.cause_event_ids == (crs.event_id, fix.event_id)
    assert alert.cause_recorded_at == fix.recorded_at


def test_a_correction_from_grade_3_to_2_removes_the_urgent_alert():
    h = on_course()
    crs = h.crs(at(day(3)), 3)
    h.correct(crs, grade=2)
    assert kinds(h.fold(NOW)) == ["crs_low_grade"]


def test_a_correction_to_another_urgent_grade_raises_an_alert_of_that_grade():
    # Grade 3 -> 4 CRS: the grade-3 alert is withdrawn and a grade-4 one raised, so the
    # investigators hear of the change (the alert text is fixed when it is raised).
    h = on_course()
    crs = h.crs(at(day(3)), 3)
    before = only(h.fold(NOW), "crs_grade_3_plus")

    h.correct(crs, grade=4, occurred_at=at(day(4)))
    after = only(h.fold(NOW), "crs_grade_3_plus")

    assert after.alert_id != before.alert_id
    assert after.alert_id == alert_id_for(h.subject_id, "crs_grade_3_plus", f"{crs.event_id}|grade 4")
    assert after.title == "Grade 4 CRS" and after.cause_occurred_at == at(day(4))


def test_a_correction_of_the_time_alone_keeps_the_alert_id():
    h = on_course()
    crs = h.crs(at(day(3)), 3)
    before = only(h.fold(NOW), "crs_grade_3_plus")
    h.correct(crs, grade=3, occurred_at=at(day(4)))
    assert only(h.fold(NOW), "crs_grade_3_plus").alert_id == before.alert_id


def test_a_retraction_removes_the_alert():
    h = on_course()
    crs = h.crs(at(day(3)), 3)
    h.retract(crs)
    assert kinds(h.fold(NOW)) == []
    assert h.fold(NOW).public()["grades"]["crs_max"] is None


def test_the_latest_correction_wins_and_a_retracted_correction_no_longer_counts():
    h = on_course()
    crs = h.crs(at(day(3)), 1)
    h.correct(crs, grade=2)
    third = h.correct(crs, grade=3)
    assert kinds(h.fold(NOW)) == ["crs_grade_3_plus"]

    h.retract(third)  # back to the second correction

    assert kinds(h.fold(NOW)) == ["crs_low_grade"]
    assert h.fold(NOW).public()["grades"]["crs_max"] == 2


def test_a_correction_of_a_correction_corrects_the_original_event():
    h = on_course()
    crs = h.crs(at(day(3)), 2)
    first = h.correct(crs, grade=3)
    h.record("correction", at(day(6)), {
        "corrects_event_id": str(first.event_id), "reason": "again",
        "replacement": {"grade": 1, "scale": "ASTCT-2019", "type": "crs",
                        "occurred_at": at(day(3)).isoformat()}})
    alert = only(h.fold(NOW), "crs_low_grade")
    assert alert.alert_id == alert_id_for(h.subject_id, "crs_low_grade", f"{crs.event_id}|grade 1")
    assert alert.title == "Grade 1 CRS"


def test_a_correction_moving_an_event_out_of_the_window_changes_the_endpoint():
    h = on_course()
    crs = h.crs(at(day(14), 23, 59), 3)
    assert h.fold(at(day(20))).endpoint("crs_grade_3_plus_2w") is True

    h.correct(crs, occurred_at=at(day(15), 0, 0))

    assert h.fold(at(day(20))).endpoint("crs_grade_3_plus_2w") is False


def test_the_same_event_delivered_twice_counts_once():
    h = on_course()
    h.crs(at(day(3)), 3)
    state = fold_patient([*h.events, h.events[-1]], PROTOCOL, now=NOW)
    assert kinds(state) == ["crs_grade_3_plus"]
    assert state.public()["courses"][0]["doses"] == 10


# ---------------------------------------------------------------------------- determinism


def a_rich_history() -> History:
    h = History()
    h.course(1, DAY1, 7)  # one day short
    h.dose(1, 5, at(day(5), 10), dose_ug=12.0)  # off schedule
    crs = h.crs(at(day(2), 22), 2)
    h.correct(crs, grade=3)
    h.icans(at(day(6)), 1)
    wrong = h.infection(at(day(4)), 4)
    h.retract(wrong)
    h.lab(at(day(8)), "neutrophils", 0.3, 4)
    h.lab(at(day(12)), "neutrophils", 1.2, 2)
    h.dli(at(DLI_DAY), 4.9e7)
    h.agvhd(at(DLI_DAY + timedelta(days=20)), 2)
    h.assessment(at(day(17)), "day14")
    h.course(2, DLI_DAY + timedelta(days=45), 8)
    return h


def test_the_same_history_in_any_order_and_positions_gives_the_same_state_and_alerts():
    h = a_rich_history()
    now = at(DLI_DAY + timedelta(days=120))
    expected = (h.fold(now).public(), h.fold(now).desired_alerts())
    rng = random.Random(20250305)

    for _ in range(20):
        shuffled = h.events[:]
        rng.shuffle(shuffled)
        positions = rng.sample(range(1, 10 * len(shuffled)), len(shuffled))
        renumbered = [e.model_copy(update={"position": p}) for e, p in zip(shuffled, positions)]
        state = fold_patient(renumbered, PROTOCOL, now=now)
        assert (state.public(), state.desired_alerts()) == expected


def test_public_state_is_json():
    h = a_rich_history()
    public = h.fold(at(DLI_DAY + timedelta(days=120))).public()
    assert json.loads(json.dumps(public)) == public


# ---------------------------------------------------------------------------- public state


def test_the_public_state_summarises_courses_dli_grades_and_status():
    h = a_rich_history()
    public = h.fold(at(DLI_DAY + timedelta(days=50))).public()

    assert public["subject_id"] == h.subject_id and public["cohort"] == "hematologic_relapse"
    assert public["enrolled_at"] == at(date(2025, 3, 3), 8).isoformat()
    assert public["status"] == "on_study"
    assert public["courses"][0] == {"course": 1, "day1": "2025-03-05", "first_day": 1, "last_day": 7,
                                    "days_dosed": 7, "doses": 8, "finished": True}
    assert public["courses"][1]["day1"] == "2025-05-04" and public["courses"][1]["finished"] is False
    assert public["dli"] == {"date": "2025-03-20", "mnc_per_kg": 4.9e7, "count": 1}
    assert public["grades"] == {"crs_max": 3, "icans_max": 1, "agvhd_max": 2, "cgvhd_severity": None,
                                "infection_max": None, "labs": {"neutrophils": 2}}
    assert public["windows"]["day14"]["status"] == "completed"
    assert public["windows"]["day100"]["status"] == "open"
    assert public["as_of"] == at(DLI_DAY + timedelta(days=50)).isoformat()
    assert {d["code"] for d in public["deviations"]} == {"course_too_short", "dose_off_schedule",
                                                          "dli_cell_dose"}


def test_status_follows_withdrawal_and_death():
    h = on_course()
    h.withdrawal(at(day(12)))
    assert h.fold(NOW + timedelta(days=2)).public()["status"] == "withdrawn"
    h.death(at(day(30)), cause="relapse")
    public = h.fold(at(day(31))).public()
    assert public["status"] == "dead" and public["death"] == {"date": "2025-04-03", "cause": "relapse"}


def test_a_stream_without_enrolment_cannot_be_folded():
    h = on_course()
    with pytest.raises(NotEnrolledError):
        fold_patient(h.events[1:], PROTOCOL, now=NOW)


# ---------------------------------------------------------------------------- outcome


def test_outcome_dates_and_counts():
    h = History()
    h.relapse(at(date(2025, 3, 4)))  # before treatment: the relapse the patient was enrolled for
    h.course(1, DAY1, 10)
    h.agvhd(at(day(12)), 1)  # before the DLI: not an onset after it
    h.dli(at(DLI_DAY))
    h.agvhd(at(DLI_DAY + timedelta(days=10)), 1)
    h.agvhd(at(DLI_DAY + timedelta(days=25)), 2)
    h.relapse(at(DLI_DAY + timedelta(days=50)))
    h.follow_up(at(DLI_DAY + timedelta(days=70)))

    outcome = h.fold(at(DLI_DAY + timedelta(days=80))).outcome()

    assert outcome.origin == DAY1
    assert outcome.last_contact == DLI_DAY + timedelta(days=70)
    assert outcome.relapse_date == DLI_DAY + timedelta(days=50)
    assert outcome.agvhd_onset == DLI_DAY + timedelta(days=10)
    assert outcome.agvhd_2_4_onset == DLI_DAY + timedelta(days=25)
    assert (outcome.courses, outcome.doses, outcome.dlis, outcome.dli_date) == (1, 10, 1, DLI_DAY)
    assert outcome.death_date is None and outcome.withdrawn_date is None
    assert set(outcome.endpoints) == set(ENDPOINT_NAMES)
    assert outcome.endpoints["agvhd_any_100d"] is True
    assert outcome.endpoints["crs_any_2w"] is False  # the 2-week window closed without CRS
    assert outcome.endpoints["cgvhd_any_100d"] is None  # the 100-day window is still open


def test_outcome_of_a_death_ends_follow_up_on_the_death_day():
    h = on_course()
    h.dli(at(DLI_DAY))
    h.death(at(DLI_DAY + timedelta(days=40)), cause="relapse")
    h.follow_up(at(DLI_DAY + timedelta(days=41)))  # a late, wrong contact: the death day still wins

    outcome = h.fold(at(DLI_DAY + timedelta(days=50))).outcome()

    assert outcome.last_contact == outcome.death_date == DLI_DAY + timedelta(days=40)
    assert outcome.death_cause == "relapse"
    assert outcome.endpoints["nrm_100d"] is False  # the NRM rule counts the dead (protocol file)
    assert outcome.endpoints["agvhd_grade_3_4_100d"] is None  # that rule does not


def test_outcome_of_a_usual_care_patient_starts_at_enrolment():
    h = History(arm="usual_care", enrolled=date(2025, 3, 3))
    h.withdrawal(at(date(2025, 5, 1)))
    outcome = h.fold(at(date(2025, 6, 1))).outcome()
    assert outcome.origin == date(2025, 3, 3)
    assert outcome.withdrawn_date == outcome.last_contact == date(2025, 5, 1)
    assert (outcome.courses, outcome.doses, outcome.dlis) == (0, 0, 0)


# ---------------------------------------------------------------------------- endpoint edges

def on_course_1() -> History:
    h = History()
    h.course(1, DAY1, 10)
    return h


@pytest.mark.parametrize(("grade", "counts"), [(2, False), (3, True)])
def test_an_infection_of_grade_3_exactly_counts_as_grade_3_or_more(grade, counts):
    h = on_course_1()
    h.infection(at(day(5)), grade)
    state = h.fold(at(day(20)))
    assert state.endpoint("infection_grade_3_plus_2w") is counts
    assert state.endpoint("infection_any_2w") is True


@pytest.mark.parametrize(("cause", "infection", "crs"), [("infection", True, False), ("crs", False, True),
                                                          ("relapse", False, False)])
def test_a_death_from_infection_or_crs_is_that_event_at_grade_5(cause, infection, crs):
    h = on_course_1()
    h.death(at(day(6)), cause=cause)
    state = h.fold(at(day(20)))
    assert state.endpoint("infection_grade_3_plus_2w", count_dead=True) is infection
    assert state.endpoint("crs_grade_3_plus_2w", count_dead=True) is crs


def test_chronic_gvhd_is_not_acute_gvhd():
    h = on_course_1()
    h.dli(at(DLI_DAY))
    h.cgvhd(at(DLI_DAY + timedelta(days=30)))
    state = h.fold(at(DLI_DAY + timedelta(days=120)))
    assert state.endpoint("cgvhd_any_100d") is True
    assert state.endpoint("agvhd_any_100d") is False
    assert state.outcome().agvhd_onset is None


def test_leaving_at_the_moment_a_window_closes_leaves_it_evaluable():
    at_close, before = on_course_1(), on_course_1()
    closes = at(day(15), 0)
    at_close.withdrawal(closes)
    before.withdrawal(closes - timedelta(seconds=1))
    assert at_close.fold(at(day(20))).endpoint("crs_any_2w") is False
    assert before.fold(at(day(20))).endpoint("crs_any_2w") is None


def test_a_relapse_on_day_1_and_acute_gvhd_at_the_moment_of_the_dli_count_for_the_outcome():
    h = History()
    h.relapse(at(DAY1, 8))
    h.course(1, DAY1, 10)
    h.dli(at(DLI_DAY, 10))
    h.agvhd(at(DLI_DAY, 10), 2)
    outcome = h.fold(at(DLI_DAY + timedelta(days=30))).outcome()
    assert outcome.relapse_date == DAY1
    assert outcome.agvhd_onset == outcome.agvhd_2_4_onset == DLI_DAY


def test_a_usual_care_patient_dosed_in_error_still_starts_at_enrolment():
    h = History(arm="usual_care", enrolled=date(2025, 3, 3))
    h.dose(1, 1, at(DAY1))
    outcome = h.fold(at(date(2025, 6, 1))).outcome()
    assert outcome.origin == date(2025, 3, 3)
    assert (outcome.subject_id, outcome.site_id, outcome.arm, outcome.cohort) == (
        h.subject_id, "S01", "usual_care", "hematologic_relapse")
    assert outcome.enrolled_at == h.enrolment.occurred_at
