"""JSON bodies read as a clinic could have written them (CONTRACT.md section 2), for every route.

Python's ``json`` takes what no clinic writes and FastAPI passes it on: ``NaN`` and ``Infinity``,
``1e400`` (read as infinity), the last of two equal keys (``{"grade": 4, "grade": 1}`` is grade
1), a NUL or any other control character inside a string, lone surrogates, a number with
thousands of digits (an error, not a value, past Python's 4,300). ``StrictJsonRoute`` reads a
JSON body here before FastAPI does, refusing each of these as a 422 naming its path; the parsed
body is then handed to FastAPI, which validates it against the route's model as before.

Line breaks and tabs are written text and are let through; the models refuse them in
identifiers (``shared/events.py``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from services.ingest.problems import is_json

MAX_DEPTH = 32  # a clinical body nests three deep (a correction's replacement's fields)
MAX_NUMBER_CHARS = 40  # far above any plausible value written out, far below Python's int limit
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
Path = tuple[str | int, ...]


class _Refused:
    """A JSON literal no clinic writes (``NaN``, ``Infinity``, a number of hundreds of digits),
    kept in place until the walk names its path."""

    def __init__(self, text: str, why: str) -> None:
        self.text, self.why = text, why


class _Repeated(dict[str, Any]):
    """A JSON object in which a key came twice (the walk names it)."""

    def __init__(self, pairs: list[tuple[str, Any]], repeated: list[str]) -> None:
        super().__init__(pairs)
        self.repeated = repeated


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    repeated: list[str] = []
    for key, _ in pairs:
        if key in seen:
            repeated.append(key)
        seen.add(key)
    return _Repeated(pairs, repeated) if repeated else dict(pairs)


def _constant(text: str) -> _Refused:
    return _Refused(text, f"{text} is not a number a clinic writes; send a finite number")


def _float(text: str) -> float | _Refused:
    if len(text) > MAX_NUMBER_CHARS:
        return _Refused(text[:20] + "...", f"a number of {len(text)} characters is not plausible")
    value = float(text)
    return value if math.isfinite(value) else _Refused(text, f"{text} is beyond any finite number")


def _int(text: str) -> int | _Refused:
    if len(text) > MAX_NUMBER_CHARS:
        return _Refused(text[:20] + "...", f"a number of {len(text)} digits is not plausible")
    return int(text)


def _control(text: str) -> str | None:
    if found := _CONTROL.search(text):
        return f"contains the control character U+{ord(found.group()):04X}; text may hold none"
    return None


def problems(value: Any, path: Path = ()) -> list[tuple[Path, str]]:
    """Every path at which ``value`` (as parsed by ``parse``) holds something a clinic never writes."""
    if len(path) > MAX_DEPTH:
        return [(path, f"nested deeper than {MAX_DEPTH} levels")]
    if isinstance(value, _Refused):
        return [(path, value.why)]
    if isinstance(value, str):
        return [(path, why)] if (why := _control(value)) else []
    found: list[tuple[Path, str]] = []
    if isinstance(value, list):
        for i, item in enumerate(value):
            found += problems(item, (*path, i))
    elif isinstance(value, dict):
        for key in getattr(value, "repeated", ()):
            found.append(((*path, key), f"the key {key!r} is given more than once; give it once"))
        for key, item in value.items():
            if why := _control(key):
                found.append(((*path, ascii(key)), f"the key {why}"))
            found += problems(item, (*path, key))
    return found


def parse(raw: bytes) -> Any:
    """The JSON value of ``raw``, or ``RequestValidationError`` naming each unwritable part."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _invalid([((), f"the body is not UTF-8 text (byte {exc.start})")]) from exc
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_float=_float,
                           parse_int=_int)
    except json.JSONDecodeError as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": exc.msg}}], body=text) from exc
    except RecursionError as exc:
        raise _invalid([((), f"nested deeper than {MAX_DEPTH} levels")]) from exc
    if found := problems(value):
        raise _invalid(found)
    return value


def _invalid(found: list[tuple[Path, str]]) -> RequestValidationError:
    return RequestValidationError([{"type": "implausible_json", "loc": ("body", *path), "msg": why, "input": None}
                                   for path, why in found])


class StrictJsonRoute(APIRoute):
    """A route whose JSON body is read by ``parse`` (FastAPI then validates what it returns)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def strict(request: Request) -> Response:
            if self.body_field is not None and is_json(request.headers.get("content-type")):
                raw = await request.body()
                if raw:
                    # Request.json() answers this from now on; were that cache ever dropped,
                    # FastAPI would parse again to the same value (``parse`` refused the rest).
                    request._json = parse(raw)
            return await handle(request)

        return strict
