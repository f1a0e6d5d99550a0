"""The DSMB summary on demand, on real parts: HTTP → event store → JetStream → notify → SMTP, and
``trialwatch digest send`` (``services.runner.send_digest_now``)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from services.notify.capture import MailCapture
from services.runner import send_digest_now
from shared.settings import Settings
from shared.store.tables import dead_letters, digests
from tests.support.clinical import at, dose, enrolment, subject_id
from tests.support.system import DSMB, INVESTIGATORS, RunningSystem, equals, eventually

pytestmark = pytest.mark.e2e


def summaries(capture: MailCapture) -> list[EmailMessage]:
    return [m for m in capture.messages() if "DSMB safety summary" in str(m["Subject"])]


def addressees(mail: EmailMessage) -> list[str]:
    return sorted(address for _, address in getaddresses([str(mail["To"])]))


def summary_json(mail: EmailMessage) -> dict[str, Any]:
    [part] = [p for p in mail.iter_attachments() if p.get_filename() == "summary.json"]
    return json.loads(part.get_content())


async def test_an_admin_asks_for_the_summary_and_only_the_dsmb_receives_it(system: RunningSystem) -> None:
    # Two patients are enrolled and dosed at site S01; the second has chronic GVHD scored by organ.
    async with system.client("site_staff") as client:
        for subject in (subject_id(), subject_id()):
            response = await client.post("/v1/patients", json=enrolment(subject, enrolled_at=at(0)))
            assert response.status_code == 201, response.text
            response = await client.post(f"/v1/patients/{subject}/events", json=dose(at(1)))
            assert response.status_code == 201, response.text
        cgvhd = {"type": "gvhd", "occurred_at": at(2), "form": "chronic", "organ_scores": {"skin": 1, "lungs": 2}}
        response = await client.post(f"/v1/patients/{subject}/events", json=cgvhd)
        assert response.status_code == 201 and response.json()["data"]["severity"] == "severe", response.text

        # A site's staff may not trigger it.
        refused = await client.post("/v1/digests")
        assert refused.status_code == 403
        assert refused.headers["content-type"].startswith("application/problem+json")

    # The admin may: accepted at once, sent by the notifier.
    async with system.client("admin") as client:
        accepted = await client.post("/v1/digests")
    assert accepted.status_code == 202, accepted.text
    [mail] = await eventually(lambda: summaries(system.capture))

    # One mail, to the DSMB only (headers and envelope), with the figures of what was recorded.
    assert addressees(mail) == sorted(DSMB)
    assert sorted(a.strip() for a in str(mail["X-Envelope-To"]).split(",")) == sorted(DSMB)
    assert summary_json(mail)["enrolled"] == {"blinatumomab_dli": 2, "usual_care": 0}
    assert summary_json(mail)["cgvhd_severity"] == [{"arm": "blinatumomab_dli", "patients": 2, "none": 1,
                                                     "mild": 0, "moderate": 0, "severe": 1}]
    # The period is marked sent just after the SMTP server took the mail.
    async def status() -> str | None:
        async with system.engine.connect() as conn:
            return await conn.scalar(select(digests.c.status).where(
                digests.c.period_key == f"request:{accepted.json()['request_id']}"))
    assert await eventually(lambda: equals(status(), "sent"), timeout=10)

    # Nothing else follows (the refused request sent nothing; the request is sent once).
    await asyncio.sleep(1.0)
    assert len(summaries(system.capture)) == 1


async def test_a_requested_summary_outlasts_an_smtp_outage_longer_than_any_give_up_and_arrives_once(
    system: RunningSystem,
) -> None:
    # SMTP goes down; retries are made fast (the backoff is the only clock here).
    await system.capture.stop()
    system.notify.digests.max_backoff = timedelta(milliseconds=50)
    async with system.client("admin") as client:
        accepted = await client.post("/v1/digests")
    assert accepted.status_code == 202, accepted.text
    key = f"request:{accepted.json()['request_id']}"

    async def row() -> Any:
        async with system.engine.connect() as conn:
            return (await conn.execute(select(digests).where(digests.c.period_key == key))).first()

    async def dead() -> int:
        async with system.engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(dead_letters)) or 0)

    # More failed tries than a message may fail before it is dead-lettered: still waiting, no dead letter.
    async def retried_past_the_give_up() -> bool:
        current = await row()
        return current is not None and current.attempts > system.settings.max_deliver + 2
    await eventually(retried_past_the_give_up, timeout=60)
    assert (await row()).status == "sending"
    assert await dead() == 0 and summaries(system.capture) == []

    # SMTP is back: exactly one summary arrives, the request is settled as sent, nothing dead.
    await system.capture.start()
    [mail] = await eventually(lambda: summaries(system.capture), timeout=30)
    assert addressees(mail) == sorted(DSMB)
    assert await eventually(lambda: equals(_status(row()), "sent"), timeout=10)
    await asyncio.sleep(1.0)  # a second copy would be in by now
    assert len(summaries(system.capture)) == 1 and await dead() == 0


async def _status(row: Any) -> str | None:
    current = await row
    return None if current is None else str(current.status)


async def test_digest_send_from_the_command_line_sends_one_mail_through_the_given_smtp_url(
    tmp_path: Path, own_database_url: str, capture: MailCapture
) -> None:
    settings = Settings(data_dir=tmp_path, database_url=own_database_url, smtp_url=capture.url,
                        dsmb_emails=DSMB, investigator_emails=INVESTIGATORS)

    result = await send_digest_now(settings)

    assert result["status"] == "sent" and result["requested_by"] == "cli"
    assert result["period_key"].startswith("manual:")
    [mail] = capture.messages()
    assert addressees(mail) == sorted(DSMB)
    assert summary_json(mail)["enrolled"] == {"blinatumomab_dli": 0, "usual_care": 0}
    # A second run is another period: another mail (no accidental de-duplication across runs).
    assert (await send_digest_now(settings))["status"] == "sent"
    assert len(capture.messages()) == 2
