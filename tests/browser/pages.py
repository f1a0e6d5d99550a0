"""What a person does on the pages, as steps the browser tests share."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

TRIAL_ZONE = ZoneInfo("Asia/Shanghai")
ELIGIBLE = {"Stable vital signs": "Yes", "Severe infection": "No", "GVHD grade II–IV": "No",
            "Organ failure": "No", "CNS leukemia": "No", "Allergy to the study drugs": "No"}


def local_input(moment: datetime) -> str:
    return moment.astimezone(TRIAL_ZONE).strftime("%Y-%m-%dT%H:%M")


def ago(**delta: float) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)


def new_subject(site: str = "S01") -> str:
    return f"{site}-{uuid.uuid4().hex[:6]}"


def sign_in(page: Any, token: str, path: str = "/") -> None:
    page.goto(path)
    page.get_by_label("Access token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def select(page: Any, label: str, option: str) -> None:
    page.get_by_label(label, exact=True).select_option(label=option)


def fill_enrolment(page: Any, subject_id: str, *, eligibility: dict[str, str] | None = None, age: str = "34",
                   enrolled: datetime | None = None) -> None:
    page.get_by_label("Subject ID").fill(subject_id)
    page.get_by_label("Enrolled at").fill(local_input(enrolled or ago(days=3)))
    page.get_by_label("Age (years)").fill(age)
    page.get_by_label("Weight (kg)").fill("61.5")
    select(page, "Cohort", "Hematologic relapse")
    page.get_by_label("Transplant date").fill("2025-03-02")
    page.get_by_label("Relapse date").fill("2025-11-20")
    for criterion, answer in (eligibility or ELIGIBLE).items():
        select(page, f"Eligibility: {criterion}", answer)


def enrol(page: Any, subject_id: str, enrolled: datetime | None = None) -> None:
    page.goto("/patients")
    fill_enrolment(page, subject_id, enrolled=enrolled)
    page.get_by_role("button", name="Enrol").click()
    page.wait_for_url(re.compile(rf"/patients/{subject_id}\?saved=enrolment"))


def fill_crs(page: Any, *, temperature: str, when: datetime) -> None:
    page.get_by_label("Occurred at").fill(local_input(when))
    page.get_by_label("Max temperature (°C)").fill(temperature)
    select(page, "Hypotension", "Yes")
    page.get_by_label("Vasopressors", exact=True).fill("1")
    select(page, "Oxygen", "None")


def unlabelled_inputs(page: Any) -> list[str]:
    """Names of visible form controls no label names (accessibility: every input labelled)."""
    return page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(el => el.type !== 'hidden' && (!el.labels || el.labels.length === 0)
                      && !el.getAttribute('aria-label'))
        .map(el => el.name || el.id)""")


def overflows_sideways(page: Any) -> bool:
    """Whether the page scrolls sideways (unreadable on a phone or at 200% zoom)."""
    return bool(page.evaluate("() => document.documentElement.scrollWidth > window.innerWidth + 1"))


def record_dose(page: Any, subject_id: str, when: datetime) -> None:
    page.goto(f"/patients/{subject_id}/events/new?type=blinatumomab_dose")
    page.get_by_label("Occurred at").fill(local_input(when))
    page.get_by_label("Course", exact=True).fill("1")
    page.get_by_label("Day of course").fill("1")
    page.get_by_label("Dose (µg)").fill("9")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(f"**/patients/{subject_id}?saved=blinatumomab_dose")


def record_crs(page: Any, subject_id: str, *, temperature: str, when: datetime) -> None:
    page.goto(f"/patients/{subject_id}/events/new?type=crs")
    fill_crs(page, temperature=temperature, when=when)
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(f"**/patients/{subject_id}?saved=crs")
