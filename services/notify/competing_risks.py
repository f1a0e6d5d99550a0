"""Cumulative incidence of acute GVHD after the DLI, with death as a competing risk (Aalen–Johansen).

Time zero is the DLI day; patients without a DLI are left out. Event 1 is the onset of acute GVHD
of any grade (an onset before the DLI is not counted); event 2 is death without prior aGVHD (death
on the onset day counts as aGVHD); everyone else is censored at the last contact.

``lifelines.AalenJohansenFitter`` breaks ties between different event types by *random* jitter of
±0.0001 days (seeding the global numpy generator), which can push an event past a censoring on the
same day or past the day-100 read-out. The estimate does not depend on the order of tied events of
different types, so the ties are broken here instead, deterministically, within the day: aGVHD at
+0, competing death at +0.25, censoring at +0.5 (the usual "events before censorings" order).
The day-100 value therefore counts everything that happened up to and including day 100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lifelines import AalenJohansenFitter

from services.notify.survival import Curve, days_between, finite, step_value
from shared.clinical.records import PatientOutcome

AGVHD, COMPETING_DEATH, CENSORED = 1, 2, 0
READ_OUT_DAY = 100
_WITHIN_DAY = {AGVHD: 0.0, COMPETING_DEATH: 0.25, CENSORED: 0.5}


@dataclass(frozen=True)
class CumulativeIncidence:
    arm: str
    n: int
    events: int
    competing: int
    at_100d: float | None
    ci_low: float | None
    ci_high: float | None


def agvhd_outcome(patient: PatientOutcome) -> tuple[int, int] | None:
    """(days from DLI, event code), or None for a patient without a DLI."""
    dli = patient.dli_date
    if dli is None:
        return None
    onset = patient.agvhd_onset if patient.agvhd_onset and patient.agvhd_onset >= dli else None
    death = patient.death_date
    if onset is not None and (death is None or onset <= death):
        return days_between(dli, onset), AGVHD
    if death is not None:
        return days_between(dli, death), COMPETING_DEATH
    return days_between(dli, patient.last_contact), CENSORED


def fit_arm(arm: str, patients: Sequence[PatientOutcome]) -> tuple[CumulativeIncidence, Curve] | None:
    """Aalen–Johansen for one arm, or None when nobody in it has had a DLI."""
    outcomes = [o for o in map(agvhd_outcome, patients) if o is not None]
    if not outcomes:
        return None
    days = [float(d) for d, _ in outcomes]
    codes = [code for _, code in outcomes]
    ordered = [d + _WITHIN_DAY[code] for d, code in outcomes]
    fitter = AalenJohansenFitter().fit(ordered, codes, event_of_interest=AGVHD)
    density = fitter.cumulative_density_.iloc[:, 0]
    interval = fitter.confidence_interval_  # lifelines 0.30 labels its two columns the wrong way round
    times = tuple(float(t) for t in density.index)
    lows = tuple(float(v) for v in interval.min(axis=1, skipna=False))
    highs = tuple(float(v) for v in interval.max(axis=1, skipna=False))
    censored = tuple(d for d, code in zip(days, codes) if code == CENSORED)
    curve = Curve(arm, times, tuple(float(v) for v in density), lows, highs, tuple(days), censored)
    return _read_out(arm, codes, curve), curve


def _read_out(arm: str, codes: Sequence[int], curve: Curve) -> CumulativeIncidence:
    at_100d = low = high = None
    if max(curve.durations) >= READ_OUT_DAY:
        day = READ_OUT_DAY + 0.75
        at_100d = step_value(curve.times, curve.values, day)
        low = finite(step_value(curve.times, curve.lower, day))
        high = finite(step_value(curve.times, curve.upper, day))
        if at_100d <= 0.0 or low is None or high is None:
            low = high = None
    return CumulativeIncidence(
        arm, len(codes), codes.count(AGVHD), codes.count(COMPETING_DEATH), at_100d, low, high
    )
