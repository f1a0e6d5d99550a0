"""``?type=correction`` and ``?type=retraction``: amending an entry chosen from the patient's
history (the timeline links straight to both for each entry).

A correction's form is the corrected entry's own form, so choosing the entry comes first; a
retraction's form is generated from ``Retraction`` with the entry to retract as a select.
"""

# No "from __future__ import annotations": FastAPI reads the routes' annotations at runtime.

from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from services.ingest.domain.acceptance import retracted_ids
from services.ingest.web import commands
from services.ingest.web.form_data import body_from_form, local_input, problems_of
from services.ingest.web.forms import FormField, form_fields
from services.ingest.web.labels import event_words
from services.ingest.web.pages import PageRefused, checked_form, local, new_form_key, now, render, see_other
from services.ingest.web.patient_page import visible_history
from services.ingest.web.sessions import WebSession
from shared.events import OBSERVATION_TYPES, Retraction, StoredEvent


def entry_choices(request: Request, history: list[StoredEvent], types: frozenset[str]) -> dict[str, Any]:
    """A select's options for the live entries of these types, newest first."""
    retracted = retracted_ids(history)
    live = [e for e in reversed(history) if e.type in types and str(e.event_id) not in retracted]
    words = [f"{event_words(e.type)}, {local(e.occurred_at, request)} (entry {str(e.event_id)[:8]})" for e in live]
    return {"options": tuple(zip((str(e.event_id) for e in live), words)),
            "choices": tuple(str(e.event_id) for e in live)}


def retraction_fields(request: Request, history: list[StoredEvent]) -> list[FormField]:
    choices = entry_choices(request, history, OBSERVATION_TYPES | {"correction"})
    return [replace(f, kind="select", **choices) if f.name == "retracts_event_id" else f
            for f in form_fields(Retraction)]


async def _history(request: Request, session: WebSession, subject_id: str) -> list[StoredEvent]:
    async with request.app.state.engine.connect() as conn:
        return await visible_history(conn, subject_id, session)


def _retraction_form(request: Request, subject_id: str, fields: list[FormField], values: dict[str, str], *,
                     problems: commands.Problems | None = None, form_key: str | None = None,
                     status: int = 200) -> Response:
    return render(request, "event_form.html.j2", status=status, subject_id=subject_id, type="retraction",
                  fields=fields, corrects="", values=values, problems=problems or {},
                  form_key=form_key or new_form_key(), organ_scores=False)


async def new_amendment(request: Request, session: WebSession, subject_id: str, type_: str,
                        corrects: str | None) -> Response:
    history = await _history(request, session, subject_id)
    if type_ == "retraction":
        values = {"occurred_at": local_input(now(request), request.app.state.protocol.tz)}
        return _retraction_form(request, subject_id, retraction_fields(request, history), values)
    if corrects:
        target = next((e for e in history if str(e.event_id) == corrects and e.type in OBSERVATION_TYPES), None)
        if target is None:
            raise PageRefused(404, f"No entry {corrects} of this patient to correct.")
        return see_other(f"/patients/{subject_id}/events/new?type={target.type}&corrects={corrects}")
    choices = entry_choices(request, history, OBSERVATION_TYPES)
    chooser = FormField("corrects", "Entry to correct", "select", True, **choices)
    return render(request, "choose_entry.html.j2", subject_id=subject_id, chooser=chooser)


async def save_retraction(request: Request, session: WebSession, subject_id: str) -> Response:
    form = await checked_form(request, session)
    fields = retraction_fields(request, await _history(request, session, subject_id))
    body = body_from_form(fields, form, request.app.state.protocol.tz) | {"type": "retraction"}
    try:
        retraction = Retraction.model_validate(body)
        await commands.record_event(request, session, subject_id, retraction, form.get("form_key", ""), body)
    except ValidationError as exc:
        problems = problems_of(exc)
    except commands.Refused as exc:
        problems = exc.problems
    else:
        return see_other(f"/patients/{subject_id}?saved=retraction")
    return _retraction_form(request, subject_id, fields, form, problems=problems, form_key=form.get("form_key"),
                            status=422)
