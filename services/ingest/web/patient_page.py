"""``/patients/{subject_id}``: the timeline, windows, deviations and alerts of one patient."""

# No "from __future__ import annotations": FastAPI reads the routes' annotations at runtime.

import json
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.ext.asyncio import AsyncConnection

from services.ingest import auth, queries
from services.ingest.domain.errors import OtherSite, UnevaluableRecord, UnknownPatient
from services.ingest.web import timeline
from services.ingest.web.forms import OBSERVATION_BODIES
from services.ingest.web.pages import PageRefused, allowed, local, new_form_key, now, render
from services.ingest.web.sessions import WebSession
from shared.events import StoredEvent

router = APIRouter(include_in_schema=False)
Reader = Annotated[WebSession, Depends(allowed(auth.READ_PATIENTS))]
WINDOW_NAMES = {"day14": "2-week window", "day100": "100-day window"}
OPENS_WITH = {"day14": "Opens with the first blinatumomab dose", "day100": "Opens with the DLI"}


async def visible_history(conn: AsyncConnection, subject_id: str, session: WebSession) -> list[StoredEvent]:
    """The patient's stream; another site's patient is answered as an unknown one (404)."""
    try:
        return await queries.patient_history(conn, subject_id, site_scope=session.principal.site_scope, as_of=None)
    except (UnknownPatient, OtherSite):
        where = f" at site {session.principal.site_scope}" if session.principal.site_scope else ""
        raise PageRefused(404, f"No patient {subject_id} is enrolled{where}.") from None


def unevaluable(request: Request, session: WebSession, exc: UnevaluableRecord,
                history: list[StoredEvent]) -> Response:
    """The page of a patient whose record the rules cannot take: the failure named, the entries
    as recorded (no derived grades: nothing could be derived), the way to fix it (409)."""
    entries = [{"recorded": local(e.recorded_at, request), "type": e.type, "occurred": local(e.occurred_at, request),
                "recorded_by": e.recorded_by, "data": json.dumps(e.data, ensure_ascii=False)[:500]} for e in history]
    return render(request, "unevaluable.html.j2", status=409, subject_id=exc.subject_id, error=exc.error,
                  set_aside=exc.set_aside, entries=entries, may_record=session.principal.may(auth.RECORD_EVENT))


def window_rows(windows: dict[str, Any], today: date) -> list[dict[str, Any]]:
    rows = []
    for name, w in windows.items():
        day = None
        if w["start"] and w["end"] and date.fromisoformat(w["start"]) <= today <= date.fromisoformat(w["end"]):
            day = (today - date.fromisoformat(w["start"])).days + 1
        due = (f"{name.replace('day', 'Day ')} assessment due by {w['due']}" if w["due"] else
               OPENS_WITH.get(name, "Not open yet"))
        if w["status"] == "completed":
            due = f"{name.replace('day', 'Day ')} assessment done"
        elif w["status"] == "not_required":
            due = "No assessment required"
        rows.append({"name": WINDOW_NAMES.get(name, name), "status": w["status"].replace("_", " "), "day": day,
                     "start": w["start"], "end": w["end"], "due": due, "overdue": w["status"] == "overdue"})
    return rows


@router.get("/patients/{subject_id}", response_class=HTMLResponse)
async def patient(request: Request, session: Reader, subject_id: str) -> Response:
    protocol, moment = request.app.state.protocol, now(request)
    async with request.app.state.engine.connect() as conn:
        history = await visible_history(conn, subject_id, session)
        alerts = await queries.list_alerts(conn, site_scope=session.principal.site_scope, subject_id=subject_id,
                                           since=None, status=None)
        try:
            state = await queries.evaluated(conn, subject_id, history, protocol=protocol, now=moment)
        except UnevaluableRecord as exc:
            return unevaluable(request, session, exc, history)
    view = state.public()
    today = moment.astimezone(protocol.tz).date()
    return render(
        request, "patient.html.j2", patient=view, windows=window_rows(view["windows"], today),
        entries=timeline.entries(history, state.chart, lambda t: local(t, request)),
        alerts=[a.public() | {"raised_local": local(a.raised_at, request)} for a in alerts],
        event_types=list(OBSERVATION_BODIES), may_record=session.principal.may(auth.RECORD_EVENT),
        may_acknowledge=session.principal.may(auth.ACKNOWLEDGE_ALERT),
        form_key=new_form_key(), saved=request.query_params.get("saved", ""))
