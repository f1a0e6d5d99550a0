"""The fold's shortcuts give what the rules they stand for give, on generated histories: the facts
grouped by type once (``Chart.of_type``, ``Chart.first``), the dosing schedule as a table
(``CohortPlan.doses_for``), ``lazy`` attributes computed once."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.clinical.history import Fact
from shared.lazy import lazy
from shared.protocol import MAX_STEP_DAY
from tests.unit.patient_history import PROTOCOL, History, at

TYPES = ("blinatumomab_dose", "dli", "crs", "icans", "gvhd", "infection", "lab", "assessment_completed",
         "death", "withdrawal", "relapse", "follow_up", "patient_enrolled", "correction", "nothing")


@st.composite
def histories(draw: st.DrawFn) -> History:
    start = date(2025, 3, 3) + timedelta(days=draw(st.integers(0, 200)))
    history = History(enrolled=start, arm=draw(st.sampled_from(["blinatumomab_dli", "usual_care"])),
                      cohort=draw(st.sampled_from(sorted(PROTOCOL.cohorts))))
    for _ in range(draw(st.integers(0, 12))):
        when = at(start + timedelta(days=draw(st.integers(0, 120))), draw(st.integers(0, 23)))
        kind = draw(st.sampled_from(["dose", "dli", "crs", "lab", "assessment", "death", "withdrawal",
                                     "correct", "retract"]))
        if kind == "dose":
            history.dose(draw(st.integers(1, 2)), draw(st.integers(1, 30)), when, 9.0)
        elif kind == "dli":
            history.dli(when)
        elif kind == "crs":
            history.crs(when, draw(st.integers(0, 4)))
        elif kind == "lab":
            history.lab(when, "platelets", 20.0, draw(st.integers(0, 4)))
        elif kind == "assessment":
            history.assessment(when, draw(st.sampled_from(["day14", "day100"])))
        elif kind == "death":
            history.death(when)
        elif kind == "withdrawal":
            history.withdrawal(when)
        elif len(history.events) > 1:
            event = draw(st.sampled_from(history.events[1:]))
            if kind == "correct" and event.type not in ("correction", "retraction"):
                history.correct(event, occurred_at=event.occurred_at + timedelta(days=draw(st.integers(-2, 2))))
            else:
                history.retract(event)
    return history


@settings(max_examples=60, deadline=None)
@given(histories(), st.sampled_from([datetime(2025, 4, 1, tzinfo=UTC), datetime(2026, 6, 1, tzinfo=UTC)]))
def test_facts_by_type_are_the_facts_of_that_type_in_order(history: History, now: datetime) -> None:
    chart = history.fold(now).chart
    for type_ in TYPES:
        of_type = tuple(f for f in chart.facts if f.type == type_)
        assert chart.of_type(type_) == of_type
        assert chart.first(type_) == (of_type[0] if of_type else None)
    assert chart.of_type("crs", "lab") == tuple(f for f in chart.facts if f.type in ("crs", "lab"))


def test_the_dosing_table_is_the_schedule_for_every_course_and_day() -> None:
    for plan in PROTOCOL.cohorts.values():
        for course in range(0, 4):
            for day in range(-1, MAX_STEP_DAY + 3):
                options = [next((s.dose_ug for s in plan.schedule if s.from_day <= day <= s.to_day), None)]
                if course > 1:
                    options.append(next((s.dose_ug for s in plan.later_course_schedule
                                         if s.from_day <= day <= s.to_day), None))
                assert plan.doses_for(course, day) == list(dict.fromkeys(d for d in options if d is not None))


def test_a_lazy_attribute_is_computed_once_and_kept_on_the_instance() -> None:
    computed: list[int] = []

    class Counted:
        @lazy
        def value(self) -> int:
            computed.append(1)
            return len(computed)

    one, two = Counted(), Counted()
    assert (one.value, one.value, two.value) == (1, 1, 2)
    assert vars(one) == {"value": 1} and isinstance(Counted.value, lazy)


def test_facts_are_keyed_by_event_not_by_position_in_the_stream() -> None:
    history = History()
    dose = history.dose(1, 1, at(date(2025, 3, 4)))
    history.events.append(dose)  # the same event delivered twice counts once
    history.correct(dose, occurred_at=at(date(2025, 3, 5)))
    [fact] = history.fold(datetime(2025, 3, 10, tzinfo=UTC)).chart.of_type("blinatumomab_dose")
    assert isinstance(fact, Fact) and fact.event_id == dose.event_id and fact.day == date(2025, 3, 5)
