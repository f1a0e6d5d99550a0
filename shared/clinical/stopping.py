"""Stopping rules evaluated over the trial's patients (CONTRACT.md section 4, DOMAIN.md f).

- A rule looks at one endpoint (``crs_grade_3_plus_2w``, ``agvhd_grade_3_4_100d``, ``nrm_100d``)
  among the evaluable patients of the blinatumomab + DLI arm. A patient is evaluable once the
  endpoint's window has closed or the event has happened (withdrawn/dead ones as the rule says).
- Monitoring is continuous: patients are taken in the order they became evaluable, and the rule
  is crossed if at any look n the events among the first n reach the boundary's ``stop_at(n)`` —
  the same path the operating characteristics are computed over. A crossing stays crossed as more
  patients come (the DSMB must act on it); only a correction that removes it from the path undoes
  it.
- Boundaries are pure functions of the rule's parameters (shared/clinical/boundaries.py), cached.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from typing import Protocol as TypingProtocol

from shared.clinical.boundaries import Boundary, bayes, pocock
from shared.events import AlertRaised, alert_id_for
from shared.protocol import Protocol, StoppingRule

MONITORED_ARM = "blinatumomab_dli"


class EvaluablePatient(TypingProtocol):
    """What the rules need of a folded patient (shared/clinical/patient.py's PatientState)."""

    @property
    def subject_id(self) -> str: ...

    @property
    def arm(self) -> str: ...

    def endpoint_at(
        self, name: str, *, count_withdrawn: bool = False, count_dead: bool = False
    ) -> tuple[bool, datetime] | None: ...


class RecordedPatient(TypingProtocol):
    """What the rules' read model needs of a folded patient (PatientState again)."""

    @property
    def subject_id(self) -> str: ...

    @property
    def arm(self) -> str: ...

    def endpoint_unless_recorded(
        self, name: str, *, count_withdrawn: bool = False, count_dead: bool = False
    ) -> tuple[bool, datetime, datetime | None] | None: ...


@dataclass(frozen=True)
class RuleInput:
    """What one patient gives one rule, kept by the safety service beside the patient's state.

    The rules are evaluated over these rows, not over folds of every patient: a patient's
    evaluation writes its rows, the rules read them (eventsourcing's process application and its
    follower). ``counts_from`` is None when the row counts now, or the moment its window closes
    when only time has to pass, so the row holds without a clock frozen into it.
    """

    rule_id: str
    subject_id: str
    arm: str
    event: bool
    evaluable_at: datetime
    counts_from: datetime | None = None

    def counts_at(self, now: datetime) -> bool:
        return self.counts_from is None or now >= self.counts_from


def rule_inputs(protocol: Protocol, patient: RecordedPatient) -> list[RuleInput]:
    """The patient's row for every rule it will count toward if nothing more is recorded."""
    rows = []
    for rule in protocol.stopping_rules:
        found = patient.endpoint_unless_recorded(
            rule.endpoint, count_withdrawn=rule.count_withdrawn, count_dead=rule.count_dead)
        if found is not None:
            event, when, counts_from = found
            rows.append(RuleInput(rule.id, patient.subject_id, patient.arm, event, when, counts_from))
    return rows


def boundary_for(rule: StoppingRule) -> Boundary:
    if rule.method == "pocock":
        return pocock(rule.p0, rule.p1, rule.n_max, rule.cp0, rule.looks)
    return bayes(rule.p0, rule.p1, rule.n_max, rule.prior_a, rule.prior_b, rule.threshold, rule.looks)


@dataclass(frozen=True)
class RuleStatus:
    rule: StoppingRule
    boundary: Boundary
    evaluable: int
    events: int
    stop_at: int | None
    crossed: bool
    crossed_at_look: int | None = None  # n at the first crossing
    events_at_crossing: int | None = None
    event_subjects: tuple[str, ...] = field(default=())
    path: tuple[int, ...] = ()  # events among the first n evaluable patients, n = 1, 2, ...
    # Patients whose records could not be evaluated (set aside by the safety service): the rule
    # cannot count them, and says so rather than skipping them silently.
    uncounted: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        if self.crossed:
            return "crossed"
        if self.uncounted:
            return "incomplete"
        if self.evaluable >= self.rule.n_max:
            return "complete"
        return "monitoring"

    def public(self) -> dict[str, Any]:
        return {
            "rule_id": self.rule.id,
            "title": self.rule.title,
            "endpoint": self.rule.endpoint,
            "method": self.rule.method,
            "params": self.boundary.params,
            "evaluable": self.evaluable,
            "events": self.events,
            "stop_at": self.stop_at,
            "crossed": self.crossed,
            "crossed_at_look": self.crossed_at_look,
            "events_at_crossing": self.events_at_crossing,
            "status": self.status,
            "uncounted_subjects": list(self.uncounted),
            "boundary": [{"n": look.n, "stop_at": look.stop_at} for look in self.boundary.looks],
        }


def evaluate_rule(rule: StoppingRule, patients: Sequence[EvaluablePatient]) -> RuleStatus:
    path: list[tuple[datetime, str, bool]] = []
    for patient in patients:
        if patient.arm != MONITORED_ARM:
            continue
        status = patient.endpoint_at(
            rule.endpoint, count_withdrawn=rule.count_withdrawn, count_dead=rule.count_dead
        )
        if status is not None:
            event, when = status
            path.append((when, patient.subject_id, event))
    return _tally(rule, path)


def evaluate_rules(protocol: Protocol, patients: Sequence[EvaluablePatient]) -> list[RuleStatus]:
    return [evaluate_rule(rule, patients) for rule in protocol.stopping_rules]


def evaluate_inputs(protocol: Protocol, inputs: Iterable[RuleInput], *, now: datetime,
                    uncounted: Iterable[str] = ()) -> list[RuleStatus]:
    """The rules over the read model's rows at ``now`` (the same answer as ``evaluate_rules`` over
    the folded patients); ``uncounted`` names the patients set aside, whom no rule could count."""
    paths: dict[str, list[tuple[datetime, str, bool]]] = {rule.id: [] for rule in protocol.stopping_rules}
    for row in inputs:
        if row.arm == MONITORED_ARM and row.rule_id in paths and row.counts_at(now):
            paths[row.rule_id].append((row.evaluable_at, row.subject_id, row.event))
    missing = tuple(sorted(uncounted))
    return [_tally(rule, paths[rule.id], missing) for rule in protocol.stopping_rules]


def _tally(rule: StoppingRule, path: list[tuple[datetime, str, bool]],
           uncounted: tuple[str, ...] = ()) -> RuleStatus:
    """Walk the evaluable patients in the order they became evaluable, look by look."""
    boundary = boundary_for(rule)
    path.sort()
    events, crossed_at, events_at, cumulative = 0, None, None, []
    for n, (_, _, event) in enumerate(path, start=1):
        events += event
        cumulative.append(events)
        stop_at = boundary.stop_at(n)
        if crossed_at is None and stop_at is not None and events >= stop_at:
            crossed_at, events_at = n, events
    return RuleStatus(
        rule=rule,
        boundary=boundary,
        evaluable=len(path),
        events=events,
        stop_at=boundary.stop_at(len(path)),
        crossed=crossed_at is not None,
        crossed_at_look=crossed_at,
        events_at_crossing=events_at,
        event_subjects=tuple(subject for _, subject, event in path if event),
        path=tuple(cumulative),
        uncounted=uncounted,
    )


def crossing_alert(protocol: Protocol, status: RuleStatus) -> AlertRaised:
    """The one urgent alert a crossed rule raises, to the investigators and the DSMB."""
    rule = status.rule
    return AlertRaised(
        alert_id=alert_id_for("stopping", protocol.trial.id, rule.id),
        kind="stopping_boundary_crossed",
        severity=protocol.severity("stopping_boundary_crossed"),
        audience="investigators_and_dsmb",
        title=f"Stopping boundary crossed: {rule.title}",
        detail=(
            f"{status.events_at_crossing} events among the first {status.crossed_at_look} evaluable patients "
            f"reached the {rule.method} boundary (stop at {status.boundary.stop_at(status.crossed_at_look or 0)} "
            f"events at {status.crossed_at_look} patients; p0 = {rule.p0}, p1 = {rule.p1}). "
            f"Now: {status.events} events / {status.evaluable} evaluable."
        ),
        action=(
            "Suspend enrolment and further blinatumomab/DLI dosing for new patients pending DSMB review; "
            "the DSMB convenes to decide whether the trial stops (protocol stopping rule)."
        ),
        rule=rule.id,
        facts={
            "rule_id": rule.id,
            "events": status.events,
            "evaluable": status.evaluable,
            "events_at_crossing": status.events_at_crossing,
            "evaluable_at_crossing": status.crossed_at_look,
            # The boundary at ``evaluable`` (as GET /v1/stopping-rules reports it), so the mail's
            # "events / evaluable; stops at stop_at at this look" is one look's numbers.
            "stop_at": status.stop_at,
            "stop_at_crossing": status.boundary.stop_at(status.crossed_at_look or 0),
            "method": rule.method,
            "p0": rule.p0,
            "p1": rule.p1,
            "n_max": rule.n_max,
            "subjects_with_event": list(status.event_subjects),
        },
    )
