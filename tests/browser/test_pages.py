"""The web pages driven in a real browser, as staff, investigators and the DSMB use them."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import update

from services.ingest.auth import token_hash
from shared.events import ALERT_RAISED, AlertRaised, NewEvent, alert_id_for, alert_stream, patient_stream
from shared.store import eventstore
from shared.store.eventstore import now_utc
from shared.store.tables import api_tokens
from tests.browser.conftest import IngestThread, shot
from tests.browser.pages import (
    ELIGIBLE,
    ago,
    enrol,
    fill_crs,
    fill_enrolment,
    local_input,
    new_subject,
    overflows_sideways,
    record_crs,
    record_dose,
    sign_in,
    unlabelled_inputs,
)

EVENT_TYPES = ["blinatumomab_dose", "dli", "crs", "icans", "gvhd", "infection", "lab", "disease_assessment",
               "relapse", "assessment_completed", "death", "follow_up", "withdrawal"]


def stored_events(page: Any, ingest: IngestThread, token: str, subject_id: str) -> list[dict[str, Any]]:
    """The patient's history as the API answers it (what the pages stored)."""
    answer = page.request.get(f"{ingest.url}/v1/patients/{subject_id}/events",
                              headers={"Authorization": f"Bearer {token}"})
    assert answer.status == 200, answer.text()
    return answer.json()["events"]  # type: ignore[no-any-return]


def raise_alert(ingest: IngestThread, subject_id: str | None, site: str | None, title: str) -> uuid.UUID:
    """What the safety service does: a ``safety_alert_raised`` event in the alert's own stream."""
    alert_id = alert_id_for(subject_id, "crs_grade_3_plus", uuid.uuid4())
    data = AlertRaised(alert_id=alert_id, kind="crs_grade_3_plus", severity="urgent", subject_id=subject_id,
                       site_id=site, title=title, detail="Grade 3 CRS in the 2-week window",
                       action="Review the patient today", rule="crs_grade_3_plus").model_dump(mode="json")
    event = NewEvent(type=ALERT_RAISED, subject_id=subject_id, occurred_at=now_utc(), recorded_by="safety", data=data)

    async def append(engine: Any) -> None:
        async with engine.begin() as conn:
            await eventstore.append(conn, alert_stream(alert_id), [event])

    ingest.call(append)
    return alert_id


