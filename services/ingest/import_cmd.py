"""``trialwatch import FILE.ndjson``: a file through the running API's bulk import.

It talks HTTP to the ingest service (``--url``, default ``http://TRIALWATCH_HTTP_HOST:PORT``) with
a token (``--token`` or ``TRIALWATCH_TOKEN``), so the file is checked exactly as the API checks it,
by the caller's role and site, and the safety service hears of every event through the outbox as
usual. A file longer than one request takes (``CHUNK_LINES``) goes in consecutive requests, in
file order; each carries an Idempotency-Key made of the file's hash and the chunk's place, so
running the same file again (after a crash, a timeout) stores nothing twice: the API answers the
chunks already stored from its memory of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

CHUNK_LINES = 10_000
CHUNK_BYTES = 32 * 1024 * 1024


@dataclass
class ImportResult:
    accepted: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    lines: int = 0


class ImportFailed(Exception):
    """A request was refused as a whole (a bad token, the API down): nothing after it was sent."""


def chunks(raw: bytes) -> Iterator[tuple[int, bytes, int]]:
    """(first line number - 1, body, non-blank lines in it), cut at line ends."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    start = 0
    while start < len(lines):
        end, size = start, 0
        while end < len(lines) and end - start < CHUNK_LINES and size + len(lines[end]) < CHUNK_BYTES:
            size += len(lines[end]) + 1
            end += 1
        end = max(end, start + 1)
        part = lines[start:end]
        yield start, b"\n".join(part) + b"\n", sum(1 for line in part if line.strip())
        start = end


def import_file(path: Path, *, url: str, token: str, progress: Callable[[int], None] = lambda lines: None,
                timeout: float = 600.0) -> ImportResult:
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:32]
    result = ImportResult()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"}
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout) as client:
        for index, (offset, body, count) in enumerate(chunks(raw)):
            try:
                answer = client.post("/v1/events:bulk", content=body,
                                     headers=headers | {"Idempotency-Key": f"import-{digest}-{index}"})
            except httpx.HTTPError as exc:
                raise ImportFailed(f"{url} cannot be reached ({exc}); {result.accepted} lines were stored "
                                   "before; run the same file again to send the rest") from exc
            if answer.status_code != 200:
                try:
                    detail = answer.json().get("detail", answer.text)
                except ValueError:
                    detail = answer.text
                raise ImportFailed(f"the API answered {answer.status_code}: {detail}")
            done = answer.json()
            result.accepted += done["accepted"]
            result.rejected += [r | {"line": r["line"] + offset} for r in done["rejected"]]
            result.lines += count
            progress(count)
    return result


def describe_rejection(rejection: dict[str, Any]) -> str:
    errors = "; ".join(f"{e['path']}: {e['message']}" if e.get("path") else e["message"]
                       for e in rejection.get("errors", []))
    return f"line {rejection['line']}: {rejection['status']} {errors or rejection.get('detail', '')}"
