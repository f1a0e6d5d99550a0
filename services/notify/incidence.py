"""Crude incidences of the safety endpoints with exact (Clopper–Pearson) 95% intervals.

CONTRACT §3: one row per incidence name and arm; a patient counts in the denominator only once the
endpoint is evaluable (``True`` or ``False``), ``None`` means not evaluable yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import beta

from shared.clinical.cgvhd_severity import SEVERITIES
from shared.clinical.records import INCIDENCE_NAMES, PatientOutcome

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Incidence:
    name: str
    arm: str
    events: int
    evaluable: int
    rate: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True)
class CgvhdSeverity:
    """Patients of an arm by the worst NIH 2014 chronic GVHD global severity recorded (DOMAIN.md c)."""

    arm: str
    patients: int
    none: int
    mild: int
    moderate: int
    severe: int


def cgvhd_by_severity(patients: Sequence[PatientOutcome], arms: Sequence[str]) -> tuple[CgvhdSeverity, ...]:
    """One row per arm given; a patient counts once, at the worst severity recorded by the cutoff."""
    rows = []
    for arm in arms:
        worst = [p.cgvhd_severity for p in patients if p.arm == arm]
        counts = {s: worst.count(s) for s in SEVERITIES}
        rows.append(CgvhdSeverity(arm, len(worst), worst.count(None), **counts))
    return tuple(rows)


def clopper_pearson(events: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact binomial interval from beta quantiles; closed at 0 / 1 when events are 0 / n."""
    if not 0 <= events <= n or n == 0:
        raise ValueError(f"need 0 <= events <= n and n > 0, got {events}/{n}")
    tail = (1 - confidence) / 2
    low = 0.0 if events == 0 else float(beta.ppf(tail, events, n - events + 1))
    high = 1.0 if events == n else float(beta.ppf(1 - tail, events + 1, n - events))
    return low, high


def incidence(name: str, arm: str, flags: Sequence[bool | None]) -> Incidence:
    evaluable = sum(1 for flag in flags if flag is not None)
    events = sum(1 for flag in flags if flag is True)
    if evaluable == 0:
        return Incidence(name, arm, events, evaluable, None, None, None)
    low, high = clopper_pearson(events, evaluable)
    return Incidence(name, arm, events, evaluable, events / evaluable, low, high)


def incidences_by_arm(
    patients: Sequence[PatientOutcome], arms: Sequence[str]
) -> tuple[Incidence, ...]:
    """Every incidence name for every arm given, in INCIDENCE_NAMES order then arm order."""
    return tuple(
        incidence(name, arm, [p.endpoints.get(name) for p in patients if p.arm == arm])
        for name in INCIDENCE_NAMES
        for arm in arms
    )
