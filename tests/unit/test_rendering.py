import email
import email.policy
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from services.notify.mailer import wire_bytes
from services.notify.rendering import compose, render_alert
from shared.events import (
    ALERT_RAISED,
    ALERT_WITHDRAWN,
    STOPPING_BOUNDARY_CROSSED,
    AlertRaised,
    AlertWithdrawn,
)

API = "https://trialwatch.example.org/"
TRIAL = "Blinatumomab + DLI after allo-HSCT"
RECORDED = datetime(2025, 11, 24, 2, 5, tzinfo=UTC)


def raised(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "alert_id": uuid.uuid4(),
        "kind": "crs_grade_3_plus",
        "severity": "urgent",
        "subject_id": "S01-004",
        "site_id": "S01",
        "title": "Grade 3 CRS",
        "detail": "ASTCT grade 3 CRS on day 5 of course 1.",
        "action": "See the patient now; consider tocilizumab.",
        "rule": "crs_grade_3_plus",
        "cause_event_ids": (uuid.uuid4(),),
        "cause_occurred_at": datetime.fromisoformat("2025-11-24T09:30:00+08:00"),
        "cause_recorded_at": datetime.fromisoformat("2025-11-24T10:02:00+08:00"),
        "facts": {"grade": 3, "max_temp_c": 39.2, "vasopressors": 1, "day": 5},
    }
    return AlertRaised(**{**fields, **overrides}).model_dump(mode="json")


def stopping(**overrides: Any) -> dict[str, Any]:
    return raised(
        kind="stopping_boundary_crossed", audience="investigators_and_dsmb", subject_id=None, site_id=None,
        title="Grade >= 3 CRS within the 2-week window", rule="crs_grade_3_plus",
        detail="4 of 12 evaluable patients had grade >= 3 CRS in the 2-week window.",
        action="Pause enrolment and convene the DSMB.", cause_occurred_at=None, cause_recorded_at=None,
        facts={"rule_id": "crs_grade_3_plus", "events": 4, "evaluable": 12, "stop_at": 4}, **overrides,
    )


def render(event_type: str, data: dict[str, Any]) -> Any:
    return render_alert(event_type, data, recorded_at=RECORDED, api_base_url=API, trial_title=TRIAL)


# --------------------------------------------------------------------------- subjects


@pytest.mark.parametrize(("severity", "label"), [("urgent", "URGENT"), ("high", "HIGH"), ("info", "INFO")])
def test_subject_names_severity_subject_and_title(severity: str, label: str) -> None:
    mail = render(ALERT_RAISED, raised(severity=severity))
    assert mail.subject == f"[TrialWatch] {label} S01-004: Grade 3 CRS"


def test_protocol_deviation_subject() -> None:
    data = raised(severity="high", kind="protocol_deviation", title="DLI dose outside 5e7-1e8 MNC/kg")
    assert render(ALERT_RAISED, data).subject == "[TrialWatch] HIGH S01-004: DLI dose outside 5e7-1e8 MNC/kg"


def test_withdrawn_subject() -> None:
    data = AlertWithdrawn(
        alert_id=uuid.uuid4(), kind="crs_grade_3_plus", severity="urgent", subject_id="S01-004",
        site_id="S01", title="Grade 3 CRS", reason="The CRS event was corrected to grade 2.",
    ).model_dump(mode="json")
    mail = render(ALERT_WITHDRAWN, data)
    assert mail.subject == "[TrialWatch] WITHDRAWN S01-004: Grade 3 CRS"
    assert "The CRS event was corrected to grade 2." in mail.text
    assert "No action is needed" in mail.text
    assert str(data["alert_id"]) in mail.text


def test_stopping_rule_subject_has_no_subject_id() -> None:
    mail = render(STOPPING_BOUNDARY_CROSSED, stopping())
    assert mail.subject == "[TrialWatch] URGENT stopping rule crossed: Grade >= 3 CRS within the 2-week window"


def test_withdrawn_stopping_rule_subject() -> None:
    data = AlertWithdrawn(
        alert_id=uuid.uuid4(), kind="stopping_boundary_crossed", severity="urgent",
        audience="investigators_and_dsmb", title="Grade >= 3 CRS within the 2-week window",
        reason="A correction brought the count back under the boundary.",
    ).model_dump(mode="json")
    mail = render(ALERT_WITHDRAWN, data)
    assert mail.subject == "[TrialWatch] WITHDRAWN stopping rule crossed: Grade >= 3 CRS within the 2-week window"
    assert f"{API.rstrip('/')}/stopping-rules" in mail.text


def test_a_title_with_line_breaks_cannot_break_the_subject_header() -> None:
    mail = render(ALERT_RAISED, raised(title="Grade 3\r\nBcc: everyone@example.org"))
    assert "\n" not in mail.subject and "\r" not in mail.subject


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(ValueError, match="crs"):
        render("crs", raised())


# --------------------------------------------------------------------------- bodies


