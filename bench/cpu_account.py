"""CPU seconds spent by processes between two moments, read from ``/proc/<pid>/stat`` (Linux).

The latency benchmark reports where the machine's CPU went while the load ran: each service,
the PostgreSQL backends serving its database, the NATS server and the load generator itself.
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and of its threads so far; 0 when it is gone (or not Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def pids_named(fragment: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class Meter:
    """``start()`` then ``stop()``: CPU seconds per label over the interval."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.began: dict[int, float] = {}

    def start(self) -> None:
        self.began = {pid: cpu_seconds(pid) for pids in self.groups.values() for pid in pids}

    def stop(self) -> dict[str, float]:
        return {label: sum(max(0.0, cpu_seconds(pid) - self.began.get(pid, 0.0)) for pid in pids)
                for label, pids in self.groups.items()}
