"""``/patients``: the signed-in site's patients, and enrolment from a form generated from ``Enrolment``."""

# No "from __future__ import annotations": FastAPI reads the routes' annotations at runtime.

from collections import Counter
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from services.ingest import auth, handlers, queries
from services.ingest.idempotency import Answer
from services.ingest.web import commands
from services.ingest.web.form_data import body_from_form, problems_of
from services.ingest.web.forms import form_fields
from services.ingest.web.pages import allowed, checked_form, new_form_key, now, render, see_other
from services.ingest.web.sessions import WebSession
from shared.events import Enrolment
from shared.patients import Listed, list_patients

router = APIRouter(include_in_schema=False)
Reader = Annotated[WebSession, Depends(allowed(auth.READ_PATIENTS))]
Enroller = Annotated[WebSession, Depends(allowed(auth.ENROL))]
ENROLMENT_FIELDS = form_fields(Enrolment)


def window_words(window: dict[str, Any], today: date) -> str:
    """Where today falls in a window ("day 5 of 14"), or its status in words."""
    status: str = window["status"].replace("_", " ")
    if window["start"] and window["end"] and status == "open":
        start, end = date.fromisoformat(window["start"]), date.fromisoformat(window["end"])
        if start <= today <= end:
            return f"day {(today - start).days + 1} of {(end - start).days + 1}"
    if status in ("awaiting assessment", "overdue") and window["due"]:
        return f"{status} (due {window['due']})"
    return status


def _row(patient: Listed, today: date) -> dict[str, Any]:
    """The safety service's last evaluation of the patient; before the first, its enrolment."""
    if patient.state is None:
        enrolment = patient.enrolment or {}
        view = {"subject_id": patient.subject_id, "site_id": patient.site_id, "arm": enrolment.get("arm", ""),
                "cohort": enrolment.get("cohort", ""), "windows": {},
                "status": "not_evaluated" if patient.failure else "awaiting_evaluation"}
    else:
        view = patient.state
    return view | {"failure": patient.failure,
                   "window_words": {n: window_words(w, today) for n, w in view["windows"].items()}}


async def _rows(request: Request, session: WebSession) -> list[dict[str, Any]]:
    """Read from the safety service's read models (``list_patients``), not folded here: the page
    costs one row per patient, however long their histories."""
    scope, moment = session.principal.site_scope, now(request)
    async with request.app.state.engine.connect() as conn:
        patients = await list_patients(conn, site_id=scope)
        alerts = await queries.list_alerts(conn, site_scope=scope, subject_id=None, since=None, status="open")
    open_alerts = Counter(a.subject_id for a in alerts if a.acknowledged_by is None)
    today = moment.astimezone(request.app.state.protocol.tz).date()
    return [_row(p, today) | {"open_alerts": open_alerts.get(p.subject_id, 0)} for p in patients]


async def _page(request: Request, session: WebSession, *, values: dict[str, str] | None = None,
                problems: commands.Problems | None = None, form_key: str | None = None,
                status: int = 200) -> Response:
    defaults = {"site_id": session.principal.site_id or "", "arm": "blinatumomab_dli"}
    return render(request, "patients.html.j2", status=status, patients=await _rows(request, session),
                  fields=ENROLMENT_FIELDS, values=values or defaults, problems=problems or {},
                  form_key=form_key or new_form_key(), may_enrol=session.principal.may(auth.ENROL))


@router.get("/patients", response_class=HTMLResponse)
async def patients(request: Request, session: Reader) -> Response:
    return await _page(request, session)


@router.post("/patients", response_class=HTMLResponse)
async def enrol(request: Request, session: Enroller) -> Response:
    form = await checked_form(request, session)
    protocol, moment = request.app.state.protocol, now(request)
    body = body_from_form(ENROLMENT_FIELDS, form, protocol.tz)
    try:
        enrolment = Enrolment.model_validate(body)
        cmd = handlers.Enrol(enrolment, recorded_by=session.principal.user, site_scope=session.principal.site_scope)
        await commands.run(request, session, form.get("form_key", ""), body,
                           lambda ledger: handlers.enrol(ledger, cmd, protocol=protocol, now=moment),
                           lambda stored: Answer(201, stored.public(), recorded=(stored.type,)),
                           subject_id=enrolment.subject_id)
    except ValidationError as exc:
        return await _page(request, session, values=form, problems=problems_of(exc),
                           form_key=form.get("form_key"), status=422)
    except commands.Refused as exc:
        return await _page(request, session, values=form, problems=exc.problems,
                           form_key=form.get("form_key"), status=422)
    return see_other(f"/patients/{enrolment.subject_id}?saved=enrolment")
