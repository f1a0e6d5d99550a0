"""The study protocol as data: a TOML file validated by pydantic.

A second trial needs a second file, not new code. A bad file is refused at start with every
problem named (``ProtocolError`` lists pydantic's errors by their path in the file).
"""

from __future__ import annotations

import tomllib
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUNDLED = Path(__file__).resolve().parent / "protocols" / "blinatumomab_dli.toml"
Severity = Literal["urgent", "high", "info"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {value!r}") from exc
    return value


class Trial(_Model):
    id: str
    title: str
    timezone: str
    max_age_years: float = Field(gt=0)
    ctcae_version: Literal["5.0"] = "5.0"

    _zone = field_validator("timezone")(_zone)


class Recipients(_Model):
    investigators: list[str] = Field(min_length=1)
    dsmb: list[str] = Field(min_length=1)


MAX_STEP_DAY = 28


class DoseStep(_Model):
    from_day: int = Field(ge=1, le=MAX_STEP_DAY)
    to_day: int = Field(ge=1, le=MAX_STEP_DAY)
    dose_ug: float = Field(gt=0)


class CohortPlan(_Model):
    label: str
    min_course_days: int = Field(ge=1, le=28)
    max_course_days: int = Field(ge=1, le=28)
    schedule: list[DoseStep] = Field(min_length=1)
    # A later course may also follow this one (the label's cycle 2: 28 µg from day 1, no step-up).
    later_course_schedule: list[DoseStep] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> CohortPlan:
        if self.min_course_days > self.max_course_days:
            raise ValueError("min_course_days is above max_course_days")
        for name, schedule in (("schedule", self.schedule), ("later_course_schedule", self.later_course_schedule)):
            days: set[int] = set()
            for step in schedule:
                if step.from_day > step.to_day:
                    raise ValueError(f"{name} step from_day {step.from_day} is after to_day {step.to_day}")
                span = set(range(step.from_day, step.to_day + 1))
                if days & span:
                    raise ValueError(f"{name} steps overlap on days {sorted(days & span)}")
                days |= span
        return self

    def doses_for(self, course: int, day: int) -> list[float]:
        """The doses on schedule for ``day`` of ``course``: the schedule's, and for a later course
        also ``later_course_schedule``'s."""
        found = self._doses_by_day.get((course > 1, day))
        return list(found) if found is not None else self._doses_on(course, day)

    def _doses_on(self, course: int, day: int) -> list[float]:
        options = [_dose_on(self.schedule, day)]
        if course > 1:
            options.append(_dose_on(self.later_course_schedule, day))
        return list(dict.fromkeys(d for d in options if d is not None))

    @cached_property
    def _doses_by_day(self) -> dict[tuple[bool, int], tuple[float, ...]]:
        """``_doses_on`` of every day a step can name, for a first and for a later course, worked
        out once: the fold asks for every dose of every patient."""
        return {(later, day): tuple(self._doses_on(2 if later else 1, day))
                for later in (False, True) for day in range(1, MAX_STEP_DAY + 1)}


def _dose_on(schedule: list[DoseStep], day: int) -> float | None:
    return next((step.dose_ug for step in schedule if step.from_day <= day <= step.to_day), None)


class Dosing(_Model):
    tolerance_pct: float = Field(ge=0, le=50)


class DliPlan(_Model):
    min_mnc_per_kg: float = Field(gt=0)
    max_mnc_per_kg: float = Field(gt=0)
    second_course_min_months: int = Field(ge=0)
    second_course_max_months: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> DliPlan:
        if self.min_mnc_per_kg > self.max_mnc_per_kg:
            raise ValueError("min_mnc_per_kg is above max_mnc_per_kg")
        if self.second_course_min_months > self.second_course_max_months:
            raise ValueError("second_course_min_months is above second_course_max_months")
        return self


class Window(_Model):
    anchor: Literal["course1_start", "dli"]
    length_days: int = Field(ge=1)
    grace_days: int = Field(ge=0)


class Labs(_Model):
    lln: dict[Literal["neutrophils", "platelets", "hemoglobin", "wbc", "lymphocytes"], float]
    lln_unit: dict[Literal["neutrophils", "platelets", "hemoglobin", "wbc", "lymphocytes"],
                   Literal["10^9/L", "cells/mm3", "g/dL", "g/L"]]


Endpoint = Literal["crs_grade_3_plus_2w", "agvhd_grade_3_4_100d", "nrm_100d"]


class StoppingRule(_Model):
    id: str = Field(pattern=r"^[a-z0-9_]{1,64}$")
    title: str
    endpoint: Endpoint
    method: Literal["pocock", "bayes"]
    p0: float = Field(gt=0, lt=1)
    p1: float | None = Field(default=None, gt=0, lt=1)
    n_max: int = Field(ge=2, le=2000)
    cp0: float = Field(default=0.10, gt=0, lt=1)
    looks: int = Field(default=1, ge=1)
    prior_a: float = Field(default=1.0, gt=0)
    prior_b: float = Field(default=1.0, gt=0)
    threshold: float = Field(default=0.95, gt=0, lt=1)
    count_withdrawn: bool = False
    count_dead: bool = False

    @model_validator(mode="after")
    def _p1_above_p0(self) -> StoppingRule:
        if self.p1 is not None and self.p1 <= self.p0:
            raise ValueError(f"p1 ({self.p1}) must be above p0 ({self.p0})")
        return self


class Digest(_Model):
    cron: str
    timezone: str

    _zone = field_validator("timezone")(_zone)

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"bad cron expression {value!r}: {exc}") from exc
        return value


