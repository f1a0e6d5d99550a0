"""`trialwatch up`'s service children: one that keeps dying is started again after a pause that
doubles, and that starts over once it has run a while (the clock is the test's)."""

from __future__ import annotations

import os
import sys

import pytest

from services import children
from services.children import ServiceChild


class Quitting(ServiceChild):
    """A child that exits at once with code 3, as a service that cannot start would."""

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-c", "raise SystemExit(3)"]


def test_a_child_that_keeps_dying_is_started_again_after_a_doubling_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(children.time, "monotonic", lambda: now[0])
    child = Quitting("quitting", os.environ)
    child.start()

    def died() -> int:
        assert child.process is not None
        assert child.process.wait(timeout=30) == 3
        child.keep_running()  # sees the exit
        return child.process.pid

    first = died()
    child.keep_running()
    assert child.pid == first  # not before its pause (1 s)
    now[0] += 1.0
    child.keep_running()
    second = child.pid
    assert second != first

    assert died() == second
    now[0] += 1.5
    child.keep_running()
    assert child.pid == second  # the second pause is 2 s
    now[0] += 0.5
    child.keep_running()
    third = child.pid
    assert third != second

    # One that ran for a while before it died starts again after the first pause, not the fourth.
    now[0] += children.STEADY_AFTER_S
    assert died() == third
    now[0] += 1.0
    child.keep_running()
    assert child.pid != third
    assert child.process is not None and child.process.wait(timeout=30) == 3
