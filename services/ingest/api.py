"""The HTTP entrypoint (CONTRACT.md section 2): parse, build a command, run it, answer.

Named use-case errors become status codes in ``KNOWN_ERRORS``; everything else about errors
lives in ``problems.py``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.ingest import auth, bulk, handlers, queries
from services.ingest.auth import Principal
from services.ingest.bodies import StrictJsonRoute
from services.ingest.dependencies import (
    CONDITIONAL_WRITE_DOCS,
    WRITE_DOCS,
    Writer,
    aware_time,
    key_for,
    permit,
    permit_conditional_write,
    permit_write,
)
from services.ingest.domain.errors import (
    FieldProblem,
    Invalid,
    OtherSite,
    PatientExists,
    UnevaluableRecord,
    UnknownAlert,
    UnknownPatient,
    VersionMismatch,
)
from services.ingest.idempotency import Answer, KeyReused
from services.ingest.problems import Known, Problem, documented
from services.ingest.unit_of_work import UnitOfWork
from shared.events import SUBJECT_ID_PATTERN, ClinicalEventBody, Enrolment, StoredEvent
from shared.store.eventstore import DuplicateEvent

KNOWN_ERRORS = {
    Invalid: Known(422, "validation", "Invalid request"),
    KeyReused: Known(422, "idempotency-key-reused", "Idempotency-Key reused"),
    UnknownPatient: Known(404, "unknown-patient", "Unknown patient"),
    UnknownAlert: Known(404, "unknown-alert", "Unknown alert"),
    PatientExists: Known(409, "patient-exists", "Patient already enrolled"),
    OtherSite: Known(403, "other-site", "Another site's patient"),
    VersionMismatch: Known(412, "version-mismatch", "Stream version mismatch"),
    DuplicateEvent: Known(409, "concurrent-write", "Concurrent write"),
    UnevaluableRecord: Known(409, "record-cannot-be-evaluated", "The patient's record cannot be evaluated"),
}

router = APIRouter(prefix="/v1", route_class=StrictJsonRoute, responses=documented(401, 403, 503))
Enroller = Annotated[Writer, Depends(permit_write(auth.ENROL))]
Recorder = Annotated[Writer, Depends(permit_conditional_write(auth.RECORD_EVENT))]
Importer = Annotated[Principal, Depends(permit(auth.RECORD_EVENT))]  # the bulk import reads its own key
PatientReader = Annotated[Principal, Depends(permit(auth.READ_PATIENTS))]
AlertReader = Annotated[Principal, Depends(permit(auth.READ_ALERTS))]
Acknowledger = Annotated[Writer, Depends(permit_write(auth.ACKNOWLEDGE_ALERT))]
RuleReader = Annotated[Principal, Depends(permit(auth.READ_STOPPING_RULES))]
DigestRequester = Annotated[Writer, Depends(permit_write(auth.REQUEST_DIGEST))]
AsOf = Annotated[datetime | None, Depends(aware_time("as_of"))]
Since = Annotated[datetime | None, Depends(aware_time("since"))]
Subject = Annotated[str, Path(pattern=SUBJECT_ID_PATTERN, description="1-32 letters, digits or -")]


class AcknowledgeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str | None = Field(default=None, max_length=2000)


def _uow(request: Request) -> UnitOfWork:
    return request.app.state.uow  # type: ignore[no-any-return]


def _now(request: Request) -> datetime:
    return request.app.state.clock()  # type: ignore[no-any-return]


def _answer(answer: Answer) -> JSONResponse:
    headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
    return JSONResponse(answer.body, status_code=answer.status, headers=headers)


def _created(stored: StoredEvent) -> Answer:
    return Answer(201, stored.public(), recorded=(stored.type,))


def _acknowledged(done: handlers.Acknowledged) -> Answer:
    return Answer(200, done.view.public(), recorded=(done.event.type,) if done.event else ())


def _accepted(stored: StoredEvent) -> Answer:
    return Answer(202, {"status": "accepted", "request_id": str(stored.event_id)}, recorded=(stored.type,))


@router.post("/patients", status_code=201, summary="Enrol a patient", responses=documented(409, 422),
             openapi_extra=WRITE_DOCS)
async def enrol(request: Request, who: Enroller, body: Enrolment) -> JSONResponse:
    cmd = handlers.Enrol(body, recorded_by=who.principal.user, site_scope=who.principal.site_scope)
    protocol, now = request.app.state.protocol, _now(request)
    return _answer(await _uow(request).write(
        lambda ledger: handlers.enrol(ledger, cmd, protocol=protocol, now=now), _created, who.key,
        subjects=(body.subject_id,)))


@router.post("/patients/{subject_id}/events", status_code=201, summary="Record one clinical event",
             responses=documented(404, 409, 412, 422), openapi_extra=CONDITIONAL_WRITE_DOCS)
async def record_event(request: Request, who: Recorder, subject_id: Subject, body: ClinicalEventBody) -> JSONResponse:
    cmd = handlers.RecordEvent(subject_id, body, recorded_by=who.principal.user,
                               site_scope=who.principal.site_scope, expected_version=who.expected_version)
    protocol, now = request.app.state.protocol, _now(request)
    return _answer(await _uow(request).write(
        lambda ledger: handlers.record_event(ledger, cmd, protocol=protocol, now=now), _created, who.key,
        subjects=(subject_id,)))


NDJSON = "application/x-ndjson"


async def _limited_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it is known to be over the bulk import's 64 MiB."""
    too_large = Problem(413, f"a bulk import takes at most {bulk.MAX_BYTES} bytes (64 MiB) and "
                             f"{bulk.MAX_LINES} lines; split the file", slug="too-large")
    if int(request.headers.get("content-length") or 0) > bulk.MAX_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > bulk.MAX_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/events:bulk", summary="Import many records at once (NDJSON, one result per line)",
             responses=documented(413, 415, 422),
             openapi_extra={"requestBody": {"content": {NDJSON: {"schema": {"type": "string"}}}, "required": True}})
