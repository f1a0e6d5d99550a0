"""Schemathesis over ``/openapi.json`` (issue 9, item 7): requests generated from the OpenAPI
document, valid and invalid, against the app in-process on the test database.

Every answer must be no server error, and its status code and content type must be ones the
document gives for that route (so the document tells clients every answer they can get).

(Schemathesis's own ``@schema.parametrize`` over a lazily loaded schema does not run under
pytest 9, so each route's cases are drawn here with Hypothesis directly.)
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from services.ingest.app import create_app
from shared.protocol import Protocol
from shared.settings import Settings


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """The bulk import's body: text as given (lines of JSON or not), anything else as one JSON line."""
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else json.dumps(value).encode()


EXAMPLES_PER_ROUTE = 40  # per generation mode (valid, invalid)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def api_schema(database_url: str, protocol: Protocol, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # The app makes its own engine: schemathesis serves it on an event loop of its own.
    app_settings = Settings(data_dir=tmp_path_factory.mktemp("fuzz"), database_url=database_url)
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(app_settings, protocol=protocol))


def _fuzz(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("role", ["admin", "staff_s01"])
def test_every_answer_is_documented_and_none_is_a_server_error(
        api_schema: Any, tokens: dict[str, str], role: str, mode: GenerationMode) -> None:
    headers = {"Authorization": f"Bearer {tokens[role]}"}
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        try:
            _fuzz(operation, mode, headers)
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # a route without parameters has no invalid request
        except Exception as exc:  # gather every route's failure, then report them all
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:3000]
    assert not failures, "\n\n".join(f"{label}\n{why}" for label, why in failures.items())
