"""Form text ↔ body: the inputs' text parsed into the JSON body the API takes, a stored event's
data put back into the inputs, and pydantic's errors by field for showing beside each input."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from services.ingest.web.forms import FormField

NOT_GIVEN = ""


def _value(field: FormField, raw: str, tz: ZoneInfo) -> Any:
    """The body value of one input; text that does not parse is passed on for pydantic to name."""
    try:
        if field.kind == "integer":
            return int(raw)
        if field.kind == "number":
            return float(raw)
        if field.kind == "datetime":
            local = datetime.fromisoformat(raw)
            return (local if local.tzinfo else local.replace(tzinfo=tz)).isoformat()
        if field.kind == "json":
            return json.loads(raw)
    except ValueError:
        return raw
    if field.kind == "select":
        return next((value for (text, _), value in zip(field.options, field.choices) if text == raw), raw)
    return raw


def body_from_form(fields: list[FormField], form: Mapping[str, str], tz: ZoneInfo) -> dict[str, Any]:
    """The JSON body the form stands for; an empty input is a field not given."""
    body: dict[str, Any] = {}
    for field in fields:
        raw = (form.get(field.name) or "").strip()
        if raw == NOT_GIVEN:
            continue
        *parents, leaf = field.name.split(".")
        target = body
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = _value(field, raw, tz)
    return body


def form_from_data(fields: list[FormField], data: Mapping[str, Any], tz: ZoneInfo) -> dict[str, str]:
    """The inputs' values for a stored event's data (a correction starts from the event)."""
    values: dict[str, str] = {}
    for field in fields:
        value: Any = data
        for part in field.name.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is None:
            continue
        if field.kind == "datetime":
            values[field.name] = local_input(datetime.fromisoformat(str(value)), tz)
        elif isinstance(value, bool):
            values[field.name] = "true" if value else "false"
        elif field.kind == "json":
            values[field.name] = json.dumps(value)
        else:
            values[field.name] = f"{value:g}" if isinstance(value, float) else str(value)
    return values


def local_input(moment: datetime, tz: ZoneInfo) -> str:
    """A ``datetime-local`` input's value: the moment in the trial's zone, to the minute."""
    return moment.astimezone(tz).strftime("%Y-%m-%dT%H:%M")


def problems_of(error: ValidationError, prefix: str = "") -> dict[str, list[str]]:
    """Pydantic's errors by field path ('' for the body as a whole)."""
    found: dict[str, list[str]] = {}
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"])
        found.setdefault(prefix + path if path else "", []).append(str(item["msg"]).removeprefix("Value error, "))
    return found