def test_staff_enrol_record_a_crs_and_see_its_grade(new_page: Any, ingest: IngestThread) -> None:
    token = ingest.token("site_staff", "S01", user="nurse-s01")
    page = new_page(javascript=False)  # entry works without JavaScript

    # Signing in lands on the site's patients.
    page.goto("/")
    shot(page, "01-sign-in")
    sign_in(page, token)
    page.wait_for_url("**/patients")
    cookie = next(c for c in page.context.cookies() if c["name"] == "tw_session")
    assert cookie["httpOnly"] and cookie["sameSite"] in ("Lax", "Strict") and cookie["expires"] > 0
    assert token not in cookie["value"] and token_hash(token) not in cookie["value"]

    # An ineligible patient is refused, every failed criterion shown beside its field.
    subject_id = new_subject()
    fill_enrolment(page, subject_id, age="70",
                   eligibility=ELIGIBLE | {"Severe infection": "Yes", "CNS leukemia": "Yes"})
    page.get_by_role("button", name="Enrol").click()
    assert page.get_by_role("heading", name="Nothing was saved").is_visible()
    for field_id in ("f-age_years", "f-eligibility-severe_infection", "f-eligibility-cns_leukemia"):
        assert page.locator(f"#{field_id}").get_attribute("aria-invalid") == "true"
        assert page.locator(f"#{field_id}-error").is_visible()
    shot(page, "02-enrolment-refused")
    assert page.request.get(f"{ingest.url}/v1/patients/{subject_id}",
                            headers={"Authorization": f"Bearer {token}"}).status == 404

    # Enrolled once eligible; the patient shows in the list at once, and its state once the
    # safety service has evaluated it (the list reads what the safety service wrote).
    enrol(page, subject_id)
    page.goto("/patients")
    assert page.get_by_role("link", name=subject_id).is_visible()
    assert "awaiting evaluation" in page.get_by_role("row", name=subject_id).inner_text()
    ingest.evaluate()
    page.goto("/patients")
    assert "on study" in page.get_by_role("row", name=subject_id).inner_text()
    shot(page, "03-patients")

    # A CRS from observations: the derived grade shows on the timeline as "Grade 3".
    page.goto(f"/patients/{subject_id}")
    page.get_by_role("link", name="CRS (cytokine release syndrome)").click()
    assert unlabelled_inputs(page) == []
    fill_crs(page, temperature="39.5", when=ago(hours=2))
    shot(page, "04-crs-form")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(f"**/patients/{subject_id}?saved=crs")
    assert page.locator(".timeline .grade", has_text="Grade 3 (ASTCT-2019)").is_visible()
    shot(page, "05-patient-timeline")

    # An impossible temperature is shown beside its field, and nothing is stored.
    before = len(stored_events(page, ingest, token, subject_id))
    page.goto(f"/patients/{subject_id}/events/new?type=crs")
    fill_crs(page, temperature="50", when=ago(hours=1))
    page.get_by_role("button", name="Save").click()
    error = page.locator("#f-max_temp_c-error")
    assert "less than or equal to 45" in error.inner_text()
    assert page.get_by_label("Max temperature (°C)").input_value() == "50"
    shot(page, "06-crs-invalid")
    assert len(stored_events(page, ingest, token, subject_id)) == before

    # Fixing it and saving twice (a double submit, the form resent) stores one event.
    page.get_by_label("Max temperature (°C)").fill("38.4")
    form = page.locator("form.entry")
    sent = dict(form.evaluate("f => Object.fromEntries(new FormData(f))"))
    action = form.get_attribute("action")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(f"**/patients/{subject_id}?saved=crs")
    again = page.request.post(f"{ingest.url}{action}", form=sent, max_redirects=0)
    assert again.status == 303
    assert len(stored_events(page, ingest, token, subject_id)) == before + 1

    # Sign out ends the session: the pages send the browser back to sign in.
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/?signed_out=1")
    page.goto("/patients")
    assert page.get_by_label("Access token").is_visible()


def test_corrections_and_retractions_from_the_timeline(new_page: Any, ingest: IngestThread) -> None:
    token = ingest.token("site_staff", "S01", user="nurse-amend")
    page = new_page(javascript=False)
    sign_in(page, token)
    subject_id = new_subject()
    enrol(page, subject_id)
    page.goto(f"/patients/{subject_id}/events/new?type=crs")
    fill_crs(page, temperature="39.5", when=ago(hours=5))
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(f"**/patients/{subject_id}?saved=crs")

    # Correct: the form starts from the entry; vasopressors 0 makes it grade 2.
    page.locator("li.crs summary").click()
    page.get_by_role("link", name=re.compile("Correct this CRS")).click()
    assert page.get_by_label("Max temperature (°C)").input_value() == "39.5"
    page.get_by_label("Vasopressors", exact=True).fill("0")
    page.get_by_role("button", name="Save").click()  # a correction needs its reason
    assert page.locator("#f-correction_reason-error").is_visible()
    assert page.get_by_label("Vasopressors", exact=True).input_value() == "0"
    page.get_by_label("Reason for the correction").fill("vasopressor was never started")
    shot(page, "07-correction-form")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(f"**/patients/{subject_id}?saved=correction")
    assert page.locator("li.correction .grade", has_text="Grade 2").is_visible()
    assert page.locator("li.crs .badge", has_text="corrected").is_visible()

    # Retract the correction: the original grade 3 stands again.
    page.locator("li.correction summary").click()
    page.locator("li.correction").get_by_label("Reason for retracting this entry").fill("entered in error")
    page.locator("li.correction").get_by_role("button", name="Retract").click()
    page.wait_for_url(f"**/patients/{subject_id}?saved=retraction")
    assert page.locator("li.correction .badge", has_text="retracted").is_visible()
    shot(page, "08-timeline-amended")
    # The generic amendment pages: choose an entry to correct; retract one from a generated form.
    page.goto(f"/patients/{subject_id}/events/new?type=correction")
    assert unlabelled_inputs(page) == []
    page.get_by_label("Entry to correct").select_option(index=1)
    page.get_by_role("button", name="Continue").click()
    assert page.get_by_label("Max temperature (°C)").input_value() == "39.5"
    page.goto(f"/patients/{subject_id}/events/new?type=retraction")
    assert unlabelled_inputs(page) == []
    page.get_by_label("Entry to retract").select_option(index=1)  # the newest live entry: the CRS
    page.get_by_role("button", name="Save").click()
    assert page.locator("#f-reason-error").is_visible()  # a retraction needs its reason
    page.get_by_label("Reason", exact=True).fill("duplicate of a paper record")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(f"**/patients/{subject_id}?saved=retraction")
    assert page.locator("li.crs .badge", has_text="retracted").is_visible()
    types = [e["type"] for e in stored_events(page, ingest, token, subject_id)]
    assert types == ["patient_enrolled", "crs", "correction", "retraction", "retraction"]