async def bulk_import(request: Request, who: Importer,
                      idempotency: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> JSONResponse:
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media != NDJSON:
        raise Problem(415, f"send the lines as Content-Type: {NDJSON} (one JSON object a line), not "
                           f"{media or 'no Content-Type'}", slug="unsupported-media-type",
                      errors=[FieldProblem("Content-Type", f"must be {NDJSON}")])
    raw = await _limited_body(request)
    key = key_for(request, who, idempotency, raw) if idempotency is not None else None
    try:
        parsed = bulk.parse(raw, who)
    except bulk.TooLarge as exc:
        raise Problem(413, f"{exc}; split the file", slug="too-large") from exc
    protocol, now = request.app.state.protocol, _now(request)

    def present(done: bulk.Imported) -> Answer:
        return Answer(200, done.public(), recorded=done.types)

    return _answer(await _uow(request).write(
        lambda ledger: bulk.import_lines(ledger, parsed, protocol=protocol, now=now), present, key))


@router.get("/patients/{subject_id}", summary="The patient's current state", responses=documented(404, 409, 422))
async def patient(request: Request, who: PatientReader, response: Response, subject_id: Subject) -> dict[str, Any]:
    async with request.app.state.engine.connect() as conn:
        view = await queries.patient_view(conn, subject_id, protocol=request.app.state.protocol,
                                          now=_now(request), site_scope=who.site_scope)
    response.headers["ETag"] = f'"{view["stream_version"]}"'
    return view


@router.get("/patients/{subject_id}/events", summary="The patient's full history, corrections included",
            responses=documented(404, 422))
async def patient_events(request: Request, who: PatientReader, subject_id: Subject, as_of: AsOf) -> dict[str, Any]:
    async with request.app.state.engine.connect() as conn:
        history = await queries.patient_history(conn, subject_id, site_scope=who.site_scope, as_of=as_of)
    return {"subject_id": subject_id, "events": [e.public() for e in history]}


@router.get("/alerts", summary="Alerts, newest first", responses=documented(422))
async def alerts(request: Request, who: AlertReader, since: Since,
                 subject_id: Annotated[str | None, Query(pattern=SUBJECT_ID_PATTERN)] = None,
                 status: Literal["open", "withdrawn"] | None = None) -> dict[str, Any]:
    async with request.app.state.engine.connect() as conn:
        found = await queries.list_alerts(conn, site_scope=who.site_scope, subject_id=subject_id,
                                          since=since, status=status)
    return {"alerts": [a.public() for a in found]}


@router.post("/alerts/{alert_id}/acknowledge", summary="Acknowledge an alert", responses=documented(404, 422),
             openapi_extra=WRITE_DOCS)
async def acknowledge(request: Request, who: Acknowledger, alert_id: uuid.UUID,
                      body: AcknowledgeBody | None = None) -> JSONResponse:
    cmd = handlers.AcknowledgeAlert(alert_id, body.note if body else None, acknowledged_by=who.principal.user)
    now = _now(request)
    return _answer(await _uow(request).run(
        lambda conn: handlers.acknowledge_alert(conn, cmd, now=now), _acknowledged, who.key))


@router.get("/stopping-rules", summary="Each stopping rule against its boundary")
async def stopping_rules(request: Request, who: RuleReader) -> dict[str, Any]:
    async with request.app.state.engine.connect() as conn:
        rules = await queries.stopping_rules(conn, protocol=request.app.state.protocol, now=_now(request))
    return {"rules": rules}


@router.post("/digests", status_code=202, summary="Send the DSMB summary now", responses=documented(422),
             openapi_extra=WRITE_DOCS)
async def digest(request: Request, who: DigestRequester) -> JSONResponse:
    cmd, now = handlers.RequestDigest(requested_by=who.principal.user), _now(request)
    return _answer(await _uow(request).run(
        lambda conn: handlers.request_digest(conn, cmd, now=now), _accepted, who.key))
