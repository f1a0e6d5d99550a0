"""What the routes take from a request: the caller, its permission, and the parsed headers."""

# No "from __future__ import annotations": FastAPI reads these closures' annotations at runtime.

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, TypeAdapter, ValidationError

from services.ingest.auth import Principal
from services.ingest.domain.errors import FieldProblem
from services.ingest.idempotency import MAX_KEY_LENGTH, IdempotencyKey, body_hash
from services.ingest.problems import Problem

_AWARE = TypeAdapter(AwareDatetime)
_UNESCAPED_PLUS = re.compile(r" (\d{2}(?::?\d{2})?)$")
_KEY = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_LENGTH}}}")
_VERSION = re.compile(r"[0-9]{1,18}")  # a stream version fits a 64-bit integer
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="trialwatch"'}
_bearer = HTTPBearer(auto_error=False, description="a token from `trialwatch token create`")


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

# Each route takes one dependency for its caller (FastAPI solves a tree of them on every request,
# a sixth of the API's CPU when the caller was three nested ones): the checks below are plain
# functions called from it, in the order the answers promise (401, then 403, then the key's 422).


@dataclass(frozen=True)
class Writer:
    """Who writes, the Idempotency-Key the write was sent with, and the stream version it is
    conditional on (If-Match); None for a header not sent."""

    principal: Principal
    key: IdempotencyKey | None
    expected_version: int | None = None


async def authenticated(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """The token's holder; no token or an unknown one is 401 with a Bearer challenge."""
    if credentials is None or not credentials.credentials.strip():
        raise Problem(401, "send Authorization: Bearer <token>", slug="unauthenticated", headers=CHALLENGE)
    principal: Principal | None = await request.app.state.principals.principal(credentials.credentials.strip())
    if principal is None:
        raise Problem(401, "the token is unknown, revoked or expired", slug="unauthenticated",
                      headers={"WWW-Authenticate": CHALLENGE["WWW-Authenticate"] + ', error="invalid_token"'})
    return principal


def _allowed(principal: Principal, action: str) -> Principal:
    if not principal.may(action):
        raise Problem(403, f"the {principal.role} role may not {action.replace('_', ' ')}", slug="forbidden")
    return principal


def permit(action: str) -> Callable[[Request, HTTPAuthorizationCredentials | None], Awaitable[Principal]]:
    """A dependency: the caller, if its role may do ``action`` (else 403)."""

    async def permitted(request: Request, credentials: Credentials) -> Principal:
        return _allowed(await authenticated(request, credentials), action)

    return permitted


# The writes (the ingest's hot path) read their headers themselves: a dependency with sub-dependencies
# and Header parameters cost a further sixth of a POST's CPU in FastAPI's solving alone. What those
# declarations put in the OpenAPI document, each write route adds with ``openapi_extra=WRITE_DOCS``
# (or ``CONDITIONAL_WRITE_DOCS``): the same header parameters and the same Bearer security.
def _header_doc(name: str, description: str) -> dict[str, Any]:
    return {"in": "header", "name": name, "required": False, "description": description,
            "schema": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": name}}


_IDEMPOTENCY_DOC = _header_doc("Idempotency-Key", "a retried write with the same key answers as the first did")
WRITE_DOCS: dict[str, Any] = {"parameters": [_IDEMPOTENCY_DOC], "security": [{_bearer.scheme_name: []}]}
CONDITIONAL_WRITE_DOCS: dict[str, Any] = {
    "parameters": [_IDEMPOTENCY_DOC,
                   _header_doc("If-Match", "the stream_version the caller last saw: 412 if it moved on")],
    "security": WRITE_DOCS["security"]}


def permit_write(action: str) -> Callable[[Request], Awaitable[Writer]]:
    """A dependency for a write: the caller if its role may do ``action`` (else 403), with the
    request's Idempotency-Key. Its route documents the headers with ``openapi_extra=WRITE_DOCS``."""

    async def permitted(request: Request) -> Writer:
        return await _writer(request, action)

    return permitted


def permit_conditional_write(action: str) -> Callable[[Request], Awaitable[Writer]]:
    """``permit_write`` for a write that may be conditional on the stream version (If-Match);
    its route has ``openapi_extra=CONDITIONAL_WRITE_DOCS``."""

    async def permitted(request: Request) -> Writer:
        writer = await _writer(request, action)
        return Writer(writer.principal, writer.key, if_match(request.headers.get("if-match")))

    return permitted


async def _writer(request: Request, action: str) -> Writer:
    principal = _allowed(await authenticated(request, await _bearer(request)), action)
    key = request.headers.get("idempotency-key")
    return Writer(principal, None if key is None else key_for(request, principal, key, await request.body()))


def key_for(request: Request, principal: Principal, key: str, body: bytes) -> IdempotencyKey:
    """The request's Idempotency-Key, over ``body`` as read (the bulk import reads its own, with a limit)."""
    if not _KEY.fullmatch(key):
        raise Problem(422, f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters", slug="validation",
                      title="Invalid request",
                      errors=[FieldProblem("Idempotency-Key", f"1-{MAX_KEY_LENGTH} printable ASCII characters")])
    return IdempotencyKey(key=key, token_hash=principal.token_hash,
                          method_path=f"{request.method} {request.url.path}",
                          body_hash=body_hash(body))


def if_match(value: str | None) -> int | None:
    """``If-Match: 3`` or an ETag-style ``"3"``: the stream version the caller last saw."""
    if value is None:
        return None
    version = value.strip().removeprefix("W/").strip('"')
    if not _VERSION.fullmatch(version):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise Problem(422, "If-Match must be a stream_version (a whole number)", slug="validation",
                      title="Invalid request", errors=[FieldProblem("If-Match", f"{shown!r} is not a stream_version")])
    return int(version)


def aware_time(name: str) -> Callable[[str | None], Awaitable[datetime | None]]:
    """A query parameter holding an ISO 8601 time with its offset (a naive time is refused).

    A ``+`` left unescaped in a query string arrives as a space; it is read back as ``+``.
    """

    async def parse(value: Annotated[str | None, Query(alias=name)] = None) -> datetime | None:
        if value is None:
            return None
        try:
            return _AWARE.validate_python(_UNESCAPED_PLUS.sub(r"+\1", value.strip()))
        except ValidationError as exc:
            message = exc.errors()[0]["msg"]
            raise Problem(422, f"{name}: {message}", slug="validation", title="Invalid request",
                          errors=[FieldProblem(name, f"{message} (ISO 8601 with an offset, e.g. "
                                                     "2025-11-24T09:30:00+08:00)")]) from exc

    return parse
