from __future__ import annotations

import pytest

from shared.clinical import boundaries


@pytest.fixture(autouse=True)
def boundaries_computed_afresh() -> None:
    """Every stopping boundary computed anew in each test: one cached by an earlier test (or by the
    clean run a mutation tool forks its mutants from) would hide a change to the code computing it."""
    for cached in (boundaries._pocock_at, boundaries.bayes, boundaries._increment):
        cached.cache_clear()