def test_body_says_what_when_why_and_what_to_do() -> None:
    data = raised()
    mail = render(ALERT_RAISED, data)
    for part in (mail.text, mail.html):
        assert "ASTCT grade 3 CRS on day 5 of course 1." in part
        assert "2025-11-24T09:30:00+08:00" in part  # clinical time, its own offset
        assert "2025-11-24T10:02:00+08:00" in part  # when it was recorded
        assert "2025-11-24T02:05:00+00:00" in part  # when the alert was raised
        assert "crs_grade_3_plus" in part
        assert "max temp c" in part and "39.2" in part
        assert "See the patient now; consider tocilizumab." in part
        assert data["alert_id"] in part
        assert "Subject" in part and "S01-004" in part and "S01" in part


def test_stopping_rule_body_shows_the_boundary_at_this_look() -> None:
    mail = render(STOPPING_BOUNDARY_CROSSED, stopping())
    assert "4 events / 12 evaluable; stops at 4 at this look" in mail.text
    assert "<strong>4</strong> events / <strong>12</strong> evaluable" in mail.html
    assert "Pause enrolment and convene the DSMB." in mail.text


def test_link_to_the_patient() -> None:
    mail = render(ALERT_RAISED, raised())
    link = "https://trialwatch.example.org/patients/S01-004"  # the patient's web page
    assert link in mail.text
    assert f'href="{link}"' in mail.html


def test_link_to_the_stopping_rules() -> None:
    mail = render(STOPPING_BOUNDARY_CROSSED, stopping())
    assert "https://trialwatch.example.org/stopping-rules" in mail.text
    assert "/patients/" not in mail.text


def test_html_is_escaped_text_is_verbatim() -> None:
    mail = render(ALERT_RAISED, raised(detail="<script>alert('x')</script> & more", title="CRS <b>3</b>"))
    assert "<script>" not in mail.html
    assert "&lt;script&gt;" in mail.html
    assert "&amp; more" in mail.html
    assert "<b>3</b>" not in mail.html
    assert "<script>alert('x')</script> & more" in mail.text


def test_no_identifiers_beyond_subject_and_site() -> None:
    facts = {"grade": 3, "patient_name": "Jane Doe", "date_of_birth": "1990-01-02", "dob": "1990-01-02",
             "mrn": "H123456", "initials": "JD"}
    mail = render(ALERT_RAISED, raised(facts=facts))
    for part in (mail.text, mail.html):
        for leaked in ("Jane Doe", "1990-01-02", "H123456", "JD", "patient name", "birth", "mrn"):
            assert leaked not in part
        assert "grade" in part


def test_compose_builds_a_text_and_html_message_with_our_message_id() -> None:
    mail = render(ALERT_RAISED, raised())
    message = compose(
        mail, mail_from="trialwatch@localhost", to="pi@example.org", message_id="<abc.123@trialwatch>",
        date=RECORDED, severity="urgent", in_reply_to=["<raised.1@trialwatch>"],
    )
    assert message["Subject"] == mail.subject
    assert message["Message-ID"] == "<abc.123@trialwatch>"
    assert message["In-Reply-To"] == "<raised.1@trialwatch>"
    assert message["Importance"] == "high"
    assert message.get_body(("plain",)).get_content() == mail.text
    assert message.get_body(("html",)).get_content().strip() == mail.html.strip()



def test_a_mail_with_non_ascii_text_is_composed_7_bit_clean_and_goes_on_the_wire_as_composed() -> None:
    # The parts are encoded once, as they are composed: a part composed "8bit" made the 7-bit wire
    # flattening copy the whole message and encode it again, a third of the sender's CPU per mail.
    mail = render(ALERT_RAISED, raised(detail="Grade ≥ 3 CRS — 9 µg/day · day 5", title="Grade 3 CRS — course 1"))
    message = compose(mail, mail_from="trialwatch@localhost", to="pi@example.org", message_id="<u.1@trialwatch>",
                      date=RECORDED, severity="urgent")

    encodings = {part["Content-Transfer-Encoding"] for part in message.iter_parts()}
    assert encodings <= {"7bit", "quoted-printable", "base64"}, encodings
    assert wire_bytes(message) == message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    back = email.message_from_bytes(wire_bytes(message), policy=email.policy.default)
    assert back.get_body(("plain",)).get_content().replace("\r\n", "\n") == mail.text
    assert "Grade ≥ 3 CRS — 9 µg/day · day 5" in mail.text

def test_stopping_rule_subject_says_crossed_once_for_the_safety_services_titles() -> None:
    from shared.clinical.stopping import crossing_alert, evaluate_rule
    from shared.protocol import load_protocol

    protocol = load_protocol()
    status = evaluate_rule(protocol.stopping_rules[0], [])
    data = crossing_alert(protocol, status).model_dump(mode="json")
    mail = render(STOPPING_BOUNDARY_CROSSED, data)
    assert mail.subject == f"[TrialWatch] URGENT stopping rule crossed: {protocol.stopping_rules[0].title}"


def test_a_long_subject_is_one_header_line_that_any_reader_reads_whole() -> None:
    subject_id = "S01-" + "X" * 28  # the longest the contract allows: 32 characters
    mail = render(ALERT_RAISED, raised(subject_id=subject_id, title="Grade III acute GVHD"))
    message = compose(mail, mail_from="trialwatch@localhost", to="pi@example.org", message_id="<a.1@trialwatch>",
                      date=RECORDED, severity="urgent")

    raw = message.as_bytes()

    assert f"Subject: {mail.subject}\n".encode() in raw
    assert email.message_from_bytes(raw)["Subject"] == mail.subject  # compat32, the default reader
