import uuid
from typing import Any

import pytest
from pydantic import TypeAdapter

from shared.clinical.grading import (
    GradeConflict,
    agvhd_grade,
    agvhd_stages,
    convert_lab_unit,
    crs_grade,
    derive_data,
    lab_grade,
)
from shared.events import ClinicalEventBody
from shared.protocol import Protocol, load_protocol

WHEN = "2025-12-01T10:00:00+08:00"
_BODY = TypeAdapter(ClinicalEventBody)


@pytest.fixture(scope="module")
def protocol() -> Protocol:
    return load_protocol()


def body(**fields: Any) -> Any:
    """A body parsed the way the API parses it."""
    return _BODY.validate_python({"occurred_at": WHEN, **fields})


# --------------------------------------------------------------------------- CRS (ASTCT 2019)


def crs(temp: float | None = 39.0, hypotension: bool | None = None, pressors: int | None = None,
        oxygen: str | None = None, vasopressin: bool | None = None,
        anticytokine: bool | None = None) -> int:
    return crs_grade(max_temp_c=temp, hypotension=hypotension, vasopressors=pressors,
                     oxygen=oxygen, vasopressin=vasopressin, anticytokine_given=anticytokine)


@pytest.mark.parametrize(
    "temp, anticytokine, hypotension, expected",
    [
        (37.9, None, None, 0),    # not febrile: no CRS
        (38.0, None, None, 1),    # fever is >= 38.0
        (None, None, None, 0),    # no temperature recorded: no fever
        (37.9, None, True, 0),    # hypotension without fever is not CRS
        (37.9, False, True, 0),
        (37.0, True, None, 1),    # after tocilizumab/steroids fever is no longer required
        (37.0, True, True, 2),
        (None, True, True, 2),
    ],
)
def test_crs_needs_fever_unless_anticytokine_given(temp, anticytokine, hypotension, expected):
    assert crs(temp, hypotension=hypotension, anticytokine=anticytokine) == expected


@pytest.mark.parametrize(
    "hypotension, pressors, vasopressin, expected",
    [
        (None, None, None, 1),
        (False, 0, False, 1),
        (True, None, None, 2),    # hypotension not requiring vasopressors
        (True, 0, None, 2),
        (True, 1, None, 3),       # a vasopressor
        (False, 1, None, 3),      # a pressor implies hypotension
        (None, 1, None, 3),
        (True, 2, None, 4),       # multiple vasopressors
        (None, 3, None, 4),
        (True, 1, True, 3),       # vasopressin never raises the count
        (True, 2, True, 4),
        (True, 0, True, 3),       # vasopressin alone counts as one pressor
        (None, None, True, 3),
        (True, 0, False, 2),
    ],
)
def test_crs_hypotension_levels(hypotension, pressors, vasopressin, expected):
    assert crs(hypotension=hypotension, pressors=pressors, vasopressin=vasopressin) == expected


@pytest.mark.parametrize(
    "oxygen, expected",
    [
        (None, 1),
        ("none", 1),
        ("low_flow_nasal_cannula", 2),
        ("high_flow_nasal_cannula", 3),
        ("facemask", 3),
        ("nonrebreather", 3),
        ("venturi", 3),
        ("cpap", 4),
        ("bipap", 4),
        ("mechanical_ventilation", 4),
    ],
)
def test_crs_hypoxia_levels(oxygen, expected):
    assert crs(oxygen=oxygen) == expected


def test_crs_astct_worked_example():
    # ASTCT: 39.5 °C + one vasopressor + low-flow nasal cannula = grade 3.
    assert crs(39.5, hypotension=True, pressors=1, oxygen="low_flow_nasal_cannula") == 3


@pytest.mark.parametrize(
    "hypotension, pressors, oxygen, expected",
    [
        (True, 0, "cpap", 4),                      # hypoxia more severe
        (True, 2, "low_flow_nasal_cannula", 4),    # hypotension more severe
        (True, 0, "facemask", 3),
        (True, 1, "high_flow_nasal_cannula", 3),
    ],
)
def test_crs_more_severe_event_wins(hypotension, pressors, oxygen, expected):
    assert crs(hypotension=hypotension, pressors=pressors, oxygen=oxygen) == expected


