"""Alerts a history justifies, against what the alert log already says."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from services.safety.domain.reconcile import plan
from shared.alert_log import fold_alerts
from shared.events import ALERT_RAISED, ALERT_WITHDRAWN, AlertRaised, StoredEvent, alert_id_for

NOW = datetime(2026, 1, 5, tzinfo=UTC)


def alert(key: str) -> AlertRaised:
    return AlertRaised(alert_id=alert_id_for("S1", "crs_grade_3_plus", key), kind="crs_grade_3_plus",
                       severity="urgent", subject_id="S1", site_id="S01", title="Grade 3 CRS", detail="d", rule="r")


def stored(appended: list, start: int = 1) -> list[StoredEvent]:  # type: ignore[type-arg]
    return [
        StoredEvent(position=start + i, event_id=a.event.event_id, stream_id=a.stream_id,
                    stream_version=a.expected_version + 1, type=a.event.type, subject_id="S1",
                    occurred_at=NOW, recorded_at=NOW, recorded_by="safety", data=a.event.data)
        for i, a in enumerate(appended)
    ]


def test_a_new_alert_is_raised_once_and_a_second_plan_adds_nothing() -> None:
    first = plan([alert("e1")], {}, now=NOW, withdraw_reason="x")
    assert [a.event.type for a in first] == [ALERT_RAISED]
    assert first[0].expected_version == 0

    log = fold_alerts(stored(first))
    assert plan([alert("e1")], log, now=NOW, withdraw_reason="x") == []


def test_an_alert_no_longer_justified_is_withdrawn_once_and_can_come_back() -> None:
    raised = plan([alert("e1")], {}, now=NOW, withdraw_reason="x")
    history = stored(raised)

    withdrawn = plan([], fold_alerts(history), now=NOW, withdraw_reason="corrected")
    assert [(a.event.type, a.expected_version) for a in withdrawn] == [(ALERT_WITHDRAWN, 1)]
    assert withdrawn[0].event.data["reason"] == "corrected"
    history += stored(withdrawn, start=2)
    assert plan([], fold_alerts(history), now=NOW, withdraw_reason="corrected") == []

    again = plan([alert("e1")], fold_alerts(history), now=NOW, withdraw_reason="x")
    assert [(a.event.type, a.expected_version) for a in again] == [(ALERT_RAISED, 2)]


def test_event_ids_are_the_same_whoever_computes_the_plan() -> None:
    one = plan([alert("e1")], {}, now=NOW, withdraw_reason="x")
    two = plan([alert("e1")], {}, now=NOW, withdraw_reason="x")
    assert one[0].event.event_id == two[0].event.event_id
    assert one[0].event.event_id != plan([alert("e2")], {}, now=NOW, withdraw_reason="x")[0].event.event_id
    assert isinstance(one[0].event.event_id, uuid.UUID)


def test_a_held_alert_is_not_raised_yet_and_an_open_one_stays_open_while_held() -> None:
    overdue, other = alert("missing-assessment"), alert("e2")
    held = frozenset({overdue.alert_id})

    # Not open yet: held back; the other desired alert is raised as usual.
    first = plan([overdue, other], {}, now=NOW, withdraw_reason="x", held=held)
    assert [a.stream_id for a in first] == [f"alert-{other.alert_id}"]

    # Already open (raised before this entry began): neither raised again nor withdrawn.
    log = fold_alerts(stored(plan([overdue], {}, now=NOW, withdraw_reason="x")))
    assert plan([overdue], log, now=NOW, withdraw_reason="x", held=held) == []

    # No longer desired at all (the assessment arrived): withdrawn at once, holding or not.
    [withdrawn] = plan([], log, now=NOW, withdraw_reason="recorded", held=held)
    assert withdrawn.event.type == ALERT_WITHDRAWN
