"""The text an event's hash covers is, byte for byte, the one every stored chain was hashed over:
``json.dumps`` of the sorted envelope. The store writes it out field by field (faster), and the
server fills the stream version into the two pieces around it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from shared.store import eventstore


def reference(row: dict[str, Any]) -> bytes:
    """The definition the chains were hashed with."""
    fields = {key: row[key] for key in (
        "event_id", "stream_id", "stream_version", "type", "schema_version", "subject_id", "occurred_offset_s",
        "recorded_by", "data", "correlation_id", "causation_id")}
    fields["occurred_at"] = eventstore.utc(row["occurred_at"]).isoformat()
    fields["recorded_at"] = eventstore.utc(row["recorded_at"]).isoformat()
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts
data = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                    max_leaves=12).map(lambda v: {"v": v})
times = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.sampled_from(
    [UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=-5, minutes=-30))]))
rows = st.fixed_dictionaries({
    "event_id": texts, "stream_id": texts, "stream_version": st.integers(0, 2**31), "type": texts,
    "schema_version": st.integers(0, 9), "subject_id": st.none() | texts, "occurred_at": times,
    "occurred_offset_s": st.integers(-50_000, 50_000), "recorded_at": times, "recorded_by": texts,
    "data": data | st.dictionaries(texts, scalars, max_size=5), "correlation_id": st.none() | texts,
    "causation_id": st.none() | texts,
})


@given(rows)
def test_the_canonical_json_is_the_sorted_json_dumps_of_the_envelope(row: dict[str, Any]) -> None:
    assert eventstore.canonical(row).encode() == reference(row)


@given(rows)
def test_the_pieces_around_the_version_make_the_canonical_json(row: dict[str, Any]) -> None:
    head, tail = eventstore.canonical_around_version(row)
    assert (head + str(row["stream_version"]) + tail).encode() == reference(row)
    assert (head + tail).isascii()  # the server hashes the text's UTF-8, which must be these bytes