def test_crs_unknown_oxygen_device_is_refused():
    with pytest.raises(ValueError, match="oxygen"):
        crs(oxygen="helmet")


# --------------------------------------------------------------------------- aGVHD (MAGIC 2016)


def stages(**findings: Any) -> dict[str, int]:
    given = dict.fromkeys(("skin_bsa_pct", "bullae", "bilirubin_mg_dl", "upper_gi", "stool_ml_day",
                           "severe_abdominal_pain"))
    return agvhd_stages(**(given | findings))


def test_missing_findings_are_stage_0():
    assert stages() == {"skin": 0, "liver": 0, "upper_gi": 0, "lower_gi": 0}


@pytest.mark.parametrize(
    "bsa, bullae, expected",
    [
        (None, None, 0),
        (0, None, 0),
        (0.1, None, 1),
        (24.9, None, 1),
        (25, None, 2),
        (50, None, 2),
        (50.1, None, 3),
        (100, False, 3),
        (50.1, True, 4),     # generalized erythroderma with bullous formation
        (100, True, 4),
        (50, True, 2),       # bullae with <= 50% BSA: staged by BSA only
        (10, True, 1),
        (None, True, 0),
    ],
)
def test_skin_stage(bsa, bullae, expected):
    assert stages(skin_bsa_pct=bsa, bullae=bullae)["skin"] == expected


@pytest.mark.parametrize(
    "bilirubin, expected",
    [(None, 0), (0, 0), (1.9, 0), (2.0, 1), (3.0, 1), (3.1, 2), (6.0, 2), (6.1, 3), (15.0, 3),
     (15.1, 4), (40, 4)],
)
def test_liver_stage(bilirubin, expected):
    assert stages(bilirubin_mg_dl=bilirubin)["liver"] == expected


@pytest.mark.parametrize("upper_gi, expected", [(None, 0), (False, 0), (True, 1)])
def test_upper_gi_stage(upper_gi, expected):
    assert stages(upper_gi=upper_gi)["upper_gi"] == expected


@pytest.mark.parametrize(
    "stool, pain, expected",
    [
        (None, None, 0),
        (0, None, 0),
        (499, None, 0),
        (500, None, 1),
        (999, None, 1),
        (999.5, None, 1),    # 999.x is still below 1000
        (1000, None, 2),
        (1500, None, 2),
        (1501, None, 3),
        (3000, False, 3),
        (100, True, 4),      # severe abdominal pain, regardless of volume
        (None, True, 4),
    ],
)
def test_lower_gi_stage(stool, pain, expected):
    assert stages(stool_ml_day=stool, severe_abdominal_pain=pain)["lower_gi"] == expected


def organs(skin: int = 0, liver: int = 0, upper_gi: int = 0, lower_gi: int = 0) -> dict[str, int]:
    return {"skin": skin, "liver": liver, "upper_gi": upper_gi, "lower_gi": lower_gi}


@pytest.mark.parametrize(
    "organ_stages, expected",
    [
        (organs(), 0),
        (organs(skin=1), 1),
        (organs(skin=2), 1),
        (organs(skin=3), 2),                            # stage-3 skin alone = II
        (organs(skin=4), 4),
        (organs(liver=1), 2),
        (organs(liver=2), 3),
        (organs(liver=3), 3),
        (organs(liver=4), 4),
        (organs(upper_gi=1), 2),
        (organs(skin=2, upper_gi=1), 2),
        (organs(skin=3, upper_gi=1), 2),                # upper GI cannot make III
        (organs(skin=3, liver=1, upper_gi=1, lower_gi=1), 2),
        (organs(lower_gi=1), 2),
        (organs(lower_gi=2), 3),                        # stage-2 lower GI alone = III
        (organs(lower_gi=3), 3),
        (organs(lower_gi=4), 4),
        (organs(skin=3, liver=3), 3),
        (organs(skin=3, upper_gi=1, lower_gi=3), 3),
        (organs(skin=4, upper_gi=1), 4),
        (organs(liver=4, lower_gi=2), 4),
        ({}, 0),                                        # missing organs are stage 0
        ({"skin": 2}, 1),
    ],
)
def test_agvhd_overall_grade(organ_stages, expected):
    assert agvhd_grade(organ_stages) == expected


