"""Sequential stopping boundaries for toxicity monitoring, with exact operating characteristics.

Two rules (DOMAIN.md section f):

- ``pocock`` / ``pocock_at``: Pocock-type repeated significance testing for continuous toxicity
  monitoring (Ivanova, Qaqish & Schell 2005; R ``clinfun::toxbdry`` with ``delta = 0``). One
  nominal level alpha serves every look; at a look with n evaluable patients the boundary is the
  least count b with P(X >= b | p0) <= alpha, X ~ Binomial(n, p0). Alpha is the largest for which
  the exact probability of ever crossing when the rate is p0 does not exceed ``cp0``.
- ``bayes``: beta-binomial posterior monitoring against a fixed limit, the common simplification
  of Thall, Simon & Estey 1995: stop at n patients with x events if
  P(theta > p0 | x, n) > threshold under a Beta(prior_a, prior_b) prior.

Convention: ``stop_at`` is the least number of events that stops (stop when events >= stop_at;
None where no count up to n stops). clinfun's ``lo.bdry``/``hi.bdry`` are the largest acceptable
counts (stop when events *exceed* them), so ``stop_at`` = clinfun boundary + 1. Our Pocock search
corresponds to clinfun's ``hi.bdry`` (crossing probability just below cP0).

Operating characteristics are exact, not simulated: a dynamic programme carries the distribution
of the event count among the paths not yet stopped from look to look, adding binomial increments.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.special import betaincc
from scipy.stats import binom


class InvalidDesign(ValueError):
    """A design argument is out of range; ``argument`` names it (``p0``, ``n_max``, ...)."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument


@dataclass(frozen=True)
class Look:
    n: int  # patients evaluated at this look
    stop_at: int | None  # least number of events that stops; None if no count <= n stops


@dataclass(frozen=True)
class Boundary:
    method: str
    params: dict[str, Any]
    looks: tuple[Look, ...]
    p_stop_p0: float
    p_stop_p1: float | None
    expected_n_p0: float
    expected_n_p1: float | None

    def stop_at(self, n_evaluable: int) -> int | None:
        """The boundary of the latest look at or before ``n_evaluable``; None before the first."""
        i = bisect_right([look.n for look in self.looks], n_evaluable)
        return self.looks[i - 1].stop_at if i else None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": dict(self.params),
            "looks": [{"n": look.n, "stop_at": look.stop_at} for look in self.looks],
            "p_stop_p0": self.p_stop_p0,
            "p_stop_p1": self.p_stop_p1,
            "expected_n_p0": self.expected_n_p0,
            "expected_n_p1": self.expected_n_p1,
        }


# --- exact operating characteristics -------------------------------------------------------------

def stop_probabilities(looks: Sequence[Look], p: float) -> tuple[float, ...]:
    """P(the first crossing happens at look k) for each look, when the true rate is ``p``."""
    ns = tuple(look.n for look in looks)
    return tuple(float(s) for s in _stops(ns, tuple(_bar(look) for look in looks), p))


def crossing_probabilities(looks: Sequence[Look], p: float) -> tuple[float, float]:
    """(P(ever crossing), expected sample size) at true rate ``p``; the trial ends at the last look."""
    ns = tuple(look.n for look in looks)
    stops = _stops(ns, tuple(_bar(look) for look in looks), p)
    cross = float(stops.sum())
    return cross, float(np.dot(ns, stops) + ns[-1] * (1.0 - cross))


def _bar(look: Look) -> int:
    return look.n + 1 if look.stop_at is None else look.stop_at


def _stops(ns: Sequence[int], bars: Sequence[int], p: float) -> np.ndarray:
    alive = np.ones(1)  # alive[x] = P(x events so far and not stopped yet)
    stops = np.zeros(len(ns))
    previous = 0
    for k, (n, bar) in enumerate(zip(ns, bars)):
        if not alive.size:  # a boundary of 0 events stopped every path
            break
        alive = np.convolve(alive, _increment(n - previous, p))
        stops[k] = alive[bar:].sum()
        alive = alive[:bar]
        previous = n
    return stops


@lru_cache(maxsize=1024)
def _increment(patients: int, p: float) -> np.ndarray:
    pmf = binom.pmf(np.arange(patients + 1), patients, p)
    pmf.setflags(write=False)
    return pmf


def _oc(method: str, params: dict[str, Any], ns: Sequence[int], bars: Sequence[int],
        p0: float, p1: float | None) -> Boundary:
    looks = tuple(Look(n, None if bar > n else bar) for n, bar in zip(ns, bars))
    p_stop_p0, expected_n_p0 = crossing_probabilities(looks, p0)
    p_stop_p1, expected_n_p1 = crossing_probabilities(looks, p1) if p1 is not None else (None, None)
    return Boundary(method, params, looks, p_stop_p0, p_stop_p1, expected_n_p0, expected_n_p1)


# --- Pocock (Ivanova, Qaqish & Schell 2005) ------------------------------------------------------

@lru_cache(maxsize=256)
def pocock(p0: float, p1: float | None, n_max: int, cp0: float = 0.1, looks: int = 1) -> Boundary:
    """Pocock-type boundary with a look after every ``looks`` patients and at ``n_max``."""
    ns = look_sizes(n_max, looks)
    boundary = pocock_at(p0, p1, ns, cp0)
    params = {**{k: v for k, v in boundary.params.items() if k != "alpha"},
              "looks": looks, "alpha": boundary.params["alpha"]}
    return replace(boundary, params=params)


