"""``/alerts`` (filters, acknowledgement with a note) and ``/stopping-rules`` (the DSMB's page)."""

# No "from __future__ import annotations": FastAPI reads the routes' annotations at runtime.

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup

from services.ingest import auth, handlers, queries
from services.ingest.domain.errors import UnknownAlert
from services.ingest.idempotency import Answer
from services.ingest.web.chart_svg import boundary_svg
from services.ingest.web.pages import (
    PageRefused,
    allowed,
    checked_form,
    local,
    now,
    query,
    render,
    safe_next,
    see_other,
)
from services.ingest.web.sessions import WebSession
from shared.events import PATIENT_ENROLLED
from shared.store import eventstore

router = APIRouter(include_in_schema=False)
AlertReader = Annotated[WebSession, Depends(allowed(auth.READ_ALERTS))]
Acknowledger = Annotated[WebSession, Depends(allowed(auth.ACKNOWLEDGE_ALERT))]
RuleReader = Annotated[WebSession, Depends(allowed(auth.READ_STOPPING_RULES))]
SEVERITIES = ("urgent", "high", "info")
STATUSES = ("open", "withdrawn")


def _choice(value: str | None, allowed: tuple[str, ...] | list[str]) -> str | None:
    return value if value in allowed else None


@router.get("/alerts", response_class=HTMLResponse)
async def alerts(request: Request, session: AlertReader, severity: str | None = None, status: str | None = None,
                 site: str | None = None, subject_id: str | None = None) -> Response:
    own_site = session.principal.site_scope
    async with request.app.state.engine.connect() as conn:
        sites = sorted({str(e.data["site_id"]) for e in await eventstore.read_types(conn, [PATIENT_ENROLLED])})
        chosen_site = own_site or _choice(site, sites)
        found = await queries.list_alerts(conn, site_scope=chosen_site, subject_id=subject_id or None, since=None,
                                          status=_choice(status, STATUSES))
    chosen = {"severity": _choice(severity, SEVERITIES), "status": _choice(status, STATUSES),
              "site": chosen_site if not own_site else None, "subject_id": subject_id or None}
    shown = [a.public() | {"raised_local": local(a.raised_at, request),
                           "acknowledged_local": local(a.acknowledged_at, request)}
             for a in found if chosen["severity"] in (None, a.severity)]
    here = "/alerts" + (f"?{q}" if (q := query(chosen)) else "")
    return render(request, "alerts.html.j2", alerts=shown, sites=sites if not own_site else [], chosen=chosen,
                  severities=SEVERITIES, statuses=STATUSES, here=here,
                  may_acknowledge=session.principal.may(auth.ACKNOWLEDGE_ALERT),
                  may_read_patients=session.principal.may(auth.READ_PATIENTS))


@router.post("/alerts/{alert_id}/acknowledge", response_class=HTMLResponse)
async def acknowledge(request: Request, session: Acknowledger, alert_id: uuid.UUID) -> Response:
    """The use case behind ``POST /v1/alerts/{alert_id}/acknowledge``: once, with the note."""
    form = await checked_form(request, session)
    note = form.get("note", "").strip()[:2000] or None
    cmd = handlers.AcknowledgeAlert(alert_id, note, acknowledged_by=session.principal.user)
    moment = now(request)
    try:
        await request.app.state.uow.run(lambda conn: handlers.acknowledge_alert(conn, cmd, now=moment),
                                        lambda done: Answer(200, done.view.public()))
    except UnknownAlert:
        raise PageRefused(404, f"No alert {alert_id}.") from None
    back = safe_next(form.get("back"), "/alerts")
    return see_other(back + ("&" if "?" in back else "?") + f"acknowledged={alert_id}#alert-{alert_id}")


def boundary_ranges(boundary: list[dict[str, int | None]]) -> list[dict[str, int | None]]:
    """Consecutive looks with the same stopping count as one row: {"first", "last", "stop_at"}."""
    ranges: list[dict[str, int | None]] = []
    for look in boundary:
        if ranges and ranges[-1]["stop_at"] == look["stop_at"]:
            ranges[-1]["last"] = look["n"]
        else:
            ranges.append({"first": look["n"], "last": look["n"], "stop_at": look["stop_at"]})
    return ranges


@router.get("/stopping-rules", response_class=HTMLResponse)
async def stopping_rules(request: Request, session: RuleReader) -> Response:
    """The rules as the API answers them: over the rows each patient's evaluation wrote (``rule_inputs``)."""
    async with request.app.state.engine.connect() as conn:
        statuses = await queries.stopping_statuses(conn, protocol=request.app.state.protocol, now=now(request))
    rules = []
    for status in statuses:
        public = status.public()
        chart = boundary_svg(public["boundary"], status.path, crossed=status.crossed,
                             title=f"{status.rule.title}: {status.events} events in {status.evaluable} "
                                   f"evaluable patients against the stopping boundary")
        rules.append(public | {"uncounted": len(status.uncounted), "chart": Markup(chart), "ranges": boundary_ranges(public["boundary"]),  # our own SVG
                               "params_words": ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in public["params"].items())})
    return render(request, "stopping_rules.html.j2", rules=rules)