# --------------------------------------------------------------------------- CTCAE v5.0 labs


@pytest.mark.parametrize(
    "test, value, lln, expected",
    [
        # neutrophils: LLN / 1.5 / 1.0 / 0.5 x10^9/L
        ("neutrophils", 2.5, 1.8, 0),
        ("neutrophils", 1.8, 1.8, 0),      # value == LLN is not an AE
        ("neutrophils", 1.79, 1.8, 1),
        ("neutrophils", 1.5, 1.8, 1),      # on a cut-off: the less severe grade
        ("neutrophils", 1.49, 1.8, 2),
        ("neutrophils", 1.0, 1.8, 2),
        ("neutrophils", 0.99, 1.8, 3),
        ("neutrophils", 0.5, 1.8, 3),
        ("neutrophils", 0.49, 1.8, 4),
        ("neutrophils", 0.0, 1.8, 4),
        # platelets: LLN / 75 / 50 / 25
        ("platelets", 150, 150, 0),
        ("platelets", 149.9, 150, 1),
        ("platelets", 75, 150, 1),
        ("platelets", 74.9, 150, 2),
        ("platelets", 50, 150, 2),
        ("platelets", 49.9, 150, 3),
        ("platelets", 25, 150, 3),
        ("platelets", 24.9, 150, 4),
        # wbc: LLN / 3.0 / 2.0 / 1.0
        ("wbc", 4.0, 4.0, 0),
        ("wbc", 3.99, 4.0, 1),
        ("wbc", 3.0, 4.0, 1),
        ("wbc", 2.99, 4.0, 2),
        ("wbc", 2.0, 4.0, 2),
        ("wbc", 1.99, 4.0, 3),
        ("wbc", 1.0, 4.0, 3),
        ("wbc", 0.99, 4.0, 4),
        # lymphocytes: LLN / 0.8 / 0.5 / 0.2
        ("lymphocytes", 1.0, 1.0, 0),
        ("lymphocytes", 0.99, 1.0, 1),
        ("lymphocytes", 0.8, 1.0, 1),
        ("lymphocytes", 0.79, 1.0, 2),
        ("lymphocytes", 0.5, 1.0, 2),
        ("lymphocytes", 0.49, 1.0, 3),
        ("lymphocytes", 0.2, 1.0, 3),
        ("lymphocytes", 0.19, 1.0, 4),
        # hemoglobin: LLN / 10.0 / 8.0 g/dL, capped at grade 3
        ("hemoglobin", 12.0, 12.0, 0),
        ("hemoglobin", 11.9, 12.0, 1),
        ("hemoglobin", 10.0, 12.0, 1),
        ("hemoglobin", 9.9, 12.0, 2),
        ("hemoglobin", 8.0, 12.0, 2),
        ("hemoglobin", 7.9, 12.0, 3),
        ("hemoglobin", 3.0, 12.0, 3),
        ("hemoglobin", 0.0, 12.0, 3),
    ],
)
def test_lab_cut_offs(test, value, lln, expected):
    unit = "g/dL" if test == "hemoglobin" else "10^9/L"
    assert lab_grade(test=test, value=value, unit=unit, lln=lln) == expected


@pytest.mark.parametrize(
    "test, value, unit, lln, lln_unit, expected",
    [
        ("neutrophils", 1000, "cells/mm3", 1800, None, 2),
        ("neutrophils", 999, "cells/mm3", 1800, None, 3),
        ("neutrophils", 1800, "cells/mm3", 1.8, "10^9/L", 0),
        ("neutrophils", 1790, "cells/mm3", 1.8, "10^9/L", 1),
        ("neutrophils", 1.79, "10^9/L", 1800, "cells/mm3", 1),
        ("platelets", 50000, "cells/mm3", 150000, None, 2),
        ("platelets", 24999, "cells/mm3", 150000, None, 4),
        ("wbc", 1000, "cells/mm3", 4000, None, 3),
        ("lymphocytes", 200, "cells/mm3", 1000, None, 3),
        ("lymphocytes", 800, "cells/mm3", 1000, None, 1),
        ("hemoglobin", 80, "g/L", 120, None, 2),
        ("hemoglobin", 79, "g/L", 120, None, 3),
        ("hemoglobin", 100, "g/L", 12.0, "g/dL", 1),
        ("hemoglobin", 120, "g/L", 12.0, "g/dL", 0),
    ],
)
def test_lab_unit_conversions(test, value, unit, lln, lln_unit, expected):
    assert lab_grade(test=test, value=value, unit=unit, lln=lln, lln_unit=lln_unit) == expected