def test_every_event_form_is_generated_and_labelled(new_page: Any, ingest: IngestThread) -> None:
    token = ingest.token("site_staff", "S01", user="nurse-forms")
    page = new_page()
    sign_in(page, token)
    subject_id = new_subject()
    enrol(page, subject_id)
    for type_ in EVENT_TYPES:
        page.goto(f"/patients/{subject_id}/events/new?type={type_}")
        assert page.get_by_label("Occurred at").get_attribute("type") == "datetime-local"
        assert unlabelled_inputs(page) == [], type_
    page.goto(f"/patients/{subject_id}/events/new?type=crs")
    oxygen = page.get_by_label("Oxygen").locator("option").evaluate_all("os => os.map(o => o.value)")
    assert oxygen == ["", "none", "low_flow_nasal_cannula", "high_flow_nasal_cannula", "facemask",
                      "nonrebreather", "venturi", "cpap", "bipap", "mechanical_ventilation"]
    page.goto(f"/patients/{subject_id}/events/new?type=gvhd")
    shot(page, "09-gvhd-form")

    # A lab value, entered by keyboard alone: its CTCAE grade is derived and shown.
    page.goto(f"/patients/{subject_id}/events/new?type=lab")
    page.get_by_label("Occurred at").fill(local_input(ago(hours=1)))
    page.get_by_label("Test", exact=True).focus()
    for keys in ("p", "Tab", "2", "0", "Tab", "1", "Tab", "Enter"):  # test, value, unit, LLN, submit
        page.keyboard.press(keys)
    page.wait_for_url(f"**/patients/{subject_id}?saved=lab")
    assert page.locator("li.lab .grade", has_text="Grade 4 (CTCAE-5.0)").is_visible()


