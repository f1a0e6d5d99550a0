"""Event forms generated from the API's own body schemas (``shared.events``).

Each body field becomes one labelled input: Literal enumerations become selects whose option
values are the body's values, flags a yes/no select, numbers a number input with the schema's
bounds, times a ``datetime-local`` input read in the trial's zone. A nested model or a dict keyed
by a Literal (organ scores) becomes one input per key; anything else a JSON text box. The parsed
form is validated by the same class the API validates with, so both refuse the same values.
"""

from __future__ import annotations

import types
import uuid
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import AwareDatetime, BaseModel
from pydantic.fields import FieldInfo

from services.ingest.web.labels import FIELD_HINTS, KNOWN_KEYS, field_label, option_words
from shared.events import ObservationBody


@dataclass(frozen=True)
class FormField:
    name: str  # the body path, dotted for nested fields; also the input's name
    label: str
    kind: str  # select | integer | number | text | datetime | date | json
    required: bool
    options: tuple[tuple[str, str], ...] = ()  # (the body's value as text, words)
    choices: tuple[Any, ...] = ()  # the body's values themselves, beside ``options``
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    max_length: int | None = None
    hint: str = ""

    @property
    def html_id(self) -> str:
        return "f-" + self.name.replace(".", "-")

    @property
    def range_words(self) -> str:
        """The schema's bounds in words ("30–45", "more than 0")."""
        low, high = self.minimum, self.maximum
        if low is not None and high is not None and not self.exclusive_minimum:
            return f"{low:g}–{high:g}"
        words = [f"more than {low:g}" if self.exclusive_minimum else f"at least {low:g}"] if low is not None else []
        return ", ".join(words + ([f"at most {high:g}"] if high is not None else []))


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """The annotation without Annotated and Optional, and whether None was allowed."""
    optional = False
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(get_args(annotation))
            if len(args) != 1:
                return annotation, optional
            annotation = args[0]
        else:
            return annotation, optional


def _constraints(annotation: Any) -> list[Any]:
    """Constraint metadata inside a type (``Annotated[int, Field(ge=0, le=3)]``, also under Optional)."""
    found: list[Any] = []
    if get_origin(annotation) is Annotated:
        for item in get_args(annotation)[1:]:
            found += item.metadata if isinstance(item, FieldInfo) else [item]
        return found + _constraints(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            found += _constraints(arg)
    return found


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            found["minimum"] = float(item.ge)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Gt):
            found.update(minimum=float(item.gt), exclusive_minimum=True)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Le):
            found["maximum"] = float(item.le)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.MaxLen):
            found["max_length"] = item.max_length
    return found


YES_NO = {"options": (("true", "Yes"), ("false", "No")), "choices": (True, False)}


def _kind(annotation: Any) -> tuple[str, dict[str, Any]]:
    """The input for a type, and its options (a select's body values and their words)."""
    if get_origin(annotation) is Literal:
        values = get_args(annotation)
        return "select", {"options": tuple((str(v), option_words(str(v))) for v in values), "choices": values}
    if annotation is AwareDatetime:
        return "datetime", {}
    if isinstance(annotation, type):
        for base, kind in ((bool, "select"), (datetime, "datetime"), (date, "date"), (int, "integer"),
                           (float, "number"), (str, "text"), (uuid.UUID, "text")):
            if issubclass(annotation, base):
                return kind, YES_NO if base is bool else {}
    return "json", {}


def form_fields(model: type[BaseModel], prefix: str = "", skip: frozenset[str] = frozenset({"type"})) -> list[FormField]:
    """One field per body field, in the schema's order (nested fields flattened with dotted names)."""
    fields: list[FormField] = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        annotation, optional = _unwrap(info.annotation)
        path, required = prefix + name, info.is_required() and not optional
        label = field_label(name)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields += [_within(f, label, required) for f in form_fields(annotation, path + ".", frozenset())]
            continue
        if get_origin(annotation) is dict:
            key_type, value_type = get_args(annotation)
            keys = get_args(_unwrap(key_type)[0]) if get_origin(_unwrap(key_type)[0]) is Literal else KNOWN_KEYS.get(name)
            if keys:
                fields += [_keyed(path, label, str(key), value_type) for key in keys]
                continue
        kind, options = _kind(annotation)
        bounds = _bounds(list(info.metadata) + _constraints(info.annotation))
        fields.append(_hinted(FormField(path, label, kind, required, **options, **bounds), name))
    return fields


def _hinted(field: FormField, name: str) -> FormField:
    hint = "; ".join(h for h in (FIELD_HINTS.get(name, ""), field.range_words) if h)
    return replace(field, hint=hint)


def _within(field: FormField, group: str, group_required: bool) -> FormField:
    return replace(field, label=f"{group}: {field.label}", required=field.required and group_required)


def _keyed(path: str, group: str, key: str, value_type: Any) -> FormField:
    """One input per key of a dict keyed by a Literal (organ scores: skin, mouth, ...), each optional."""
    kind, options = _kind(_unwrap(value_type)[0])
    field = FormField(f"{path}.{key}", f"{group}: {field_label(key)}", kind, False, **options,
                      **_bounds(_constraints(value_type)))
    return _hinted(field, key)


def _bodies() -> dict[str, type[BaseModel]]:
    """Each observation type's body class, read from the API's discriminated union."""
    union = get_args(ObservationBody)[0]
    return {get_args(cls.model_fields["type"].annotation)[0]: cls for cls in get_args(union)}


OBSERVATION_BODIES: dict[str, type[BaseModel]] = _bodies()
