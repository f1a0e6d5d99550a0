"""The read side of the API.

- A patient: its own stream folded per request (cost of one patient, whatever the trial's size;
  it answers what was just recorded, before the safety service has seen it) and its own alerts.
  A record the fold cannot take is answered as ``UnevaluableRecord`` (409), naming the failure.
- The stopping rules: the safety service's read model (``rule_inputs``), evaluated at the
  request's moment; nobody folds every patient to answer.
- Alerts: the alert log, narrowed to the patient asked about.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from services.ingest.domain.access import reachable_site, visible
from services.ingest.domain.errors import UnevaluableRecord
from shared.alert_log import AlertView, fold_alerts
from shared.clinical.patient import PatientState, fold_patient
from shared.clinical.stopping import RuleStatus, evaluate_inputs
from shared.events import ALERT_TYPES, PATIENT_ENROLLED, StoredEvent, patient_stream
from shared.patients import read_rule_inputs, set_aside_note, set_aside_subjects
from shared.protocol import Protocol
from shared.store import eventstore

log = logging.getLogger(__name__)


async def _history(conn: AsyncConnection, subject_id: str, site_scope: str | None,
                   as_of: datetime | None = None) -> list[StoredEvent]:
    history = await eventstore.read_stream(conn, patient_stream(subject_id))
    reachable_site(site_scope, subject_id, history)
    if as_of is not None:
        history = [e for e in history if e.recorded_at <= as_of]
    return history


async def patient_history(conn: AsyncConnection, subject_id: str, *, site_scope: str | None,
                          as_of: datetime | None) -> list[StoredEvent]:
    """Everything recorded about the patient, in recorded order; with ``as_of`` what was known then."""
    return await _history(conn, subject_id, site_scope, as_of)


async def _alerts(conn: AsyncConnection, subject_id: str | None = None) -> list[AlertView]:
    return list(fold_alerts(await eventstore.read_types(conn, ALERT_TYPES, subject_id=subject_id)).values())


async def patient_view(conn: AsyncConnection, subject_id: str, *, protocol: Protocol, now: datetime,
                       site_scope: str | None) -> dict[str, Any]:
    """The folded patient state, the patient's open alerts and the stream version (for If-Match)."""
    history = await _history(conn, subject_id, site_scope)
    state = await evaluated(conn, subject_id, history, protocol=protocol, now=now)
    open_alerts = [a for a in await _alerts(conn, subject_id) if a.subject_id == subject_id and a.is_open]
    open_alerts.sort(key=lambda a: a.raised_at, reverse=True)
    return state.public() | {
        "open_alerts": [a.public() for a in open_alerts],
        "stream_version": history[-1].stream_version,
    }


async def evaluated(conn: AsyncConnection, subject_id: str, history: list[StoredEvent], *, protocol: Protocol,
                    now: datetime) -> PatientState:
    """The patient's state folded from ``history``; a record the fold cannot take is the named
    ``UnevaluableRecord`` (with the safety service's set-aside note), not an unexpected error."""
    try:
        return fold_patient(history, protocol, now=now)
    except Exception as exc:  # the fold is pure: whatever it raises is about the record
        log.warning("patient %s cannot be evaluated: %s", subject_id, exc)
        raise UnevaluableRecord(subject_id, f"{type(exc).__name__}: {exc}"[:500],
                                await set_aside_note(conn, subject_id)) from exc


async def _sites(conn: AsyncConnection) -> dict[str, str]:
    return {str(e.subject_id): str(e.data["site_id"])
            for e in await eventstore.read_types(conn, [PATIENT_ENROLLED])}


async def list_alerts(conn: AsyncConnection, *, site_scope: str | None, subject_id: str | None,
                      since: datetime | None, status: str | None) -> list[AlertView]:
    """Alerts newest first (by when raised); a site's staff see only their site's patients' alerts.

    An alert without a site of its own (a trial-wide stopping rule) is the investigators' only;
    one naming a patient but no site takes the patient's site.
    """
    sites = await _sites(conn) if site_scope is not None else {}
    chosen = [
        a for a in await _alerts(conn, subject_id)
        if (subject_id is None or a.subject_id == subject_id)
        and (since is None or a.raised_at >= since)
        and (status is None or a.status == status)
        and visible(site_scope, a.site_id or sites.get(a.subject_id or ""))
    ]
    return sorted(chosen, key=lambda a: a.raised_at, reverse=True)


async def stopping_statuses(conn: AsyncConnection, *, protocol: Protocol, now: datetime) -> list[RuleStatus]:
    """Each stopping rule over the patients' rule inputs, at ``now`` (the API and the page alike)."""
    return evaluate_inputs(protocol, await read_rule_inputs(conn, now), now=now,
                           uncounted=await set_aside_subjects(conn))


async def stopping_rules(conn: AsyncConnection, *, protocol: Protocol, now: datetime) -> list[dict[str, Any]]:
    """Each stopping rule over the patients' rule inputs (evaluable, events, boundary, status)."""
    return [rule.public() for rule in await stopping_statuses(conn, protocol=protocol, now=now)]
