"""Running a page's command through the API's own use cases and unit of work.

A rendered form carries a key; its submissions share it as an Idempotency-Key (scoped to the
signed-in token, like the API's), so a double submit stores one event and answers the first
result again. A refusal is turned into messages by field path, for the form to show beside
its fields.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from services.ingest import handlers
from services.ingest.domain.errors import Invalid, OtherSite, PatientExists, UnknownPatient, VersionMismatch
from services.ingest.idempotency import Answer, IdempotencyKey, KeyReused, body_hash
from services.ingest.ledger import Ledger
from services.ingest.web.sessions import WebSession
from shared.store.eventstore import DuplicateEvent

Problems = dict[str, list[str]]


class Refused(Exception):
    """The use case refused the command; ``problems`` by field path ('' for the whole form)."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        super().__init__(problems)


async def run(request: Request, session: WebSession, form_key: str, body: dict[str, Any],
              work: Callable[[Ledger], Awaitable[Any]], present: Callable[[Any], Answer], *,
              subject_id: str) -> Answer:
    """Run ``work`` in the group commit (as the API does) under the form's key; ``Refused`` names
    what was wrong."""
    key = IdempotencyKey(key=f"web-form:{form_key}"[:200], token_hash=session.principal.token_hash,
                         method_path=f"POST {request.url.path}", body_hash=body_hash(json.dumps(body).encode())
                         ) if form_key else None
    try:
        return await request.app.state.uow.write(work, present, key, subjects=(subject_id,))  # type: ignore[no-any-return]
    except KeyReused:
        raise Refused({"": ["This form was saved already with other values. Open a new form to record "
                            "another entry."]}) from None
    except Invalid as exc:
        problems: Problems = {}
        for problem in exc.problems:
            problems.setdefault(problem.path, []).append(problem.message)
        raise Refused(problems) from exc
    except PatientExists as exc:
        raise Refused({"subject_id": [str(exc)]}) from exc
    except (UnknownPatient, OtherSite) as exc:
        raise Refused({"": [str(exc)]}) from exc
    except (VersionMismatch, DuplicateEvent) as exc:
        raise Refused({"": [f"Someone else recorded at the same moment ({exc}); nothing was stored. "
                            "Save again."]}) from exc


async def record_event(request: Request, session: WebSession, subject_id: str, body: BaseModel, form_key: str,
                       raw: dict[str, Any]) -> Answer:
    """``handlers.record_event``, the use case behind ``POST /v1/patients/{subject_id}/events``."""
    cmd = handlers.RecordEvent(subject_id, body, recorded_by=session.principal.user,
                               site_scope=session.principal.site_scope)
    protocol, moment = request.app.state.protocol, request.app.state.clock()
    return await run(request, session, form_key, raw,
                     lambda ledger: handlers.record_event(ledger, cmd, protocol=protocol, now=moment),
                     lambda stored: Answer(201, stored.public(), recorded=(stored.type,)), subject_id=subject_id)