def test_investigator_filters_and_acknowledges_alerts(new_page: Any, ingest: IngestThread) -> None:
    staff = ingest.token("site_staff", "S01", user="nurse-alerts")
    page = new_page()
    sign_in(page, staff)
    subject_id = new_subject()
    enrol(page, subject_id)
    alert_id = raise_alert(ingest, subject_id, "S01", f"Grade 3 CRS for {subject_id}")

    # Staff see their patient's alert, but may not acknowledge it.
    page.goto("/alerts")
    item = page.locator(f"#alert-{alert_id}")
    assert item.is_visible() and item.get_by_role("button", name="Acknowledge").count() == 0

    investigator = new_page(javascript=False)
    sign_in(investigator, ingest.token("investigator", user="pi"))
    investigator.goto("/alerts")
    investigator.get_by_label("Severity").select_option("urgent")
    investigator.get_by_label("Status").select_option("open")
    investigator.get_by_role("button", name="Filter").click()
    item = investigator.locator(f"#alert-{alert_id}")
    assert subject_id in item.inner_text()
    shot(investigator, "10-alerts")
    item.get_by_label("Note (optional)").fill("called the ward; tocilizumab given")
    item.get_by_role("button", name="Acknowledge").click()
    investigator.wait_for_url(re.compile(r".*acknowledged=.*"))
    acknowledged = investigator.locator(f"#alert-{alert_id}").inner_text()
    assert "Acknowledged by pi" in acknowledged and "Note: called the ward; tocilizumab given" in acknowledged
    assert "severity=urgent" in investigator.url
    shot(investigator, "11-alert-acknowledged")

    answer = investigator.request.get(f"{ingest.url}/v1/alerts?subject_id={subject_id}",
                                      headers={"Authorization": f"Bearer {staff}"})
    [alert] = answer.json()["alerts"]
    assert alert["acknowledged_by"] == "pi"
    assert alert["acknowledgement_note"] == "called the ward; tocilizumab given"

    # The alert mail's link lands on the patient's page (after signing in).
    investigator.goto(f"/patients/{subject_id}")
    assert investigator.get_by_role("heading", name=f"Patient {subject_id}").is_visible()


def test_dsmb_sees_the_stopping_rules_and_no_patient(new_page: Any, ingest: IngestThread) -> None:
    # Two patients become evaluable for the CRS rule: one with grade 3 CRS in the 2-week window,
    # one whose window closed without it.
    staff = new_page()
    sign_in(staff, ingest.token("site_staff", "S01", user="nurse-dsmb"))
    subject_id, quiet = new_subject(), new_subject()
    enrol(staff, subject_id)
    record_dose(staff, subject_id, ago(days=2))
    record_crs(staff, subject_id, temperature="39.5", when=ago(days=1))
    enrol(staff, quiet, enrolled=ago(days=30))
    record_dose(staff, quiet, ago(days=25))
    ingest.evaluate()  # the page shows the rules over what the safety service wrote

    page = new_page()
    sign_in(page, ingest.token("dsmb", user="dsmb-chair"))
    page.wait_for_url("**/stopping-rules")
    rules = page.locator("section.rule")
    assert rules.count() == 3
    crs = rules.filter(has_text="CRS")
    assert crs.locator("svg.chart polyline").count() == 2  # the boundary and the events path
    assert re.search(r"\b1 event in [2-9]\d* evaluable", crs.inner_text())
    assert rules.first.get_by_role("table").is_visible()
    assert page.get_by_role("link", name="Patients").count() == 0
    shot(page, "12-stopping-rules")

    for path in ("/patients", f"/patients/{subject_id}", f"/patients/{subject_id}/events/new?type=crs"):
        assert page.goto(path).status == 403, path
    shot(page, "13-dsmb-refused")


def test_refusals_other_site_csrf_and_revoked_tokens(new_page: Any, ingest: IngestThread) -> None:
    s01 = new_page()
    sign_in(s01, ingest.token("site_staff", "S01", user="nurse-refusals"))
    subject_id = new_subject()
    enrol(s01, subject_id)

    # Another site's staff get the answer for an unknown patient.
    s02_token = ingest.token("site_staff", "S02", user="nurse-s02")
    s02 = new_page()
    sign_in(s02, s02_token)
    assert s02.goto(f"/patients/{subject_id}").status == 404
    shot(s02, "14-other-site-404")
    unknown = s02.goto("/patients/S02-nobody")
    assert unknown.status == 404
    assert s02.goto(f"/patients/{subject_id}/events/new?type=crs").status == 404
    s02.goto("/patients")
    assert s02.get_by_role("link", name=subject_id).count() == 0

    # A post without the session's CSRF token (a cross-site form) is refused; nothing stored.
    s01.goto(f"/patients/{subject_id}/events/new?type=follow_up")
    sent = dict(s01.locator("form.entry").evaluate("f => Object.fromEntries(new FormData(f))"))
    forged = {k: v for k, v in sent.items() if k != "csrf"}
    answer = s01.request.post(f"{ingest.url}/patients/{subject_id}/events/new?type=follow_up", form=forged,
                              max_redirects=0)
    assert answer.status == 403
    answer = s01.request.post(f"{ingest.url}/patients/{subject_id}/events/new?type=follow_up",
                              form=forged | {"csrf": "guessed"}, max_redirects=0)
    assert answer.status == 403
    s01.goto(f"/patients/{subject_id}")
    assert s01.locator("li.follow_up").count() == 0

    # Revoking the token ends its sessions at once.
    async def revoke(engine: Any) -> None:
        async with engine.begin() as conn:
            await conn.execute(update(api_tokens).where(api_tokens.c.token_hash == token_hash(s02_token))
                               .values(revoked_at=now_utc()))

    ingest.call(revoke)
    s02.goto("/patients")
    assert s02.get_by_label("Access token").is_visible()
    s02.goto("/")
    s02.get_by_label("Access token").fill(s02_token)
    s02.get_by_role("button", name="Sign in").click()
    assert s02.get_by_text("unknown, expired or revoked").is_visible()


