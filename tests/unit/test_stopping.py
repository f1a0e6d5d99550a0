"""Stopping rules over the trial's patients (shared/clinical/stopping.py), told as small stories.

Most stories use fake patients: all a rule needs is ``subject_id``, ``arm`` and ``endpoint_at``
(the value of the endpoint and the moment the patient became evaluable). A few fold real patient
streams to show the rule's flags reach the real ``endpoint_at``.

The rules here are written out, not read from the protocol file, so the boundary numbers below are
fixed: Pocock, p0 = 0.10, p1 = 0.30, up to 30 patients, cp0 = 0.10, a look after every patient.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from shared.clinical.boundaries import bayes, pocock
from shared.clinical.stopping import (
    MONITORED_ARM,
    boundary_for,
    crossing_alert,
    evaluate_inputs,
    evaluate_rule,
    evaluate_rules,
    rule_inputs,
)
from shared.events import alert_id_for
from shared.protocol import Protocol, StoppingRule
from tests.unit.patient_history import History, at

CRS_RULE = StoppingRule(
    id="crs_grade_3_plus", title="Grade >= 3 CRS within the 2-week window", endpoint="crs_grade_3_plus_2w",
    method="pocock", p0=0.10, p1=0.30, n_max=30, cp0=0.10, looks=1,
)
NRM_RULE = StoppingRule(
    id="nrm_100d", title="Death not caused by relapse within 100 days of DLI", endpoint="nrm_100d",
    method="pocock", p0=0.10, p1=0.25, n_max=30, cp0=0.10, looks=1, count_dead=True,
)
T0 = datetime(2025, 3, 1, 9, tzinfo=UTC)
_numbers = itertools.count(1)


@dataclass
class FakePatient:
    """A patient as the rule sees it. ``outcome``: True (the event), False (window closed
    without it), None (window still open). ``left``: died or withdrew before the window closed."""

    arm: str
    outcome: bool | None
    day: int
    left: str | None = None
    subject_id: str = field(default_factory=lambda: f"S01-{next(_numbers):03d}")
    asked: list[tuple[str, bool, bool]] = field(default_factory=list)

    def endpoint_at(self, name: str, *, count_withdrawn: bool = False,
                    count_dead: bool = False) -> tuple[bool, datetime] | None:
        self.asked.append((name, count_withdrawn, count_dead))
        when = T0 + timedelta(days=self.day)
        if self.left is not None:
            counted = count_dead if self.left == "death" else count_withdrawn
            return (False, when) if counted else None
        return None if self.outcome is None else (self.outcome, when)


def event(day: int, arm: str = MONITORED_ARM) -> FakePatient:
    return FakePatient(arm, True, day)


def calm(day: int) -> FakePatient:
    return FakePatient(MONITORED_ARM, False, day)


def still_open() -> FakePatient:
    return FakePatient(MONITORED_ARM, None, 0)


def died(day: int) -> FakePatient:
    return FakePatient(MONITORED_ARM, None, day, left="death")


def withdrew(day: int) -> FakePatient:
    return FakePatient(MONITORED_ARM, None, day, left="withdrawal")


# --------------------------------------------------------------------------- the boundary at each look


def test_the_boundary_these_stories_use() -> None:
    boundary = boundary_for(CRS_RULE)
    # 2 events stop from 2 patients on, 3 from 4, 4 from 9 (DOMAIN.md f, clinfun hi.bdry + 1).
    assert [boundary.stop_at(n) for n in range(1, 10)] == [None, 2, 2, 3, 3, 3, 3, 3, 4]


def test_events_reaching_the_boundary_exactly_cross_it() -> None:
    # Patients 1, 5 and 6 (in the order they became evaluable) had grade >= 3 CRS.
    path = [event(1), calm(2), calm(3), calm(4), event(5), event(6)]

    status = evaluate_rule(CRS_RULE, path)

    # At look 6 the boundary is 3 and there are 3 events: crossed there, not before.
    assert (status.evaluable, status.events, status.stop_at) == (6, 3, 3)
    assert status.crossed and status.crossed_at_look == 6 and status.events_at_crossing == 3
    assert status.status == "crossed"


def test_one_event_fewer_does_not_cross() -> None:
    # The same six patients, but the sixth went through the window without grade >= 3 CRS.
    path = [event(1), calm(2), calm(3), calm(4), event(5), calm(6)]

    status = evaluate_rule(CRS_RULE, path)

    assert (status.evaluable, status.events, status.stop_at) == (6, 2, 3)
    assert not status.crossed and status.crossed_at_look is None
    assert status.status == "monitoring"


def test_the_order_patients_became_evaluable_decides_not_the_totals() -> None:
    # Two events among six patients either way.
    events_first = [event(1), event(2), calm(3), calm(4), calm(5), calm(6)]
    events_last = [calm(1), calm(2), calm(3), calm(4), event(5), event(6)]

    # Events first: 2 of the first 2 reach the boundary of 2 at look 2.
    first = evaluate_rule(CRS_RULE, events_first)
    assert first.crossed and first.crossed_at_look == 2

    # Events last: 2 of 6 never reach the boundary of 3 that holds by then.
    last = evaluate_rule(CRS_RULE, events_last)
    assert not last.crossed
    assert (first.events, first.evaluable) == (last.events, last.evaluable) == (2, 6)


def test_the_list_order_of_patients_does_not_matter_only_when_they_became_evaluable() -> None:
    path = [event(1), event(2), calm(3), calm(4)]
    assert evaluate_rule(CRS_RULE, list(reversed(path))).crossed_at_look == 2


def test_patients_whose_window_is_open_are_not_evaluable() -> None:
    status = evaluate_rule(CRS_RULE, [calm(1), still_open(), still_open()])
    assert (status.evaluable, status.events) == (1, 0)


def test_usual_care_patients_never_count() -> None:
    # Three usual-care patients with the event, then two treated patients without it.
    usual_care = [event(day, arm="usual_care") for day in (1, 2, 3)]
    patients = [*usual_care, calm(4), calm(5)]

    status = evaluate_rule(CRS_RULE, patients)

    assert (status.evaluable, status.events, status.crossed) == (2, 0, False)
    assert all(p.asked == [] for p in usual_care)  # not even asked


def test_a_crossing_stays_crossed_as_patients_without_the_event_arrive() -> None:
    # Two early events cross at look 2; then 25 patients complete the window without one.
    patients = [event(1), event(2), *(calm(day) for day in range(3, 28))]

    status = evaluate_rule(CRS_RULE, patients)

    # 2 events / 27 evaluable is below today's boundary (7), but the rule stays crossed.
    assert (status.evaluable, status.events, status.stop_at) == (27, 2, 7)
    assert status.crossed and status.crossed_at_look == 2 and status.events_at_crossing == 2
    assert status.status == "crossed"
    assert status.path == (1, 2, *([2] * 25))  # what the DSMB chart draws, look by look


def test_removing_an_event_as_a_correction_would_undoes_the_crossing() -> None:
    first, second = event(1), event(2)
    others = [calm(day) for day in range(3, 6)]
    assert evaluate_rule(CRS_RULE, [first, second, *others]).crossed

    # The second CRS is corrected to grade 1: that patient now becomes evaluable when the window
    # closes, without the event.
    corrected = FakePatient(MONITORED_ARM, False, 16, subject_id=second.subject_id)
    status = evaluate_rule(CRS_RULE, [first, corrected, *others])

    assert not status.crossed and status.crossed_at_look is None and status.events_at_crossing is None
    assert (status.evaluable, status.events) == (5, 1)
    assert status.event_subjects == (first.subject_id,)


def test_a_correction_in_a_real_stream_undoes_the_crossing() -> None:
    day1 = date(2025, 3, 3)
    patients = [History() for _ in range(2)]
    crs_events = []
    for hours, patient in enumerate(patients):
        patient.course(1, day1, 8)
        crs_events.append(patient.crs(at(day1 + timedelta(days=1), 9 + hours), 3))
    later = at(day1 + timedelta(days=30))

    # Two grade 3 CRS in the first two evaluable patients: crossed.
    assert evaluate_rule(CRS_RULE, [p.fold(later) for p in patients]).crossed

    # The second is corrected to grade 1.
    patients[1].correct(crs_events[1], grade=1)
    status = evaluate_rule(CRS_RULE, [p.fold(later) for p in patients])
    assert not status.crossed
    assert (status.evaluable, status.events) == (2, 1)


# --------------------------------------------------------------------------- who is evaluable


def test_the_rule_asks_for_its_endpoint_with_its_flags() -> None:
    patient = calm(1)
    evaluate_rule(NRM_RULE, [patient])
    assert patient.asked == [("nrm_100d", False, True)]


@pytest.mark.parametrize(("count_dead", "count_withdrawn", "evaluable"), [
    (False, False, 1), (True, False, 2), (False, True, 2), (True, True, 3),
])
def test_the_dead_and_the_withdrawn_count_only_when_the_rule_says(
    count_dead: bool, count_withdrawn: bool, evaluable: int,
) -> None:
    rule = NRM_RULE.model_copy(update={"count_dead": count_dead, "count_withdrawn": count_withdrawn})
    # One died of relapse and one withdrew before the window closed; one completed it.
    status = evaluate_rule(rule, [died(3), withdrew(4), calm(5)])
    assert (status.evaluable, status.events) == (evaluable, 0)


def test_a_death_from_relapse_counts_through_the_real_endpoint() -> None:
    day1 = date(2025, 3, 3)
    patient = History()
    patient.course(1, day1, 8)
    patient.dli(at(day1 + timedelta(days=20)))
    patient.death(at(day1 + timedelta(days=50)), cause="relapse")  # 30 days after the DLI
    state = patient.fold(at(day1 + timedelta(days=60)))  # the 100-day window is still open

    # The NRM rule counts the dead (protocol file): evaluable, without the event.
    counted = evaluate_rule(NRM_RULE, [state])
    assert (counted.evaluable, counted.events) == (1, 0)

    # A rule that does not count the dead leaves the patient out.
    ignored = evaluate_rule(NRM_RULE.model_copy(update={"count_dead": False}), [state])
    assert ignored.evaluable == 0


# --------------------------------------------------------------------------- what the API and the alert show


def test_the_public_status_has_what_the_api_and_the_dsmb_summary_need() -> None:
    status = evaluate_rule(CRS_RULE, [event(1), event(2), calm(3)])

    public = status.public()

    assert set(public) >= {"rule_id", "title", "endpoint", "method", "params", "evaluable", "events",
                           "stop_at", "crossed", "crossed_at_look", "events_at_crossing", "status", "boundary"}
    assert (public["crossed_at_look"], public["events_at_crossing"]) == (2, 2)
    assert {k: public[k] for k in ("rule_id", "evaluable", "events", "stop_at", "crossed", "status")} == {
        "rule_id": "crs_grade_3_plus", "evaluable": 3, "events": 2, "stop_at": 2, "crossed": True,
        "status": "crossed"}
    assert public["boundary"][:3] == [{"n": 1, "stop_at": None}, {"n": 2, "stop_at": 2}, {"n": 3, "stop_at": 2}]
    assert public["params"]["p0"] == 0.10 and public["params"]["n_max"] == 30


def test_a_rule_that_has_seen_its_last_patient_is_complete() -> None:
    status = evaluate_rule(CRS_RULE, [calm(day) for day in range(1, 31)])
    assert status.status == "complete"


def test_the_crossing_alert_goes_urgently_to_investigators_and_dsmb(protocol: Protocol) -> None:
    status = evaluate_rule(CRS_RULE, [event(1), event(2), calm(3)])

    alert = crossing_alert(protocol, status)

    assert alert.kind == "stopping_boundary_crossed"
    assert alert.audience == "investigators_and_dsmb"
    assert alert.severity == "urgent"
    assert alert.subject_id is None and alert.rule == "crs_grade_3_plus"
    assert alert.alert_id == alert_id_for("stopping", protocol.trial.id, "crs_grade_3_plus")
    assert {k: alert.facts[k] for k in ("events", "evaluable", "stop_at")} == {
        "events": 2, "evaluable": 3, "stop_at": 2}
    assert alert.facts["events_at_crossing"] == 2 and alert.facts["evaluable_at_crossing"] == 2


def test_the_crossing_alert_id_does_not_change_as_the_numbers_do(protocol: Protocol) -> None:
    early = crossing_alert(protocol, evaluate_rule(CRS_RULE, [event(1), event(2)]))
    late = crossing_alert(protocol, evaluate_rule(CRS_RULE, [event(1), event(2), *map(calm, range(3, 12))]))
    assert early.alert_id == late.alert_id  # one alert per rule, however often it is evaluated
    assert early.facts["evaluable"] != late.facts["evaluable"]


def test_the_alert_states_the_boundary_at_the_count_it_states(protocol: Protocol) -> None:
    # Crossed at look 2 (2 events, boundary 2); nine more patients without the event since, so the
    # alert is raised at 2 events / 11 evaluable, where the boundary is 4.
    status = evaluate_rule(CRS_RULE, [event(1), event(2), *map(calm, range(3, 12))])

    facts: dict[str, Any] = crossing_alert(protocol, status).facts

    # The mail prints "events / evaluable; stops at stop_at at this look": the three agree with
    # GET /v1/stopping-rules; the crossing itself is kept beside them.
    assert (facts["events"], facts["evaluable"], facts["stop_at"]) == (2, 11, 4) == (
        status.events, status.evaluable, status.stop_at)
    assert (facts["events_at_crossing"], facts["evaluable_at_crossing"], facts["stop_at_crossing"]) == (2, 2, 2)


# --------------------------------------------------------------------------- the read model

def _trial(n: int) -> list[History]:
    """Real streams of every shape the rules tell apart: the event, none, death, withdrawal,
    a DLI (the 100-day rules), usual care, a course still running."""
    histories = []
    for i in range(n):
        start = date(2025, 3, 3) + timedelta(days=3 * i)
        h = History(enrolled=start - timedelta(days=1), arm="usual_care" if i % 7 == 6 else "blinatumomab_dli")
        h.course(1, start, 5)
        if i % 3 == 0:
            h.crs(at(start + timedelta(days=2)), 3)
        if i % 4 == 1:
            h.dli(at(start + timedelta(days=16)))
            if i % 8 == 1:
                h.agvhd(at(start + timedelta(days=40)), 3)
        if i % 5 == 2:
            h.death(at(start + timedelta(days=9)), cause="infection" if i % 2 else "relapse")
        if i % 11 == 3:
            h.withdrawal(at(start + timedelta(days=4)))
        histories.append(h)
    return histories


@pytest.mark.parametrize("days_later", [0, 5, 12, 30, 120, 400])
def test_the_rules_over_rows_written_once_agree_with_the_rules_over_every_fold_at_any_later_moment(
        protocol: Protocol, days_later: int) -> None:
    # The rows are written when each patient was last evaluated; only time passes afterwards.
    histories = _trial(40)
    written = datetime(2025, 6, 1, tzinfo=UTC)
    rows = [row for h in histories for row in rule_inputs(protocol, h.fold(written))]
    now = written + timedelta(days=days_later)
    from_rows = evaluate_inputs(protocol, rows, now=now)
    from_folds = evaluate_rules(protocol, [h.fold(now) for h in histories])
    assert [s.public() for s in from_rows] == [s.public() for s in from_folds]
    assert any(s.evaluable for s in from_rows)


def test_a_rule_that_cannot_count_a_patient_says_so(protocol: Protocol) -> None:
    [status, *_] = evaluate_inputs(protocol, [], now=T0, uncounted=["S01-009"])
    assert status.status == "incomplete" and status.public()["uncounted_subjects"] == ["S01-009"]


@pytest.mark.parametrize("method", ["pocock", "bayes"])
def test_a_rule_gets_the_boundary_its_every_parameter_asks_for(method):
    rule = StoppingRule(id="r", title="r", endpoint="crs_grade_3_plus_2w", method=method, p0=0.15, p1=0.35,
                        n_max=24, cp0=0.05, looks=4, prior_a=0.5, prior_b=2.0, threshold=0.9)
    expected = (pocock(0.15, 0.35, 24, 0.05, looks=4) if method == "pocock"
                else bayes(0.15, 0.35, 24, prior_a=0.5, prior_b=2.0, threshold=0.9, looks=4))
    assert boundary_for(rule) == expected
    assert [look.n for look in boundary_for(rule).looks] == [4, 8, 12, 16, 20, 24]
    assert boundary_for(rule).p_stop_p1 is not None