@pytest.mark.parametrize(
    "value, lln, expected",
    [
        (1.6, None, 0),     # no LLN: grade 1 cannot be given
        (1.49, None, 2),    # grades 2-4 do not need the LLN
        (1.3, 1.2, 2),      # an LLN below the grade-2 cut-off does not lower grade 2
        (1.6, 1.2, 0),
        (1.1, 1.2, 2),
    ],
)
def test_lab_without_a_usable_lln(value, lln, expected):
    assert lab_grade(test="neutrophils", value=value, unit="10^9/L", lln=lln) == expected


@pytest.mark.parametrize(
    "test, unit",
    [("ferritin", "10^9/L"), ("neutrophils", "g/L"), ("hemoglobin", "cells/mm3"),
     ("hemoglobin", "mmol/L")],
)
def test_lab_refuses_unknown_tests_and_units(test, unit):
    with pytest.raises(ValueError):
        lab_grade(test=test, value=1.0, unit=unit, lln=None)


def test_unit_conversion_has_no_float_noise():
    assert convert_lab_unit(1.1, "10^9/L", "cells/mm3") == 1100.0
    assert convert_lab_unit(1100, "cells/mm3", "10^9/L") == 1.1
    assert convert_lab_unit(12.0, "g/dL", "g/L") == 120.0


# --------------------------------------------------------------------------- derive_data


def test_crs_observations_get_their_grade(protocol):
    data = derive_data(body(type="crs", max_temp_c=39.5, hypotension=True, vasopressors=1,
                            oxygen="low_flow_nasal_cannula"), protocol)
    assert data == {"max_temp_c": 39.5, "hypotension": True, "vasopressors": 1,
                    "oxygen": "low_flow_nasal_cannula", "grade": 3, "scale": "ASTCT-2019"}


def test_crs_observations_without_fever_are_grade_0(protocol):
    data = derive_data(body(type="crs", max_temp_c=37.5, hypotension=True, oxygen="none"), protocol)
    assert data["grade"] == 0


def test_crs_grade_alone_is_kept(protocol):
    assert derive_data(body(type="crs", grade=2), protocol) == {"grade": 2, "scale": "ASTCT-2019"}


def test_crs_grade_agreeing_with_observations_is_accepted(protocol):
    data = derive_data(body(type="crs", grade=4, max_temp_c=38.4, vasopressors=2), protocol)
    assert data["grade"] == 4


def test_crs_grade_conflicting_with_observations_is_refused(protocol):
    posted = body(type="crs", grade=2, max_temp_c=39.0, vasopressors=1, oxygen="none")
    with pytest.raises(GradeConflict, match=r"grade 2 .* grade 3") as raised:
        derive_data(posted, protocol)
    assert isinstance(raised.value, ValueError)
    assert (raised.value.given, raised.value.derived) == (2, 3)


def test_acute_gvhd_findings_get_stages_and_grade(protocol):
    data = derive_data(body(type="gvhd", form="acute", skin_bsa_pct=60, stool_ml_day=1200), protocol)
    assert data == {"form": "acute", "skin_bsa_pct": 60.0, "stool_ml_day": 1200.0,
                    "stages": {"skin": 3, "liver": 0, "upper_gi": 0, "lower_gi": 2},
                    "grade": 3, "scale": "MAGIC-2016"}


def test_acute_gvhd_findings_without_disease_are_grade_0(protocol):
    data = derive_data(body(type="gvhd", form="acute", skin_bsa_pct=0, bilirubin_mg_dl=1.0), protocol)
    assert data["grade"] == 0


