"""What has been said about alerts: the alert streams folded into one view per alert.

An alert stream (``alert-<alert_id>``) holds, in order: raised (``safety_alert_raised`` or
``stopping_boundary_crossed``), then possibly withdrawn, raised again (a later correction brought
its cause back), acknowledged. The safety service diffs what it *would* raise against this view;
the API lists it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from shared.events import (
    ALERT_ACKNOWLEDGED,
    ALERT_RAISED,
    ALERT_WITHDRAWN,
    STOPPING_BOUNDARY_CROSSED,
    StoredEvent,
)


@dataclass(frozen=True)
class AlertView:
    alert_id: uuid.UUID
    kind: str
    severity: str
    subject_id: str | None
    site_id: str | None
    status: str  # open | withdrawn
    raised_at: datetime
    version: int  # the alert stream's version: the next append expects it
    data: dict[str, Any]
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    acknowledgement_note: str | None = None
    withdrawn_reason: str | None = None
    history: tuple[str, ...] = field(default=())

    @property
    def is_open(self) -> bool:
        return self.status == "open"

    def public(self) -> dict[str, Any]:
        return {
            "alert_id": str(self.alert_id),
            "kind": self.kind,
            "severity": self.severity,
            "subject_id": self.subject_id,
            "site_id": self.site_id,
            "status": self.status,
            "acknowledged": self.acknowledged_by is not None,
            "acknowledged_by": self.acknowledged_by,
            "acknowledged_at": self.acknowledged_at.isoformat() if self.acknowledged_at else None,
            "acknowledgement_note": self.acknowledgement_note,
            "raised_at": self.raised_at.isoformat(),
            "title": self.data.get("title"),
            "detail": self.data.get("detail"),
            "action": self.data.get("action"),
            "rule": self.data.get("rule"),
            "facts": self.data.get("facts", {}),
            "cause_event_ids": self.data.get("cause_event_ids", []),
            "withdrawn_reason": self.withdrawn_reason,
        }


def _apply(view: AlertView | None, event: StoredEvent, alert_id: uuid.UUID) -> AlertView | None:
    if event.type in (ALERT_RAISED, STOPPING_BOUNDARY_CROSSED):
        return AlertView(
            alert_id=alert_id,
            kind=event.data["kind"],
            severity=event.data["severity"],
            subject_id=event.data.get("subject_id"),
            site_id=event.data.get("site_id"),
            status="open",
            raised_at=event.recorded_at,
            version=event.stream_version,
            data=event.data,
            acknowledged_by=view.acknowledged_by if view else None,
            acknowledged_at=view.acknowledged_at if view else None,
            acknowledgement_note=view.acknowledgement_note if view else None,
            history=(view.history if view else ()) + ("raised",),
        )
    if view is None:
        return None
    if event.type == ALERT_WITHDRAWN:
        return replace(view, status="withdrawn", version=event.stream_version,
                       withdrawn_reason=event.data.get("reason"), history=view.history + ("withdrawn",))
    if event.type == ALERT_ACKNOWLEDGED:
        return replace(view, version=event.stream_version, acknowledged_by=event.recorded_by,
                       acknowledged_at=event.recorded_at, acknowledgement_note=event.data.get("note"), history=view.history + ("acknowledged",))
    return view


def fold_alerts(events: Iterable[StoredEvent]) -> dict[uuid.UUID, AlertView]:
    """Fold alert events (any order of streams, each stream in version order) by alert id."""
    views: dict[uuid.UUID, AlertView] = {}
    for event in sorted(events, key=lambda e: e.position):
        alert_id = uuid.UUID(str(event.data["alert_id"]))
        folded = _apply(views.get(alert_id), event, alert_id)
        if folded is not None:
            views[alert_id] = folded
    return views
