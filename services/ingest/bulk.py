"""The bulk import (``POST /v1/events:bulk``, CONTRACT.md section 2): NDJSON in, per-line results out.

- Each non-blank line is one JSON object: an enrolment body with ``"type": "enrolment"``, or an
  event body with its ``subject_id``. Lines are numbered from 1 as they appear (blank lines count
  but are skipped).
- Each line is checked as its single POST would be (the same models, the same use cases, a site's
  staff only their site's lines), in file order against the state the earlier lines create: an
  enrolment on line 1 and events for it on lines 2..n are accepted.
- The whole import is one job of the group commit: one transaction, one lock, one insert per table.
  Accepted lines are stored together or (should the store fail) not at all, so the request's
  Idempotency-Key, kept in the same transaction, covers exactly what was stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from services.ingest import bodies, handlers
from services.ingest.auth import ENROL, Principal
from services.ingest.domain.errors import (
    FieldProblem,
    Invalid,
    OtherSite,
    PatientExists,
    UnknownPatient,
    VersionMismatch,
)
from services.ingest.ledger import Ledger
from services.ingest.problems import field_problems
from shared.events import ClinicalEventBody, Enrolment
from shared.protocol import Protocol

MAX_LINES = 100_000
MAX_BYTES = 64 * 1024 * 1024
ENROLMENT = "enrolment"
_EVENT_BODY: TypeAdapter[Any] = TypeAdapter(ClinicalEventBody)

# A line's named error: its status and the field it is about (as its single POST would answer).
LINE_ERRORS: Mapping[type[Exception], tuple[int, str]] = {
    Invalid: (422, ""),
    UnknownPatient: (404, "subject_id"),
    OtherSite: (403, "subject_id"),
    PatientExists: (409, "subject_id"),
    VersionMismatch: (412, "subject_id"),
}


@dataclass(frozen=True)
class Rejected:
    line: int
    status: int
    errors: tuple[FieldProblem, ...]
    detail: str

    def public(self) -> dict[str, Any]:
        return {"line": self.line, "status": self.status, "detail": self.detail,
                "errors": [{"path": e.path, "message": e.message} for e in self.errors]}


@dataclass(frozen=True)
class Line:
    number: int
    command: handlers.Enrol | handlers.RecordEvent

    @property
    def subject_id(self) -> str:
        c = self.command
        return c.enrolment.subject_id if isinstance(c, handlers.Enrol) else c.subject_id


class TooLarge(Exception):
    """Over ``MAX_LINES`` lines or ``MAX_BYTES`` bytes: 413, nothing read further."""


def _invalid(number: int, problems: Sequence[FieldProblem], detail: str) -> Rejected:
    return Rejected(number, 422, tuple(problems), detail)


def parse_line(number: int, text: str, who: Principal) -> Line | Rejected:
    """One line into the command its single POST would run, or its 422 (or 403) naming each bad field."""
    try:  # the single POST's strict reader: no NaN, no repeated keys, no control characters
        body = bodies.parse(text.encode())
    except RequestValidationError as exc:
        problems = field_problems(exc.errors())
        return _invalid(number, problems, "the line is not valid JSON as a clinic writes it: "
                        + ", ".join(p.path or "(line)" for p in problems))
    if not isinstance(body, dict):
        return _invalid(number, [FieldProblem("", "a line must be one JSON object")], "the line is not a JSON object")
    try:
        if body.get("type") == ENROLMENT:
            if not who.may(ENROL):
                return Rejected(number, 403, (FieldProblem("type", f"the {who.role} role may not enrol"),),
                                f"the {who.role} role may not enrol")
            fields = {k: v for k, v in body.items() if k != "type"}
            return Line(number, handlers.Enrol(Enrolment.model_validate(fields), recorded_by=who.user,
                                               site_scope=who.site_scope))
        subject_id = body.pop("subject_id", None)
        if not isinstance(subject_id, str) or not subject_id:
            return _invalid(number, [FieldProblem("subject_id", "an event line needs the patient's subject_id "
                                                                "(an enrolment line needs \"type\": \"enrolment\")")],
                            "the line names no patient")
        return Line(number, handlers.RecordEvent(subject_id, _EVENT_BODY.validate_python(body),
                                                 recorded_by=who.user, site_scope=who.site_scope))
    except ValidationError as exc:
        problems = field_problems({**e, "loc": ("body", *e["loc"])} for e in exc.errors())
        return _invalid(number, problems, "the line is not valid: " + ", ".join(p.path or "(line)" for p in problems))


def parse(raw: bytes, who: Principal) -> list[Line | Rejected]:
    """Every non-blank line of an NDJSON body; ``TooLarge`` over the contract's limits."""
    if len(raw) > MAX_BYTES:
        raise TooLarge(f"the body is over {MAX_BYTES} bytes (64 MiB)")
    lines = raw.split(b"\n")
    numbered = [(i, chunk) for i, chunk in enumerate(lines, start=1) if chunk.strip()]
    if len(numbered) > MAX_LINES:
        raise TooLarge(f"the body has {len(numbered)} lines; at most {MAX_LINES} are taken at once")
    parsed: list[Line | Rejected] = []
    for number, chunk in numbered:
        try:
            text = chunk.decode()
        except UnicodeDecodeError:
            parsed.append(_invalid(number, [FieldProblem("", "not UTF-8")], "the line is not UTF-8"))
            continue
        parsed.append(parse_line(number, text, who))
    return parsed


@dataclass(frozen=True)
class Imported:
    accepted: int
    rejected: list[Rejected]
    types: tuple[str, ...]

    def public(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "rejected": [r.public() for r in self.rejected]}


def _rejected(number: int, exc: Exception) -> Rejected | None:
    for error_type, (status, path) in LINE_ERRORS.items():
        if isinstance(exc, error_type):
            problems = exc.problems if isinstance(exc, Invalid) else (FieldProblem(path, str(exc)),)
            return Rejected(number, status, tuple(problems), str(exc))
    return None


async def import_lines(ledger: Ledger, parsed: Sequence[Line | Rejected], *, protocol: Protocol,
                       now: datetime) -> Imported:
    """Run each parsed line's use case in order; a line that breaks a rule is named, the rest stored."""
    await ledger.prefetch({p.subject_id for p in parsed if isinstance(p, Line)})
    rejected, types = [], []
    for item in parsed:
        if isinstance(item, Rejected):
            rejected.append(item)
            continue
        try:
            if isinstance(item.command, handlers.Enrol):
                stored = await handlers.enrol(ledger, item.command, protocol=protocol, now=now)
            else:
                stored = await handlers.record_event(ledger, item.command, protocol=protocol, now=now)
        except Exception as exc:
            if (refused := _rejected(item.number, exc)) is None:
                raise
            rejected.append(refused)
            continue
        types.append(stored.type)
    return Imported(len(types), rejected, tuple(types))
