"""From "alerts this history justifies" to the alert events still to append.

Pure: desired alerts and the alert log in, appends out. The ids of the appended events are
derived from the alert id and the stream version they will take, so two workers (or a replay)
computing the same plan write the same event ids and the store lets only one of them in.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from datetime import datetime

from shared.alert_log import AlertView
from shared.events import (
    ALERT_RAISED,
    ALERT_WITHDRAWN,
    STOPPING_BOUNDARY_CROSSED,
    AlertRaised,
    AlertWithdrawn,
    NewEvent,
    alert_stream,
)

RECORDED_BY = "safety-service"


@dataclass(frozen=True)
class Append:
    stream_id: str
    expected_version: int
    event: NewEvent


def _event_id(alert_id: uuid.UUID, version: int) -> uuid.UUID:
    return uuid.uuid5(alert_id, f"v{version}")


def _raise(alert: AlertRaised, version: int, now: datetime, causation: uuid.UUID | None) -> Append:
    kind = STOPPING_BOUNDARY_CROSSED if alert.kind == "stopping_boundary_crossed" else ALERT_RAISED
    event = NewEvent(
        event_id=_event_id(alert.alert_id, version + 1),
        type=kind,
        subject_id=alert.subject_id,
        occurred_at=alert.cause_occurred_at or now,
        recorded_by=RECORDED_BY,
        data=alert.model_dump(mode="json"),
        causation_id=causation,
    )
    return Append(alert_stream(alert.alert_id), version, event)


def _withdraw(view: AlertView, reason: str, now: datetime, causation: uuid.UUID | None) -> Append:
    data = AlertWithdrawn(
        alert_id=view.alert_id,
        kind=view.kind,
        severity=view.severity,
        audience=view.data.get("audience", "investigators"),
        subject_id=view.subject_id,
        site_id=view.site_id,
        title=str(view.data.get("title", view.kind)),
        reason=reason,
    )
    event = NewEvent(
        event_id=_event_id(view.alert_id, view.version + 1),
        type=ALERT_WITHDRAWN,
        subject_id=view.subject_id,
        occurred_at=now,
        recorded_by=RECORDED_BY,
        data=data.model_dump(mode="json"),
        causation_id=causation,
    )
    return Append(alert_stream(view.alert_id), view.version, event)


def plan(
    desired: Iterable[AlertRaised],
    existing: Mapping[uuid.UUID, AlertView],
    *,
    now: datetime,
    withdraw_reason: str,
    causation: uuid.UUID | None = None,
    held: Set[uuid.UUID] = frozenset(),
) -> list[Append]:
    """Raise what is desired and not open; withdraw what is open and no longer desired.

    ``existing`` must hold exactly the alerts of the scope being reconciled (one patient, or the
    stopping rules), so an alert of another scope is never withdrawn by accident. ``held`` are
    desired alerts not to raise yet (data entry has not settled); one already open stays open.
    """
    wanted = {alert.alert_id: alert for alert in desired}
    appends: list[Append] = []
    for alert_id, alert in wanted.items():
        view = existing.get(alert_id)
        if alert_id in held:
            continue
        if view is None:
            appends.append(_raise(alert, 0, now, causation))
        elif not view.is_open:
            appends.append(_raise(alert, view.version, now, causation))
    for alert_id, view in existing.items():
        if view.is_open and alert_id not in wanted:
            appends.append(_withdraw(view, withdraw_reason, now, causation))
    return appends