class Entry(_Model):
    """How data entry is waited for. An alert that a missing record justifies (an assessment
    overdue, a course too short, a DLI or course 2 with nothing before it) waits until the
    patient's record has been quiet for ``settle_seconds``: entering a late history event by event
    passes through states that lack what comes next, and each would otherwise be mailed and then
    withdrawn. Alerts on what *was* recorded (an urgent grade, a dose off schedule) never wait."""

    settle_seconds: float = Field(5.0, ge=0, le=3600)


AlertKind = Literal[
    "crs_grade_3_plus", "icans_grade_3_plus", "agvhd_grade_3_4", "infection_grade_4_plus", "death",
    "stopping_boundary_crossed", "protocol_deviation", "assessment_overdue", "crs_low_grade",
    "icans_low_grade", "agvhd_grade_1_2", "cgvhd", "infection_grade_3", "heme_ae_grade_3_plus",
    "relapse", "withdrawal",
]


class Protocol(_Model):
    trial: Trial
    recipients: Recipients
    cohorts: dict[Literal["mrd_positive", "hematologic_relapse"], CohortPlan]
    dosing: Dosing
    dli: DliPlan
    windows: dict[Literal["day14", "day100"], Window]
    labs: Labs
    alerts: dict[AlertKind, Severity]
    entry: Entry = Field(default_factory=Entry)
    stopping_rules: list[StoppingRule] = Field(default_factory=list)
    digest: Digest

    @model_validator(mode="after")
    def _complete(self) -> Protocol:
        missing = [c for c in ("mrd_positive", "hematologic_relapse") if c not in self.cohorts]
        if missing:
            raise ValueError(f"cohorts missing: {missing}")
        missing = [w for w in ("day14", "day100") if w not in self.windows]
        if missing:
            raise ValueError(f"windows missing: {missing}")
        ids = [r.id for r in self.stopping_rules]
        if len(ids) != len(set(ids)):
            raise ValueError(f"stopping rule ids repeat: {ids}")
        return self

    @cached_property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.trial.timezone)

    def severity(self, kind: str) -> Severity:
        return self.alerts.get(kind, "info")  # type: ignore[call-overload,no-any-return]

    def rule(self, rule_id: str) -> StoppingRule | None:
        return next((r for r in self.stopping_rules if r.id == rule_id), None)


class ProtocolError(Exception):
    """The protocol file cannot be used; ``problems`` names each one."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path, self.problems = path, problems
        super().__init__(f"protocol file {path} is not valid:\n  - " + "\n  - ".join(problems))


def load_protocol(path: Path | None = None) -> Protocol:
    path = path or BUNDLED
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProtocolError(path, [f"cannot read it: {exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProtocolError(path, [f"not TOML: {exc}"]) from exc
    try:
        return Protocol.model_validate(raw)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        ]
        raise ProtocolError(path, problems) from exc


def add_months(day: date, months: int) -> date:
    """Calendar months, the day clamped to the month's end (Jan 31 + 1 month = Feb 28/29)."""
    import calendar

    month_index = day.month - 1 + months
    year, month = day.year + month_index // 12, month_index % 12 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))