def pocock_at(p0: float, p1: float | None, ns: Sequence[int], cp0: float = 0.1) -> Boundary:
    """Pocock-type boundary at the given looks (patients evaluated at each, increasing)."""
    return _pocock_at(p0, p1, tuple(int(n) for n in ns), cp0)


@lru_cache(maxsize=256)
def _pocock_at(p0: float, p1: float | None, ns: tuple[int, ...], cp0: float) -> Boundary:
    _check_rates(p0, p1)
    _check_ns(ns)
    _check_open("cp0", cp0)
    alpha, bars = _pocock_alpha(p0, ns, cp0)
    params = {"p0": p0, "p1": p1, "n_max": ns[-1], "cp0": cp0, "alpha": alpha}
    return _oc("pocock", params, ns, bars, p0, p1)


def _pocock_alpha(p0: float, ns: tuple[int, ...], cp0: float) -> tuple[float, tuple[int, ...]]:
    """The largest nominal alpha whose exact crossing probability under p0 is <= cp0.

    Each look's boundary is a step function of alpha that moves only where alpha equals one of
    that look's tail probabilities, so bisecting over the sorted distinct tails is exact. A
    candidate alpha crosses with probability >= alpha, so only tails <= cp0 are candidates.
    """
    sizes = np.asarray(ns)
    lengths = sizes + 2  # b = 0 .. n + 1
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    b = np.arange(lengths.sum()) - np.repeat(starts, lengths)
    tails = np.asarray(binom.sf(b - 1, np.repeat(sizes, lengths), p0))  # P(X_k >= b)
    candidates = np.unique(tails[(tails > 0) & (tails <= cp0)])
    best: tuple[float, tuple[int, ...]] = (0.0, tuple(n + 1 for n in ns))  # never stops
    lo, hi = 0, len(candidates)
    while lo < hi:
        mid = (lo + hi) // 2
        bars = tuple(int(c) for c in np.add.reduceat(tails > candidates[mid], starts))
        if _stops(ns, bars, p0).sum() <= cp0:
            best, lo = (float(candidates[mid]), bars), mid + 1
        else:
            hi = mid
    return best


# --- Bayesian (Thall, Simon & Estey 1995, fixed limit) -------------------------------------------

@lru_cache(maxsize=256)
def bayes(p0: float, p1: float | None, n_max: int, prior_a: float = 1, prior_b: float = 1,
          threshold: float = 0.95, looks: int = 1) -> Boundary:
    """Stop at the least x with P(theta > p0 | x events in n) > threshold, theta ~ Beta posterior.

    The posterior probability rises with x and falls with n, and x + d events in n + d patients
    is at least as alarming as x in n; so each look's boundary lies within
    [previous boundary, previous boundary + new patients], and only that window is evaluated.
    """
    _check_rates(p0, p1)
    _check_positive("prior_a", prior_a)
    _check_positive("prior_b", prior_b)
    _check_open("threshold", threshold)
    ns = look_sizes(n_max, looks)
    bars: list[int] = []
    bar = previous = 0
    for n in ns:
        xs = np.arange(bar, min(bar + n - previous, n) + 1)
        hits = np.flatnonzero(betaincc(prior_a + xs, prior_b + n - xs, p0) > threshold)
        bar = int(xs[hits[0]]) if hits.size else n + 1
        bars.append(bar)
        previous = n
    params = {"p0": p0, "p1": p1, "n_max": n_max, "prior_a": prior_a, "prior_b": prior_b,
              "threshold": threshold, "looks": looks}
    return _oc("bayes", params, ns, bars, p0, p1)


def clear_caches() -> None:
    """Forget every memoised boundary (for cold-cache timings)."""
    for cached in (pocock, _pocock_at, bayes, _increment):
        cached.cache_clear()


# --- arguments ----------------------------------------------------------------------------------

def look_sizes(n_max: int, looks: int) -> tuple[int, ...]:
    """n = looks, 2*looks, ... up to n_max, with n_max as the last look."""
    if n_max < 2:
        raise InvalidDesign("n_max", f"must be at least 2, got {n_max}")
    if looks < 1:
        raise InvalidDesign("looks", f"must be at least 1 patient per look, got {looks}")
    ns = list(range(looks, n_max + 1, looks))
    return tuple(ns if ns and ns[-1] == n_max else [*ns, n_max])


def _check_rates(p0: float, p1: float | None) -> None:
    _check_open("p0", p0)
    if p1 is not None:
        _check_open("p1", p1)
        if p1 <= p0:
            raise InvalidDesign("p1", f"must be above p0 ({p0}), got {p1}")


def _check_ns(ns: tuple[int, ...]) -> None:
    if not ns or ns[0] < 1 or any(b <= a for a, b in zip(ns, ns[1:])):
        raise InvalidDesign("ns", f"looks must be increasing positive sizes, got {list(ns)}")


def _check_open(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise InvalidDesign(name, f"must be strictly between 0 and 1, got {value}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise InvalidDesign(name, f"must be positive, got {value}")