def test_readable_on_a_phone_and_at_200_percent_zoom(new_page: Any, ingest: IngestThread) -> None:
    token = ingest.token("site_staff", "S01", user="nurse-phone")
    desk = new_page()
    sign_in(desk, token)
    subject_id = new_subject()
    enrol(desk, subject_id)
    desk.goto(f"/patients/{subject_id}/events/new?type=crs")
    fill_crs(desk, temperature="39.5", when=ago(hours=2))
    desk.get_by_role("button", name="Save").click()
    raise_alert(ingest, subject_id, "S01", f"Grade 3 CRS for {subject_id}")
    ingest.evaluate()
    dsmb = ingest.token("dsmb", user="dsmb-phone")

    for label, size in (("phone", {"width": 390, "height": 844, "scale": 2}),
                        ("zoom200", {"width": 640, "height": 450, "scale": 2})):  # 1280 px at 200%
        page = new_page(**size)
        sign_in(page, token)
        for name, path in (("patients", "/patients"), ("patient", f"/patients/{subject_id}"),
                           ("crs-form", f"/patients/{subject_id}/events/new?type=crs"), ("alerts", "/alerts")):
            page.goto(path)
            shot(page, f"{label}-{name}")
            assert not overflows_sideways(page), f"{path} scrolls sideways ({label})"
        rules = new_page(**size)
        sign_in(rules, dsmb)
        shot(rules, f"{label}-stopping-rules")
        assert not overflows_sideways(rules)


def test_a_record_the_rules_cannot_take_is_named_on_its_page_and_in_the_list(new_page: Any,
                                                                             ingest: IngestThread) -> None:
    staff = new_page()
    sign_in(staff, ingest.token("site_staff", "S01", user="nurse-poisoned"))
    subject_id = new_subject()
    enrol(staff, subject_id)
    record_dose(staff, subject_id, ago(days=3))

    # A DLI whose cell dose is not a number, planted straight into the store (past every check).
    bad = NewEvent(type="dli", subject_id=subject_id, occurred_at=now_utc() - timedelta(days=1),
                   recorded_by="a bad import", data={"mnc_per_kg": "lots"})

    async def plant(engine: Any) -> None:
        async with engine.begin() as conn:
            await eventstore.append(conn, patient_stream(subject_id), [bad])

    ingest.call(plant)
    ingest.evaluate()

    # The patient's page names the failure and offers the retraction; the list marks the patient.
    answer = staff.goto(f"/patients/{subject_id}")
    assert answer.status == 409
    assert staff.get_by_role("heading", name="This patient's record cannot be evaluated").is_visible()
    assert "lots" in staff.locator("section.problems").inner_text()
    shot(staff, "15-record-cannot-be-evaluated")
    staff.get_by_role("link", name="Retract an entry").click()
    assert staff.get_by_role("button", name="Save").is_visible()

    staff.goto("/patients")
    row = staff.get_by_role("row", name=subject_id).inner_text()
    assert "set aside" in row.lower() and "lots" in row
    shot(staff, "16-patients-set-aside")
