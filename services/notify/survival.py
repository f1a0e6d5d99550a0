"""Overall and disease-free survival by arm: Kaplan–Meier estimates and a log-rank comparison.

CONTRACT §3: time zero is ``PatientOutcome.origin`` (first blinatumomab dose; usual care: the
enrolment day), patients without the event are censored at their last contact, and the intervals
are 95% log(-log). ``lifelines.KaplanMeierFitter`` gives exactly that interval by default: its
``confidence_interval_`` "Uses Greenwood's Exponential formula ("log-log" in R)" (docstring and
``KaplanMeierFitter._bounds`` in lifelines 0.30), i.e. exp(-exp(log(-log S) ± z·σ/log S)).

Conventions where the contract is silent:
- ``median_days`` follows R ``survival::quantile.survfit``: the first time S(t) <= 0.5, except that
  where the curve sits exactly at 0.5 (within sqrt(machine epsilon)) the midpoint of that flat
  stretch is taken (up to the last follow-up time if it never drops again); null when not reached.
  lifelines' ``median_survival_time_`` is not used: it has no midpoint rule, and because it builds
  S as exp(sum of logs), a curve at exactly 0.5 comes out at 0.5000000001 and skips to the next
  event.
- ``at_3y`` is null when nobody in the arm was followed to day 1095, unless the curve already
  reached 0 (everyone left had the event: S(1095) = 0 is then known, not extrapolated). The
  log(-log) interval is undefined where S is 0 or 1, so it is null there.
- An event on the origin day is at day 0; a date before the origin (bad data) is clamped to 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import numpy as np
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test

from shared.clinical.records import PatientOutcome

THREE_YEARS_DAYS = 1095
_TOLERANCE = float(np.sqrt(np.finfo(float).eps))  # R's default for matching a quantile exactly
ENDPOINTS = ("os", "dfs")


@dataclass(frozen=True)
class Curve:
    """A right-continuous step function by arm, with the follow-up times for the chart's numbers
    at risk and censoring marks."""

    arm: str
    times: tuple[float, ...]
    values: tuple[float, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    durations: tuple[float, ...]
    censored: tuple[float, ...]

    def at_risk(self, day: float) -> int:
        return sum(1 for t in self.durations if t >= day)


@dataclass(frozen=True)
class SurvivalEstimate:
    endpoint: str
    arm: str
    n: int
    events: int
    median_days: float | None
    at_3y: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True)
class LogRank:
    endpoint: str
    statistic: float | None
    p_value: float | None


def days_between(start: date, end: date) -> int:
    return max(0, (end - start).days)


def time_to_event(patient: PatientOutcome, endpoint: str) -> tuple[int, bool]:
    """(days from origin, event observed) — OS: death; DFS: relapse or death, whichever first."""
    candidates = [patient.death_date]
    if endpoint == "dfs":
        candidates.append(patient.relapse_date)
    events = [d for d in candidates if d is not None]
    if events:
        return days_between(patient.origin, min(events)), True
    return days_between(patient.origin, patient.last_contact), False


def finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def step_value(times: Sequence[float], values: Sequence[float], day: float) -> float:
    """Value of a right-continuous step function at ``day`` (times ascending, starting at 0)."""
    index = int(np.searchsorted(np.asarray(times), day, side="right")) - 1
    return values[max(index, 0)]


def fit_arm(endpoint: str, arm: str, patients: Sequence[PatientOutcome]) -> tuple[SurvivalEstimate, Curve]:
    observed = [time_to_event(p, endpoint) for p in patients]
    durations = [t for t, _ in observed]
    events = [e for _, e in observed]
    km = KaplanMeierFitter().fit(durations, event_observed=events)
    times = tuple(float(t) for t in km.survival_function_.index)
    curve = Curve(
        arm,
        times,
        tuple(float(v) for v in km.survival_function_.iloc[:, 0]),
        tuple(float(v) for v in km.confidence_interval_.iloc[:, 0]),
        tuple(float(v) for v in km.confidence_interval_.iloc[:, 1]),
        tuple(float(t) for t in durations),
        tuple(float(t) for t, event in observed if not event),
    )
    at_3y = low = high = None
    if max(durations) >= THREE_YEARS_DAYS or curve.values[-1] == 0.0:
        at_3y = step_value(curve.times, curve.values, THREE_YEARS_DAYS)
        if 0.0 < at_3y < 1.0:
            low = step_value(curve.times, curve.lower, THREE_YEARS_DAYS)
            high = step_value(curve.times, curve.upper, THREE_YEARS_DAYS)
    median = median_time(curve)
    estimate = SurvivalEstimate(endpoint, arm, len(patients), sum(events), median, at_3y, low, high)
    return estimate, curve


def median_time(curve: Curve) -> float | None:
    """First time S <= 0.5; the midpoint of a flat stretch at exactly 0.5 (see module docstring)."""
    points = list(zip(curve.times, curve.values))
    for index, (time, value) in enumerate(points):
        if value <= 0.5 + _TOLERANCE:
            if value < 0.5 - _TOLERANCE:
                return time
            later_drop = [t for t, v in points[index + 1 :] if v < value - _TOLERANCE]
            end = later_drop[0] if later_drop else max(curve.durations)
            return (time + end) / 2
    return None


def compare_arms(endpoint: str, first: Sequence[PatientOutcome], second: Sequence[PatientOutcome]) -> LogRank:
    a = [time_to_event(p, endpoint) for p in first]
    b = [time_to_event(p, endpoint) for p in second]
    result = logrank_test(
        [t for t, _ in a], [t for t, _ in b],
        event_observed_A=[e for _, e in a], event_observed_B=[e for _, e in b],
    )
    return LogRank(endpoint, finite(result.test_statistic), finite(result.p_value))