def test_acute_gvhd_grade_alone_is_kept(protocol):
    data = derive_data(body(type="gvhd", form="acute", grade=2), protocol)
    assert data == {"form": "acute", "grade": 2, "scale": "MAGIC-2016"}


def test_acute_gvhd_grade_conflicting_with_findings_is_refused(protocol):
    # Stage-3 skin alone is grade II, not III.
    with pytest.raises(GradeConflict, match=r"grade 3 .* grade 2"):
        derive_data(body(type="gvhd", form="acute", grade=3, skin_bsa_pct=60), protocol)


def test_chronic_gvhd_carries_the_nih_scale(protocol):
    data = derive_data(body(type="gvhd", form="chronic", severity="moderate"), protocol)
    assert data == {"form": "chronic", "severity": "moderate", "scale": "NIH-2014"}


@pytest.mark.parametrize(
    "test, value, unit, stored_lln, expected",
    [
        ("neutrophils", 0.9, "10^9/L", 1.8, 3),
        ("neutrophils", 1700, "cells/mm3", 1800.0, 1),   # protocol LLN converted to the event's unit
        ("hemoglobin", 95, "g/L", 120.0, 2),
        ("platelets", 150, "10^9/L", 150.0, 0),
    ],
)
def test_lab_gets_protocol_lln_and_grade(protocol, test, value, unit, stored_lln, expected):
    data = derive_data(body(type="lab", test=test, value=value, unit=unit), protocol)
    assert data == {"test": test, "value": value, "unit": unit, "lln": stored_lln,
                    "grade": expected, "scale": "CTCAE-5.0"}


def test_lab_keeps_its_own_lln(protocol):
    data = derive_data(body(type="lab", test="neutrophils", value=1.6, unit="10^9/L", lln=1.5), protocol)
    assert (data["lln"], data["grade"]) == (1.5, 0)


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"type": "infection", "grade": 3, "site": "lung"},
         {"grade": 3, "site": "lung", "scale": "CTCAE-5.0"}),
        ({"type": "icans", "grade": 2}, {"grade": 2, "scale": "ASTCT-2019"}),
        ({"type": "blinatumomab_dose", "course": 1, "day": 5, "dose_ug": 11.66},
         {"course": 1, "day": 5, "dose_ug": 11.66}),
        ({"type": "death", "cause": "relapse"}, {"cause": "relapse"}),
        ({"type": "relapse"}, {}),
    ],
)
def test_other_types_are_dumped_plainly(protocol, fields, expected):
    assert derive_data(body(**fields), protocol) == expected


def test_retraction_is_dumped_plainly(protocol):
    event_id = uuid.uuid4()
    data = derive_data(body(type="retraction", retracts_event_id=str(event_id), reason="wrong patient"),
                       protocol)
    assert data == {"retracts_event_id": str(event_id), "reason": "wrong patient"}


def test_correction_carries_the_derived_replacement(protocol):
    event_id = uuid.uuid4()
    posted = body(type="correction", corrects_event_id=str(event_id), reason="typo in temperature",
                  replacement={"type": "crs", "occurred_at": "2025-11-30T22:00:00+08:00",
                               "max_temp_c": 38.2, "hypotension": True, "oxygen": "facemask"})

    data = derive_data(posted, protocol)

    assert data == {
        "corrects_event_id": str(event_id),
        "reason": "typo in temperature",
        "replacement": {"type": "crs", "occurred_at": "2025-11-30T22:00:00+08:00",
                        "max_temp_c": 38.2, "hypotension": True, "oxygen": "facemask",
                        "grade": 3, "scale": "ASTCT-2019"},
    }
    # A consumer can rebuild the replacement body from it (less the derived fields).
    observed = {k: v for k, v in data["replacement"].items() if k not in ("grade", "scale")}
    assert body(**observed) == posted.replacement


def test_correction_with_a_conflicting_replacement_is_refused(protocol):
    posted = body(type="correction", corrects_event_id=str(uuid.uuid4()), reason="regraded",
                  replacement={"type": "gvhd", "occurred_at": WHEN, "form": "acute", "grade": 1,
                               "stool_ml_day": 1600})
    with pytest.raises(GradeConflict):
        derive_data(posted, protocol)
