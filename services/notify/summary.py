"""The DSMB safety summary (CONTRACT §3, DOMAIN §g): every figure of the digest, computed once.

``build_summary`` is pure: patient outcomes as of the data cutoff and the stopping rules' current
state in, a frozen ``Summary`` out. The email, the charts and ``summary.json`` all read from it, so
the three can never disagree. ``Summary.to_json`` keeps the contract's keys and only adds others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, get_args

from services.notify import competing_risks, survival
from services.notify.competing_risks import CumulativeIncidence
from services.notify.enrolment import Death, Exposure, cross_tab, deaths, enrolled_by_arm, exposures
from services.notify.incidence import CgvhdSeverity, Incidence, cgvhd_by_severity, incidences_by_arm
from services.notify.survival import ENDPOINTS, Curve, LogRank, SurvivalEstimate
from shared.clinical.records import PatientOutcome
from shared.events import Arm

ARMS: tuple[str, ...] = get_args(Arm)


@dataclass(frozen=True)
class RuleSnapshot:
    """A stopping rule as of the cutoff; ``looks`` is its boundary as (patients evaluated, stop_at);
    ``path`` the events among the first n evaluable patients, n = 1, 2, ... A crossing stays
    crossed (``shared/clinical/stopping.py``): ``crossed_at_look`` says at which n it happened."""

    rule_id: str
    title: str
    evaluable: int
    events: int
    stop_at: int | None
    crossed: bool
    looks: tuple[tuple[int, int | None], ...]
    crossed_at_look: int | None = None
    events_at_crossing: int | None = None
    path: tuple[int, ...] = ()
    # Patients whose records could not be evaluated: the rule could not count them (say so).
    uncounted: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditAnchor:
    """The audit hash chain at the data cutoff: the position and hash of the last event recorded
    by then. Kept outside the database (in every DSMB mail), it lets ``trialwatch verify --anchor
    POSITION:HASH`` show that the history up to it has not been rewritten since."""

    position: int
    hash: str

    def __str__(self) -> str:
        return f"{self.position}:{self.hash}"


@dataclass(frozen=True)
class Summary:
    trial_title: str
    generated_at: datetime
    data_cutoff: datetime
    enrolled: Mapping[str, int]
    enrolled_by_cohort: Mapping[str, Mapping[str, int]]
    enrolled_by_site: Mapping[str, Mapping[str, int]]
    exposure: tuple[Exposure, ...]
    incidences: tuple[Incidence, ...]
    cgvhd_severity: tuple[CgvhdSeverity, ...]
    survival: tuple[SurvivalEstimate, ...]
    survival_curves: Mapping[str, tuple[Curve, ...]]  # endpoint -> one curve per arm
    logrank: tuple[LogRank, ...]
    agvhd: tuple[CumulativeIncidence, ...]
    agvhd_curves: tuple[Curve, ...]
    stopping_rules: tuple[RuleSnapshot, ...]
    deaths: tuple[Death, ...]
    audit: AuditAnchor | None = None

    @property
    def total_enrolled(self) -> int:
        return sum(self.enrolled.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at.isoformat(),
            "data_cutoff": self.data_cutoff.isoformat(),
            "trial_title": self.trial_title,
            "enrolled": dict(self.enrolled),
            "enrolled_by_cohort": {k: dict(v) for k, v in self.enrolled_by_cohort.items()},
            "enrolled_by_site": {k: dict(v) for k, v in self.enrolled_by_site.items()},
            "exposure": [asdict(e) for e in self.exposure],
            "incidences": [asdict(i) for i in self.incidences],
            "cgvhd_severity": [asdict(c) for c in self.cgvhd_severity],
            "survival": [asdict(s) for s in self.survival],
            "logrank": [asdict(r) for r in self.logrank],
            "agvhd_cumulative_incidence": [asdict(c) for c in self.agvhd],
            "stopping_rules": [_rule_json(r) for r in self.stopping_rules],
            "deaths": [asdict(d) for d in self.deaths],
            **({"audit": asdict(self.audit)} if self.audit is not None else {}),
        }


def _rule_json(rule: RuleSnapshot) -> dict[str, Any]:
    return {
        "rule_id": rule.rule_id,
        "evaluable": rule.evaluable,
        "events": rule.events,
        "stop_at": rule.stop_at,
        "crossed": rule.crossed,
        "crossed_at_look": rule.crossed_at_look,
        "events_at_crossing": rule.events_at_crossing,
        "title": rule.title,
        "looks": [{"n": n, "stop_at": stop_at} for n, stop_at in rule.looks],
        "uncounted_subjects": list(rule.uncounted),
    }


def build_summary(
    patients: Sequence[PatientOutcome],
    rules: Sequence[RuleSnapshot],
    *,
    generated_at: datetime,
    data_cutoff: datetime,
    trial_title: str,
    audit: AuditAnchor | None = None,
) -> Summary:
    """Everything the DSMB digest shows, from outcomes that are already as of ``data_cutoff``.

    - Enrolment tables always list both protocol arms (0 where empty); incidences, chronic GVHD by
      severity, survival and the aGVHD cumulative incidence list only arms with patients.
    - The log-rank test is reported per endpoint only when both arms have patients.
    """
    present = _arms_present(patients)
    every_arm = _all_arms(present)
    by_arm = {arm: [p for p in patients if p.arm == arm] for arm in present}
    fits = {e: [survival.fit_arm(e, arm, by_arm[arm]) for arm in present] for e in ENDPOINTS}
    agvhd = [fit for arm in present if (fit := competing_risks.fit_arm(arm, by_arm[arm]))]
    return Summary(
        trial_title=trial_title,
        generated_at=generated_at,
        data_cutoff=data_cutoff,
        enrolled=enrolled_by_arm(patients, every_arm),
        enrolled_by_cohort=cross_tab(patients, every_arm, "cohort"),
        enrolled_by_site=cross_tab(patients, every_arm, "site_id"),
        exposure=exposures(patients, present),
        incidences=incidences_by_arm(patients, present),
        cgvhd_severity=cgvhd_by_severity(patients, present),
        survival=tuple(estimate for e in ENDPOINTS for estimate, _ in fits[e]),
        survival_curves={e: tuple(curve for _, curve in fits[e]) for e in ENDPOINTS},
        logrank=_logrank(by_arm),
        agvhd=tuple(estimate for estimate, _ in agvhd),
        agvhd_curves=tuple(curve for _, curve in agvhd),
        stopping_rules=tuple(rules),
        deaths=deaths(patients),
        audit=audit,
    )


def _arms_present(patients: Sequence[PatientOutcome]) -> tuple[str, ...]:
    arms = {p.arm for p in patients}
    return tuple(a for a in ARMS if a in arms) + tuple(sorted(arms - set(ARMS)))


def _all_arms(present: Sequence[str]) -> tuple[str, ...]:
    return ARMS + tuple(a for a in present if a not in ARMS)


def _logrank(by_arm: Mapping[str, Sequence[PatientOutcome]]) -> tuple[LogRank, ...]:
    first, second = ARMS
    if not by_arm.get(first) or not by_arm.get(second):
        return ()
    return tuple(survival.compare_arms(e, by_arm[first], by_arm[second]) for e in ENDPOINTS)
