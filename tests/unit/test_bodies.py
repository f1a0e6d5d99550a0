"""The strict JSON reader of the ingest API names every part no clinic writes by its path."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError

from services.ingest.bodies import parse


def _locs(raw: bytes) -> list[tuple[object, ...]]:
    with pytest.raises(RequestValidationError) as caught:
        parse(raw)
    return [tuple(e["loc"]) for e in caught.value.errors()]


def test_a_plain_body_reads_as_json_would() -> None:
    raw = b'{"a": [1, 2.5, -0.0, "x\\ty\\n"], "b": {"c": null, "d": true}, "e": 1e-300}'
    assert parse(raw) == {"a": [1, 2.5, -0.0, "x\ty\n"], "b": {"c": None, "d": True}, "e": 1e-300}


def test_every_bad_part_is_named_by_its_path_lists_included() -> None:
    raw = b'{"a": [1, NaN, {"b": "\\u0000", "b": 2}], "c": -Infinity, "d": 1e999, "e": "\\u009f"}'
    # The repeated "b" is named once (its hidden first value is refused with it).
    assert _locs(raw) == [("body", "a", 1), ("body", "a", 2, "b"), ("body", "c"), ("body", "d"), ("body", "e")]


@pytest.mark.parametrize("raw", [b'{"a": ' + b"1" * 5000 + b"}", b'{"a": 1.' + b"0" * 100 + b"}"])
def test_a_number_of_thousands_of_digits_is_named_not_an_error(raw: bytes) -> None:
    assert _locs(raw) == [("body", "a")]
