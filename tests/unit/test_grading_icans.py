"""ICANS, ASTCT 2019 (Lee et al., BBMT 2019;25:625-638, table 5; DOMAIN.md a "ICANS"): every row
of the table, its edges and footnotes, and what ingest stores and refuses."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from shared.clinical.grading import GradeConflict, derive_data
from shared.clinical.icans_grade import icans_domains, icans_grade, ice_level
from shared.events import ClinicalEventBody
from shared.protocol import Protocol, load_protocol

WHEN = "2025-12-01T10:00:00+08:00"
_BODY = TypeAdapter(ClinicalEventBody)


@pytest.fixture(scope="module")
def protocol() -> Protocol:
    return load_protocol()


def icans(**fields: Any) -> Any:
    return _BODY.validate_python({"type": "icans", "occurred_at": WHEN, **fields})


def grade(ice: int | None = 10, consciousness: str | None = "alert", **domains: Any) -> int:
    return icans_grade(ice_score=ice, consciousness=consciousness, **domains)


# --------------------------------------------------------------------------- ICE score row


@pytest.mark.parametrize("ice, expected", [
    (10, 0),                  # normal: no ICANS
    (9, 1), (7, 1),           # ASTCT table 5, ICE row, grade 1: 7-9
    (6, 2), (3, 2),           # grade 2: 3-6
    (2, 3), (1, 3), (0, 3),   # grade 3: 0-2 (ICE 0 awake: footnote, grade 3)
])
def test_astct_2019_ice_row_and_its_edges(ice: int, expected: int) -> None:
    assert ice_level(ice) == expected
    assert grade(ice) == expected


def test_astct_2019_ice_outside_0_to_10_is_refused() -> None:
    with pytest.raises(ValueError, match="outside 0-10"):
        ice_level(11)
    with pytest.raises(ValueError, match="outside 0-10"):
        ice_level(-1)


# --------------------------------------------------------------------------- consciousness row


@pytest.mark.parametrize("consciousness, expected", [
    ("alert", 0),                  # not depressed
    ("awakens_spontaneously", 1),  # ASTCT table 5, grade 1
    ("awakens_to_voice", 2),       # grade 2
    ("awakens_to_touch", 3),       # grade 3: awakens only to tactile stimulus
    ("unarousable", 4),            # grade 4: unarousable, stupor or coma
])
def test_astct_2019_depressed_consciousness_row_with_a_normal_ice(consciousness: str, expected: int) -> None:
    ice = 0 if consciousness == "unarousable" else 10  # an unarousable patient cannot perform ICE
    assert grade(ice, consciousness) == expected


def test_astct_2019_footnote_ice_0_awake_is_grade_3_and_ice_0_unarousable_is_grade_4() -> None:
    """ASTCT table 5 footnote: ICE 0 awake with global aphasia is grade 3; unarousable is grade 4."""
    assert grade(0, "alert") == 3
    assert grade(0, "awakens_to_touch") == 3
    assert grade(0, "unarousable") == 4


# --------------------------------------------------------------------------- seizure, motor, ICP rows


@pytest.mark.parametrize("seizure, expected", [
    ("none", 0),
    ("resolved", 3),                 # ASTCT grade 3: clinical seizure resolving rapidly / EEG with intervention
    ("prolonged_or_repetitive", 4),  # grade 4: > 5 min, or repetitive without return to baseline
])
def test_astct_2019_seizure_row(seizure: str, expected: int) -> None:
    assert grade(seizure=seizure) == expected


@pytest.mark.parametrize("weakness, expected", [(False, 0), (True, 4)])
def test_astct_2019_motor_row_deep_focal_weakness_is_grade_4(weakness: bool, expected: int) -> None:
    assert grade(motor_weakness=weakness) == expected


@pytest.mark.parametrize("raised_icp, expected", [
    ("none", 0),
    ("focal_edema", 3),             # ASTCT grade 3: focal/local oedema on neuroimaging
    ("diffuse_edema_or_signs", 4),  # grade 4: diffuse oedema, posturing, CN VI palsy, papilloedema, Cushing's
])
def test_astct_2019_raised_icp_row(raised_icp: str, expected: int) -> None:
    assert grade(raised_icp=raised_icp) == expected


# --------------------------------------------------------------------------- the most severe domain


def test_astct_2019_worked_example_ice_3_with_a_generalized_seizure_is_grade_3() -> None:
    """ASTCT: "a patient with an ICE score of 3 who has a generalized seizure is classified as grade 3"."""
    assert grade(3, "alert", seizure="resolved") == 3


@pytest.mark.parametrize("ice, consciousness, domains, expected", [
    (8, "awakens_to_voice", {}, 2),                                 # consciousness beats ICE
    (5, "awakens_spontaneously", {}, 2),                            # ICE beats consciousness
    (9, "alert", {"raised_icp": "focal_edema"}, 3),
    (2, "awakens_to_touch", {"motor_weakness": True}, 4),
    (10, "alert", {"seizure": "none", "motor_weakness": False, "raised_icp": "none"}, 0),
])
def test_astct_2019_grade_is_the_most_severe_domain(ice: int, consciousness: str, domains: dict[str, Any],
                                                    expected: int) -> None:
    assert grade(ice, consciousness, **domains) == expected


def test_astct_2019_domains_not_given_count_as_absent() -> None:
    assert icans_domains(ice_score=None, consciousness=None) == {
        "ice": 0, "consciousness": 0, "seizure": 0, "motor": 0, "raised_icp": 0}


def test_astct_2019_an_unarousable_patient_without_an_ice_score_scores_ice_0(protocol: Protocol) -> None:
    """ASTCT ICE row, grade 4: "0 (patient is unarousable and unable to perform ICE)"."""
    assert icans_domains(ice_score=None, consciousness="unarousable")["ice"] == 3
    data = derive_data(icans(consciousness="unarousable"), protocol)
    assert data == {"consciousness": "unarousable", "grade": 4, "scale": "ASTCT-2019"}


def test_astct_2019_unknown_domain_values_are_refused() -> None:
    with pytest.raises(ValueError, match="consciousness"):
        grade(10, "sleepy")
    with pytest.raises(ValueError, match="seizure"):
        grade(seizure="twitching")


# --------------------------------------------------------------------------- stored data (CONTRACT.md 2)


def test_astct_2019_findings_are_stored_with_the_derived_grade_and_scale(protocol: Protocol) -> None:
    data = derive_data(icans(ice_score=2, consciousness="awakens_to_voice", seizure="none"), protocol)
    assert data == {"ice_score": 2, "consciousness": "awakens_to_voice", "seizure": "none",
                    "grade": 3, "scale": "ASTCT-2019"}


def test_astct_2019_ice_10_alert_and_nothing_else_is_stored_as_grade_0(protocol: Protocol) -> None:
    data = derive_data(icans(ice_score=10, consciousness="alert"), protocol)
    assert (data["grade"], data["scale"]) == (0, "ASTCT-2019")


def test_a_posted_icans_grade_alone_is_kept_as_before(protocol: Protocol) -> None:
    assert derive_data(icans(grade=3), protocol) == {"grade": 3, "scale": "ASTCT-2019"}


def test_a_posted_icans_grade_agreeing_with_the_findings_is_kept(protocol: Protocol) -> None:
    data = derive_data(icans(grade=4, ice_score=0, consciousness="unarousable"), protocol)
    assert data["grade"] == 4


def test_a_posted_icans_grade_the_complete_findings_contradict_is_refused(protocol: Protocol) -> None:
    with pytest.raises(GradeConflict, match=r"ICANS grade 2 .* derive grade 3") as caught:
        derive_data(icans(grade=2, ice_score=2, consciousness="alert"), protocol)
    assert (caught.value.field, caught.value.given, caught.value.derived) == ("grade", 2, 3)


def test_partial_findings_beside_a_posted_grade_are_a_floor(protocol: Protocol) -> None:
    """Choice: without both ICE and consciousness the findings only bound the grade from below."""
    assert derive_data(icans(grade=4, seizure="resolved"), protocol)["grade"] == 4
    with pytest.raises(GradeConflict, match="at least grade 3"):
        derive_data(icans(grade=2, seizure="resolved"), protocol)


def test_an_unarousable_patient_with_an_ice_score_above_0_is_refused() -> None:
    """ASTCT ICE row, grade 4: "0 (patient is unarousable and unable to perform ICE)"."""
    with pytest.raises(ValidationError, match="unarousable"):
        icans(ice_score=4, consciousness="unarousable")


@pytest.mark.parametrize("fields", [{}, {"grade": 0}, {"grade": 5}, {"ice_score": 11, "consciousness": "alert"},
                                    {"ice_score": 5, "consciousness": "drowsy"}, {"grade": 1, "ice_score": True},
                                    {"ice_score": 5, "consciousness": "alert", "motor_weakness": "yes"}])
def test_icans_bodies_outside_the_contract_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        icans(**fields)


# --------------------------------------------------------------------------- properties

findings = st.fixed_dictionaries({
    "ice_score": st.integers(0, 10),
    "consciousness": st.sampled_from(["alert", "awakens_spontaneously", "awakens_to_voice", "awakens_to_touch"]),
    "seizure": st.sampled_from(["none", "resolved", "prolonged_or_repetitive"]),
    "motor_weakness": st.booleans(),
    "raised_icp": st.sampled_from(["none", "focal_edema", "diffuse_edema_or_signs"]),
})


@given(findings, st.sampled_from(["ice_score", "consciousness", "seizure", "motor_weakness", "raised_icp"]))
def test_astct_2019_a_worse_finding_never_lowers_the_grade(found: dict[str, Any], domain: str) -> None:
    """The most severe domain wins (ASTCT table 5), so worsening one domain can only raise the grade."""
    worse = {"ice_score": max(0, found["ice_score"] - 1), "consciousness": "awakens_to_touch",
             "seizure": "prolonged_or_repetitive", "motor_weakness": True,
             "raised_icp": "diffuse_edema_or_signs"}[domain]
    assert icans_grade(**found | {domain: worse}) >= icans_grade(**found)


@given(findings)
def test_astct_2019_grade_is_0_exactly_when_every_domain_is_normal(found: dict[str, Any]) -> None:
    normal = (found["ice_score"] == 10 and found["consciousness"] == "alert" and found["seizure"] == "none"
              and not found["motor_weakness"] and found["raised_icp"] == "none")
    assert (icans_grade(**found) == 0) == normal
    assert 0 <= icans_grade(**found) <= 4
