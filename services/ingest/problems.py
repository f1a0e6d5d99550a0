"""RFC 9457 problem details (``application/problem+json``) for every error the API answers.

Validation errors (422) carry ``errors``: one ``{"path", "message"}`` per bad field, the path
dotted from the body root (``eligibility.severe_infection``, ``replacement.grade``); query
parameters and headers are named as sent (``as_of``, ``If-Match``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import exc as sa
from starlette.exceptions import HTTPException

from services.ingest.domain.errors import FieldProblem, Invalid
from shared import events as schemas

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://trialwatch.invalid/problems/"
# SQLSTATE classes of a database that is away or busy, not of a request it refuses: connection
# exception, transaction rollback (serialization, deadlock), insufficient resources, operator
# intervention (shutdown, cannot connect now), system error.
TRANSIENT_SQLSTATES = ("08", "40", "53", "57", "58")
log = logging.getLogger(__name__)


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": {
            "type": "object", "required": ["path", "message"],
            "properties": {"path": {"type": "string"}, "message": {"type": "string"}}}},
    },
}
MEANING = {
    401: "no token, or an unknown or revoked one",
    403: "the token's role may not do this (or a site's staff name another site)",
    404: "no such patient or alert (another site's patient answers so too)",
    409: "the patient is already enrolled, or a concurrent write came first; on reading a patient: its stored "
         "record cannot be evaluated (the detail names why; a correction or retraction fixes it)",
    412: "If-Match names another stream_version; nothing was stored",
    422: "a field, parameter or header is invalid; `errors` names each",
    503: "the store cannot be reached; retry after Retry-After seconds",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for problem answers: each status with its meaning, as problem+json."""
    return {status: {"description": MEANING.get(status, HTTPStatus(status).phrase),
                     "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}} for status in statuses}


def problem(status: int, detail: str, *, slug: str | None = None, title: str | None = None,
            errors: Sequence[FieldProblem] = (), headers: Mapping[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_BASE + slug if slug else "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = [{"path": e.path, "message": e.message} for e in errors]
    return JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_JSON)


class Problem(Exception):
    """Raised by the entrypoint for answers that are not a use case's named error (401, 403...)."""

    def __init__(self, status: int, detail: str, *, slug: str | None = None, title: str | None = None,
                 errors: Sequence[FieldProblem] = (), headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.slug, self.title = status, detail, slug, title
        self.errors, self.headers = tuple(errors), headers

    def response(self) -> JSONResponse:
        return problem(self.status, self.detail, slug=self.slug, title=self.title, errors=self.errors,
                       headers=self.headers)


@dataclass(frozen=True)
class Known:
    """How a named use-case error is answered."""

    status: int
    slug: str
    title: str


# --------------------------------------------------------------------------- validation paths

def _model_fields() -> frozenset[str]:
    names: set[str] = set()
    for value in vars(schemas).values():
        if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == schemas.__name__:
            names |= set(value.model_fields)
    return frozenset(names)


FIELD_NAMES = _model_fields()
_WORD = re.compile(r"[a-z_][a-z0-9_]*")


def _body_path(loc: Sequence[Any]) -> list[str]:
    """Drop the discriminator tags pydantic puts in a union's location (``crs``, ``lab``...)."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int) and not parts:
            continue  # a JSON decode error's character position
        if item in schemas.CLINICAL_TYPES and (not parts or parts[-1] == "replacement"):
            continue
        parts.append(str(item))
    return parts


def field_problem(error: Mapping[str, Any]) -> FieldProblem:
    loc = list(error.get("loc", ()))
    where = loc[0] if loc else "body"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if where != "body":
        return FieldProblem(".".join(str(p) for p in loc[1:]), message)
    parts = _body_path(loc[1:])
    kind = error.get("type", "")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        parts.append("type")
    elif kind == "value_error":
        # A rule over several fields: name the first field its message mentions.
        named = next((w for w in _WORD.findall(message) if w in FIELD_NAMES), None)
        if named:
            parts.append(named)
    return FieldProblem(".".join(parts), message)


def field_problems(errors: Iterable[Mapping[str, Any]]) -> list[FieldProblem]:
    found: list[FieldProblem] = []
    for error in errors:
        item = field_problem(error)
        if item not in found:
            found.append(item)
    return found


def is_json(content_type: str | None) -> bool:
    """``application/json`` or a ``+json`` type, parameters (``charset``) aside."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def content_type_problem(content_type: str | None, errors: Iterable[Mapping[str, Any]]) -> FieldProblem | None:
    """A body FastAPI did not read as JSON (its Content-Type is not JSON) fails as "not a dictionary";
    say what is wrong instead: the request, not its fields."""
    if is_json(content_type) or not any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors):
        return None
    sent = f"Content-Type: {content_type}" if content_type else "no Content-Type"
    return FieldProblem("", f"the body must be JSON sent with Content-Type: application/json; this request "
                            f"was sent with {sent}")


# --------------------------------------------------------------------------- store errors

def _causes(error: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__


def _sqlstate(error: BaseException) -> str:
    return next((str(s) for e in _causes(error) if (s := getattr(e, "sqlstate", None) or getattr(e, "pgcode", None))),
                "")


def store_unavailable(error: BaseException) -> bool:
    """Whether ``error`` says the store is away or busy (a retry can succeed): lost or refused
    connections, timeouts, a locked or shut-down database. A value the store refuses is not."""
    if isinstance(error, (sa.TimeoutError, sa.DisconnectionError, sa.OperationalError, sa.InterfaceError)):
        return True
    if isinstance(error, sa.DBAPIError) and error.connection_invalidated:
        return True
    if _sqlstate(error).startswith(TRANSIENT_SQLSTATES):
        return True
    return any(isinstance(e, (OSError, TimeoutError)) for e in _causes(error))


def store_refused_data(error: BaseException) -> bool:
    """Whether the store refused a value of the request (SQLSTATE class 22: a NUL in text, a number
    out of the column's range...). Validation should have caught it first."""
    return isinstance(error, sa.DataError) or _sqlstate(error).startswith("22")


# --------------------------------------------------------------------------- handlers

def install(app: FastAPI, known: Mapping[type[Exception], Known]) -> None:
    """Answer every error as problem+json: named use-case errors by ``known``, the rest by kind."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return exc.response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = field_problems(exc.errors())
        if not_json := content_type_problem(request.headers.get("content-type"), exc.errors()):
            return problem(422, not_json.message, slug="validation", title="Invalid request", errors=[not_json])
        return problem(422, "the request is not valid: " + ", ".join(e.path or "(body)" for e in errors),
                       slug="validation", title="Invalid request", errors=errors)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return problem(exc.status_code, str(exc.detail), headers=exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "an unexpected error; it has been logged", slug="internal")

    async def on_store(request: Request, exc: Exception) -> JSONResponse:
        """Only a store that is away or busy is a 503 (clients retry it); a data error never is."""
        if store_unavailable(exc):
            log.warning("store unavailable: %s", exc)
            return problem(503, "the event store cannot be reached; try again shortly", slug="store-unavailable",
                           title="Store unavailable", headers={"Retry-After": "5"})
        if store_refused_data(exc):
            log.error("the store refused a value that passed validation on %s %s: %s", request.method,
                      request.url.path, exc)
            return problem(422, "the store cannot hold a value of this request; nothing was stored",
                           slug="unstorable", title="Invalid request")
        return await on_unexpected(request, exc)

    def on_known(entry: Known):  # type: ignore[no-untyped-def]
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            errors = exc.problems if isinstance(exc, Invalid) else ()
            return problem(entry.status, str(exc), slug=entry.slug, title=entry.title, errors=errors)
        return handle

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    for error_type in (sa.SQLAlchemyError, OSError, TimeoutError):
        app.add_exception_handler(error_type, on_store)
    for known_type, entry in known.items():
        app.add_exception_handler(known_type, on_known(entry))
    app.add_exception_handler(Exception, on_unexpected)
