"""``/patients/{subject_id}/events/new?type=TYPE``: one form per event type, generated from the API's
body schema; a correction is the same form started from the entry it corrects. Retraction too.

Everything is stored through ``handlers.record_event``, the use case behind
``POST /v1/patients/{subject_id}/events``.
"""

# No "from __future__ import annotations": FastAPI reads the routes' annotations at runtime.

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ValidationError

from services.ingest import auth
from services.ingest.web import amendments, commands
from services.ingest.web.form_data import body_from_form, form_from_data, local_input, problems_of
from services.ingest.web.forms import OBSERVATION_BODIES, FormField, form_fields
from services.ingest.web.pages import PageRefused, allowed, checked_form, new_form_key, now, render, see_other
from services.ingest.web.patient_page import visible_history
from services.ingest.web.sessions import WebSession
from shared.events import Correction, Retraction, StoredEvent

router = APIRouter(include_in_schema=False)
Recorder = Annotated[WebSession, Depends(allowed(auth.RECORD_EVENT))]
AMENDMENTS = ("correction", "retraction")
DERIVED = frozenset({"grade", "severity", "scale", "stages"})
REASON = FormField("correction_reason", "Reason for the correction", "text", True, max_length=2000)


def _body_class(type_: str) -> type[BaseModel]:
    if type_ not in OBSERVATION_BODIES:
        raise PageRefused(404, f"There is no event type {type_!r}; choose one on the patient's page.")
    return OBSERVATION_BODIES[type_]


def _target(history: list[StoredEvent], corrects: str | None, type_: str) -> dict[str, Any] | None:
    """The data a correction starts from: the entry's latest live correction, else the entry."""
    if not corrects:
        return None
    target = next((e for e in history if str(e.event_id) == corrects and e.type == type_), None)
    if target is None:
        raise PageRefused(404, f"No {type_} entry {corrects} of this patient to correct.")
    retracted = {str(e.data.get("retracts_event_id")) for e in history if e.type == "retraction"}
    corrections = [e for e in history if e.type == "correction" and str(e.event_id) not in retracted
                   and str(e.data.get("corrects_event_id")) == corrects]
    latest = dict(corrections[-1].data["replacement"] if corrections else target.data)
    if latest.get("scale"):  # a derived grade: the form starts from the findings it came from
        latest = {k: v for k, v in latest.items() if k not in DERIVED}
    return latest | {"occurred_at": latest.get("occurred_at", target.occurred_at.isoformat())}


def _form(request: Request, subject_id: str, type_: str, corrects: str | None, *, values: dict[str, str],
          problems: commands.Problems | None = None, form_key: str | None = None, status: int = 200) -> Response:
    fields = form_fields(_body_class(type_))
    return render(request, "event_form.html.j2", status=status, subject_id=subject_id, type=type_,
                  fields=fields + ([REASON] if corrects else []), corrects=corrects or "", values=values,
                  problems=problems or {}, form_key=form_key or new_form_key(),
                  organ_scores=any(f.name.startswith("organ_scores") for f in fields))


@router.get("/patients/{subject_id}/events/new", response_class=HTMLResponse)
async def new_event(request: Request, session: Recorder, subject_id: str, type: str = "",
                    corrects: str | None = None) -> Response:
    if type in AMENDMENTS:
        return await amendments.new_amendment(request, session, subject_id, type, corrects)
    protocol = request.app.state.protocol
    fields = form_fields(_body_class(type))
    async with request.app.state.engine.connect() as conn:
        history = await visible_history(conn, subject_id, session)
    start = _target(history, corrects, type)
    values = (form_from_data(fields, start, protocol.tz) if start is not None
              else {"occurred_at": local_input(now(request), protocol.tz)})
    return _form(request, subject_id, type, corrects, values=values)


@router.post("/patients/{subject_id}/events/new", response_class=HTMLResponse)
async def save_event(request: Request, session: Recorder, subject_id: str, type: str = "") -> Response:
    if type == "retraction":
        return await amendments.save_retraction(request, session, subject_id)
    form = await checked_form(request, session)
    model, protocol = _body_class(type), request.app.state.protocol
    corrects = form.get("corrects") or None
    async with request.app.state.engine.connect() as conn:
        await visible_history(conn, subject_id, session)
    body = body_from_form(form_fields(model), form, protocol.tz) | {"type": type}
    reason = form.get(REASON.name, "")
    try:
        observed = model.model_validate(body)
        event: BaseModel = observed
        if corrects:
            event = Correction(type="correction", occurred_at=observed.occurred_at,  # type: ignore[attr-defined]
                               corrects_event_id=_uuid(corrects), reason=reason, replacement=observed)
        await commands.record_event(request, session, subject_id, event, form.get("form_key", ""),
                      body | {"corrects": corrects, REASON.name: reason})
    except ValidationError as exc:
        problems = _on_form(problems_of(exc), correction=bool(corrects) and exc.title == Correction.__name__)
    except commands.Refused as exc:
        problems = _on_form(exc.problems, correction=bool(corrects))
    else:
        return see_other(f"/patients/{subject_id}?saved={'correction' if corrects else type}")
    return _form(request, subject_id, type, corrects, values=form, problems=problems,
                 form_key=form.get("form_key"), status=422)


@router.post("/patients/{subject_id}/events/{event_id}/retract", response_class=HTMLResponse)
async def retract(request: Request, session: Recorder, subject_id: str, event_id: str) -> Response:
    form = await checked_form(request, session)
    async with request.app.state.engine.connect() as conn:
        await visible_history(conn, subject_id, session)
    body = {"type": "retraction", "retracts_event_id": event_id, "reason": form.get("reason", "")}
    try:
        retraction = Retraction.model_validate(body | {"occurred_at": now(request)})
        await commands.record_event(request, session, subject_id, retraction, form.get("form_key", ""), body)
    except (ValidationError, commands.Refused) as exc:
        problems = problems_of(exc) if isinstance(exc, ValidationError) else exc.problems
        message = "; ".join(f"{path}: {'; '.join(m)}" if path else "; ".join(m) for path, m in problems.items())
        raise PageRefused(422, f"The entry was not retracted: {message}. Go back and give a reason.") from None
    return see_other(f"/patients/{subject_id}?saved=retraction")


def _on_form(problems: commands.Problems, *, correction: bool) -> commands.Problems:
    """Problems by the form's field names: a correction's replacement is the form itself, its own
    reason the extra field, its target the form as a whole."""
    if not correction:
        return problems
    moved: commands.Problems = {}
    for path, messages in problems.items():
        name = (path.removeprefix("replacement.") if path.startswith("replacement.") else
                REASON.name if path == "reason" else "" if path in ("corrects_event_id", "replacement") else path)
        moved.setdefault(name, []).extend(messages)
    return moved


def _uuid(value: str) -> uuid.UUID | str:
    try:
        return uuid.UUID(value)
    except ValueError:
        return value
