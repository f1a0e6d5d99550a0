"""The pages read what the safety service wrote, and a record the rules cannot take is named.

- ``/patients`` lists each patient as the safety service last evaluated it (its projection), and
  a patient it has not evaluated yet from its enrolment: no patient's stream is folded per request.
- ``/stopping-rules`` answers what ``GET /v1/stopping-rules`` answers: the ``rule_inputs`` rows.
- A patient whose stored record cannot be folded is answered 409 with the failure named (API) or
  a page that names it and offers the retraction (web), never a 500; the list keeps showing it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.protocol import Protocol
from tests.integration.test_safety_bulkhead import crs3, plant_unfoldable
from tests.integration.test_safety_monitor import Ward, day, open_ward
from tests.integration.test_web_sessions import signed_in
from tests.support.api import PROBLEM, enrolment, new_token


@pytest.fixture
async def trial_ward(own_engine: AsyncEngine, protocol: Protocol, tmp_path: Path) -> AsyncIterator[Ward]:
    async with open_ward(own_engine, protocol, tmp_path) as opened:
        yield opened


def row_of(page: str, subject: str) -> str:
    """The text of the patient's row in the list."""
    found = re.search(rf'<tr>\s*<th scope="row"><a href="/patients/{subject}">.*?</tr>', page, re.S)
    assert found, f"{subject} is not listed"
    return re.sub(r"<[^>]+>|\s+", " ", found.group(0))


async def test_the_list_shows_the_safety_services_evaluation_and_a_set_aside_patient(trial_ward: Ward) -> None:
    ward = trial_ward
    poisoned, healthy = await ward.enrol(), await ward.enrol()
    ward.clock.set(day(6, 9))
    for subject in (poisoned, healthy):
        await ward.treat(subject)
    # Enrolled through the API, not yet seen by the safety service.
    waiting = enrolment(site="S01")
    assert (await ward.client.post("/v1/patients", json=waiting)).status_code == 201
    await signed_in(ward.client, await new_token(ward.engine, "investigator"))

    page = (await ward.client.get("/patients")).text
    assert "on study" in row_of(page, healthy) and "day 6 of 14" in row_of(page, healthy)
    assert "awaiting evaluation" in row_of(page, waiting["subject_id"])

    # A record the rules cannot take: the safety service sets the patient aside; the list keeps
    # it, as last evaluated, and says why it is not evaluated any more.
    bad = await plant_unfoldable(ward, poisoned)
    await ward.deliver(bad)
    row = row_of((await ward.client.get("/patients")).text, poisoned)
    assert "on study" in row and "set aside" in row and "lots" in row


async def test_a_record_that_cannot_be_folded_is_a_409_naming_it_and_the_page_offers_the_fix(
        trial_ward: Ward) -> None:
    ward = trial_ward
    subject = await ward.enrol()
    ward.clock.set(day(6, 9))
    await ward.treat(subject)
    bad = await plant_unfoldable(ward, subject)

    # Before the safety service has met it: a named problem, not an unexpected error.
    answer = await ward.client.get(f"/v1/patients/{subject}")
    assert answer.status_code == 409 and answer.headers["content-type"].startswith(PROBLEM)
    problem = answer.json()
    assert problem["type"].endswith("/record-cannot-be-evaluated") and problem["status"] == 409
    assert "lots" in problem["detail"] and f"/v1/patients/{subject}/events" in problem["detail"]
    assert (await ward.client.get(f"/v1/patients/{subject}/events")).status_code == 200

    # Once the safety service set it aside, the answer says so.
    await ward.deliver(bad)
    assert "set the patient aside" in (await ward.client.get(f"/v1/patients/{subject}")).json()["detail"]

    # The patient's page names the failure, lists the entries and offers the retraction.
    await signed_in(ward.client, await new_token(ward.engine, "site_staff", "S01"))
    page = await ward.client.get(f"/patients/{subject}")
    assert page.status_code == 409
    assert "cannot be evaluated" in page.text and "lots" in page.text and "set the patient aside" in page.text
    assert f'href="/patients/{subject}/events/new?type=retraction"' in page.text

    # Retracting the entry brings the patient back, on both.
    await ward.record(subject, {"type": "retraction", "occurred_at": day(3, 12).isoformat(),
                                "retracts_event_id": str(bad.event_id), "reason": "imported in error"})
    assert (await ward.client.get(f"/v1/patients/{subject}")).status_code == 200
    assert (await ward.client.get(f"/patients/{subject}")).status_code == 200


async def test_the_rules_page_shows_what_the_api_answers_and_whom_it_could_not_count(trial_ward: Ward) -> None:
    ward = trial_ward
    crs, quiet = await ward.enrol(), await ward.enrol()
    ward.clock.set(day(6, 9))
    for subject in (crs, quiet):
        await ward.treat(subject)
    await ward.record(crs, crs3(2))
    ward.clock.set(day(20, 9))  # the 2-week windows have closed: both are evaluable
    for subject in (crs, quiet):
        await ward.monitor.check(subject)
    await signed_in(ward.client, await new_token(ward.engine, "dsmb"))

    [api] = [r for r in (await ward.client.get("/v1/stopping-rules")).json()["rules"] if r["endpoint"].startswith("crs")]
    assert (api["events"], api["evaluable"]) == (1, 2)
    page = re.sub(r"<[^>]+>|\s+", " ", (await ward.client.get("/stopping-rules")).text)
    assert "1 event in 2 evaluable patients" in page
    assert "could not be evaluated" not in page

    bad = await plant_unfoldable(ward, quiet)
    await ward.deliver(bad)
    page = re.sub(r"<[^>]+>|\s+", " ", (await ward.client.get("/stopping-rules")).text)
    assert "1 patient could not be evaluated and is not counted" in page
    assert quiet not in page  # the DSMB's page names no patient
