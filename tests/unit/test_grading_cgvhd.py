"""Chronic GVHD, NIH 2014 global severity (Jagasia et al., BBMT 2015;21:389-401; DOMAIN.md c): every
row of the severity table, its edges and the lung rules, and what ingest stores and refuses."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from shared.clinical.cgvhd_severity import ORGANS, cgvhd_severity
from shared.clinical.grading import GradeConflict, derive_data
from shared.events import ClinicalEventBody
from shared.protocol import Protocol, load_protocol

WHEN = "2025-12-01T10:00:00+08:00"
_BODY = TypeAdapter(ClinicalEventBody)


@pytest.fixture(scope="module")
def protocol() -> Protocol:
    return load_protocol()


def chronic(**fields: Any) -> Any:
    return _BODY.validate_python({"type": "gvhd", "form": "chronic", "occurred_at": WHEN, **fields})


# --------------------------------------------------------------------------- mild


@pytest.mark.parametrize("scores", [
    {"skin": 1},                       # 1 organ, score 1, lung 0
    {"mouth": 1, "eyes": 1},           # 2 organs, each at most 1
    {"joints_fascia": 1, "lungs": 0},  # lung explicitly 0
    {"genital": 1, "gi": 0, "liver": 0},
])
def test_nih_2014_mild_is_1_or_2_organs_each_at_most_1_and_lung_0(scores: dict[str, int]) -> None:
    assert cgvhd_severity(scores) == "mild"


# --------------------------------------------------------------------------- moderate


@pytest.mark.parametrize("scores", [
    {"skin": 1, "mouth": 1, "eyes": 1},          # NIH 2014: >= 3 organs with no more than score 1 (edge: 3)
    {organ: 1 for organ in ORGANS if organ != "lungs"},  # 7 organs at 1, lung 0
    {"liver": 2},                                # at least 1 organ (not lung) with score 2
    {"skin": 2, "mouth": 2, "eyes": 1},
    {"lungs": 1},                                # lung score 1 alone
    {"lungs": 1, "skin": 1},                     # lung 1 + one organ at 1 is not mild
])
def test_nih_2014_moderate(scores: dict[str, int]) -> None:
    assert cgvhd_severity(scores) == "moderate"


# --------------------------------------------------------------------------- severe


@pytest.mark.parametrize("scores", [
    {"eyes": 3},                    # at least 1 organ with score 3
    {"joints_fascia": 3, "skin": 1},
    {"lungs": 2},                   # lung score 2 (never "an organ at 2": lung 2 is severe)
    {"lungs": 3},                   # lung score 3
    {"lungs": 2, "skin": 1},
    {organ: 2 for organ in ORGANS if organ != "lungs"} | {"lungs": 0, "gi": 3},
])
def test_nih_2014_severe(scores: dict[str, int]) -> None:
    assert cgvhd_severity(scores) == "severe"


def test_nih_2014_no_organ_above_0_is_no_chronic_gvhd() -> None:
    assert cgvhd_severity({}) is None
    assert cgvhd_severity(dict.fromkeys(ORGANS, 0)) is None


def test_nih_2014_scores_outside_0_to_3_and_unknown_organs_are_refused() -> None:
    with pytest.raises(ValueError, match="outside 0-3"):
        cgvhd_severity({"skin": 4})
    with pytest.raises(ValueError, match="unknown organ"):
        cgvhd_severity({"kidney": 1})


# --------------------------------------------------------------------------- stored data (CONTRACT.md 2)


def test_nih_2014_organ_scores_are_stored_as_given_with_the_severity_and_scale(protocol: Protocol) -> None:
    data = derive_data(chronic(organ_scores={"lungs": 1, "skin": 1, "eyes": 0}), protocol)
    assert data == {"form": "chronic", "organ_scores": {"skin": 1, "eyes": 0, "lungs": 1},
                    "severity": "moderate", "scale": "NIH-2014"}


def test_a_posted_severity_alone_is_kept_as_before(protocol: Protocol) -> None:
    assert derive_data(chronic(severity="mild"), protocol) == {"form": "chronic", "severity": "mild",
                                                              "scale": "NIH-2014"}


def test_a_posted_severity_agreeing_with_the_organ_scores_is_kept(protocol: Protocol) -> None:
    assert derive_data(chronic(severity="severe", organ_scores={"lungs": 2}), protocol)["severity"] == "severe"


def test_a_posted_severity_the_organ_scores_contradict_is_refused(protocol: Protocol) -> None:
    with pytest.raises(GradeConflict, match="chronic GVHD severity mild .* derive severity severe") as caught:
        derive_data(chronic(severity="mild", organ_scores={"skin": 1, "lungs": 2}), protocol)
    assert (caught.value.field, caught.value.given, caught.value.derived) == ("severity", "mild", "severe")


@pytest.mark.parametrize("fields, named", [
    ({}, "severity"),
    ({"organ_scores": {"skin": 0, "lungs": 0}}, "at least one organ"),
    ({"organ_scores": {"skin": 4}}, "skin"),
    ({"organ_scores": {"kidney": 1}}, "kidney"),
    ({"organ_scores": {"skin": True}}, "skin"),
    ({"organ_scores": {"skin": 1}, "grade": 2}, "grade is for acute GVHD"),
    ({"severity": "mild", "skin_bsa_pct": 20}, "skin_bsa_pct is for acute GVHD"),
])
def test_chronic_bodies_outside_the_contract_are_refused(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        chronic(**fields)


def test_organ_scores_are_refused_on_acute_gvhd() -> None:
    with pytest.raises(ValidationError, match="organ_scores is for chronic GVHD"):
        _BODY.validate_python({"type": "gvhd", "form": "acute", "occurred_at": WHEN, "grade": 2,
                               "organ_scores": {"skin": 1}})


# --------------------------------------------------------------------------- properties

scores = st.dictionaries(st.sampled_from(ORGANS), st.integers(0, 3), min_size=1).filter(lambda s: any(s.values()))
RANK = {"mild": 1, "moderate": 2, "severe": 3}


@given(scores, st.sampled_from(ORGANS))
def test_nih_2014_a_higher_organ_score_never_lowers_the_severity(found: dict[str, int], organ: str) -> None:
    worse = found | {organ: min(3, found.get(organ, 0) + 1)}
    assert RANK[cgvhd_severity(worse) or ""] >= RANK[cgvhd_severity(found) or ""]


@given(scores)
def test_nih_2014_severity_follows_the_published_definitions(found: dict[str, int]) -> None:
    """DOMAIN.md c, read independently of the implementation's top-down order."""
    lungs, involved = found.get("lungs", 0), sum(1 for v in found.values() if v)
    others = [v for k, v in found.items() if k != "lungs"]
    severe = max(others, default=0) == 3 or lungs >= 2
    moderate = not severe and (involved >= 3 or 2 in others or lungs == 1)
    mild = involved in (1, 2) and max(found.values()) <= 1 and lungs == 0
    assert [severe, moderate, mild].count(True) == 1  # the definitions partition every case
    expected = "severe" if severe else "moderate" if moderate else "mild"
    assert cgvhd_severity(found) == expected
