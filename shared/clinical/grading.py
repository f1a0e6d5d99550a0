"""Clinical grading: ASTCT 2019 CRS, MAGIC 2016 acute GVHD, CTCAE v5.0 haematology; ASTCT 2019
ICANS (``icans_grade.py``) and NIH 2014 chronic GVHD (``cgvhd_severity.py``) beside it.

Pure functions, no I/O. Section letters (a, b, c, d) refer to DOMAIN.md, the source of truth for
every threshold here. ``derive_data`` turns a posted body into the ``data`` stored on its event
(CONTRACT.md section 2): the observations as given plus the derived ``grade`` and its ``scale``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from shared.clinical.cgvhd_severity import cgvhd_severity
from shared.clinical.icans_grade import icans_grade
from shared.events import Correction, Crs, Gvhd, Icans, Infection, Lab

if TYPE_CHECKING:
    from shared.protocol import Protocol


class GradeConflict(ValueError):
    """A grade (or chronic GVHD severity) was posted together with observations that derive a
    different one; ``at_least`` when incomplete findings already derive more than was posted."""

    def __init__(self, kind: str, given: int | str, derived: int | str, *, field: str = "grade",
                 at_least: bool = False) -> None:
        self.kind, self.given, self.derived, self.field = kind, given, derived, field
        self.at_least = at_least
        self.derived_text = f"{'at least ' if at_least else ''}{field} {derived}"
        super().__init__(
            f"{kind} {field} {given} was given but the observations derive {self.derived_text}; "
            f"correct the {field} or the observations, or send only one of them"
        )


# --------------------------------------------------------------------------- CRS (section a)

FEVER_C = 38.0
_HYPOXIA_LEVEL = {
    "none": 0,
    "low_flow_nasal_cannula": 2,
    "high_flow_nasal_cannula": 3, "facemask": 3, "nonrebreather": 3, "venturi": 3,
    "cpap": 4, "bipap": 4, "mechanical_ventilation": 4,
}


def _hypotension_level(hypotension: bool | None, vasopressors: int | None,
                       vasopressin: bool | None) -> int:
    pressors = vasopressors or 0
    if pressors >= 2:
        return 4
    if pressors == 1 or vasopressin:
        return 3
    return 2 if hypotension else 0


def crs_grade(*, max_temp_c: float | None, hypotension: bool | None, vasopressors: int | None,
              oxygen: str | None, vasopressin: bool | None = None,
              anticytokine_given: bool | None = None) -> int:
    """ASTCT 2019 CRS grade 0-4 (DOMAIN.md a; Lee et al., BBMT 2019;25:625-638).

    - CRS needs fever (>= 38.0 °C) unless anti-cytokine therapy (tocilizumab, steroids) was given;
      otherwise the grade is 0 (no CRS). A missing temperature is not a fever.
    - grade = max(1, hypotension level, hypoxia level): the more severe event wins.
    - Hypotension level: 0 none, 2 without pressor, 3 one pressor, 4 two or more pressors.
      ``vasopressors`` counts pressors other than vasopressin, and vasopressin never raises that
      count ("multiple vasopressors (excluding vasopressin)").
    - Choice: vasopressin alone (no other pressor) is one pressor, grade 3 — the table's grade 3
      is "requiring a vasopressor with or without vasopressin", and a patient on vasopressin
      needs a pressor. Any pressor implies hypotension even when ``hypotension`` is false/None.
    - Hypoxia level by device: none 0; low-flow cannula (<= 6 L/min) 2; high-flow cannula
      (> 6 L/min), facemask, non-rebreather, Venturi 3; CPAP, BiPAP, mechanical ventilation 4.
    - Missing observations count as absent. Grade 5 (death) is never derived.
    """
    febrile = max_temp_c is not None and max_temp_c >= FEVER_C
    if not (febrile or anticytokine_given):
        return 0
    if oxygen is not None and oxygen not in _HYPOXIA_LEVEL:
        raise ValueError(f"unknown oxygen device {oxygen!r}; use one of {sorted(_HYPOXIA_LEVEL)}")
    hypoxia = _HYPOXIA_LEVEL[oxygen] if oxygen else 0
    return max(1, _hypotension_level(hypotension, vasopressors, vasopressin), hypoxia)


# --------------------------------------------------------------------------- aGVHD (section b)


def _skin_stage(bsa_pct: float | None, bullae: bool | None) -> int:
    bsa = bsa_pct or 0.0
    if bsa > 50:
        return 4 if bullae else 3
    if bsa >= 25:
        return 2
    return 1 if bsa > 0 else 0


def _liver_stage(bilirubin_mg_dl: float | None) -> int:
    bili = bilirubin_mg_dl or 0.0
    cut_offs = ((15.0, 4), (6.0, 3), (3.0, 2))  # stage applies above the cut-off
    for cut_off, stage in cut_offs:
        if bili > cut_off:
            return stage
    return 1 if bili >= 2.0 else 0


def _lower_gi_stage(stool_ml_day: float | None, severe_abdominal_pain: bool | None) -> int:
    if severe_abdominal_pain:
        return 4
    stool = stool_ml_day or 0.0
    if stool > 1500:
        return 3
    if stool >= 1000:
        return 2
    return 1 if stool >= 500 else 0


def agvhd_stages(*, skin_bsa_pct: float | None, bullae: bool | None, bilirubin_mg_dl: float | None,
                 upper_gi: bool | None, stool_ml_day: float | None,
                 severe_abdominal_pain: bool | None) -> dict[str, int]:
    """MAGIC 2016 organ stages, adult values (DOMAIN.md b; Harris et al., BBMT 2016;22:4-10).

    A missing finding is stage 0. Boundaries follow DOMAIN.md b's convention for the gaps in the
    published ranges:

    - skin (active erythema, % BSA): 0 -> 0; (0, 25) -> 1; 25-50 inclusive -> 2; > 50 -> 3;
      > 50 plus ``bullae`` -> 4 (generalized erythroderma with bullous formation; ``bullae``
      stands for "bullous formation and desquamation > 5% BSA", which has no field of its own).
    - Choice: bullae with <= 50% BSA are undefined in the sources (DOMAIN.md h.4); the skin is
      staged by BSA only, never 4 without > 50% BSA (the MAGIC wording "> 50% BSA" is kept).
    - liver (total bilirubin, mg/dL): < 2 -> 0; 2.0-3.0 -> 1; > 3.0-6.0 -> 2; > 6.0-15.0 -> 3;
      > 15 -> 4. No downgrade for other causes of hyperbilirubinaemia (MAGIC footnote).
    - upper GI: persistent nausea, vomiting or anorexia -> 1.
    - lower GI (stool mL/day, 3-day average): < 500 -> 0; 500-999 -> 1 (999.x too, i.e.
      < 1000); 1000-1500 -> 2; > 1500 -> 3; severe abdominal pain -> 4 regardless of volume.
    """
    return {
        "skin": _skin_stage(skin_bsa_pct, bullae),
        "liver": _liver_stage(bilirubin_mg_dl),
        "upper_gi": 1 if upper_gi else 0,
        "lower_gi": _lower_gi_stage(stool_ml_day, severe_abdominal_pain),
    }


def agvhd_grade(stages: Mapping[str, int]) -> int:
    """MAGIC 2016 overall clinical grade 0-4 from organ stages (DOMAIN.md b), evaluated top-down.

    - IV: stage 4 skin, liver or lower GI.
    - III: stage 2-3 liver or stage 2-3 lower GI.
    - II: stage 3 skin, or stage 1 liver, upper GI or lower GI.
    - I: stage 1-2 skin (and nothing else).
    - 0: no organ at stage 1-4.

    The grade is not the maximum stage: stage-3 skin alone is II, stage-2 lower GI alone is III,
    and upper GI (stages 0/1) can never by itself give III or IV. A missing organ is stage 0.
    """
    skin, liver = stages.get("skin", 0), stages.get("liver", 0)
    upper_gi, lower_gi = stages.get("upper_gi", 0), stages.get("lower_gi", 0)
    if 4 in (skin, liver, lower_gi):
        return 4
    if liver in (2, 3) or lower_gi in (2, 3):
        return 3
    if skin == 3 or 1 in (liver, upper_gi, lower_gi):
        return 2
    return 1 if skin in (1, 2) else 0


# --------------------------------------------------------------------------- CTCAE (section d)

# Grade -> cut-off, most severe first, in 10^9/L (hemoglobin g/dL: no grade-4 lab value).
_CUT_OFFS: dict[str, dict[int, float]] = {
    "neutrophils": {4: 0.5, 3: 1.0, 2: 1.5},
    "platelets": {4: 25.0, 3: 50.0, 2: 75.0},
    "wbc": {4: 1.0, 3: 2.0, 2: 3.0},
    "lymphocytes": {4: 0.2, 3: 0.5, 2: 0.8},
    "hemoglobin": {3: 8.0, 2: 10.0},
}
# How many of each unit make one canonical unit (10^9/L for counts, g/dL for hemoglobin).
_PER_CANONICAL = {"10^9/L": 1.0, "cells/mm3": 1000.0, "g/dL": 1.0, "g/L": 10.0}
_CANONICAL = {"10^9/L": "10^9/L", "cells/mm3": "10^9/L", "g/dL": "g/dL", "g/L": "g/dL"}


def convert_lab_unit(value: float, from_unit: str, to_unit: str) -> float:
    """Convert between lab units (DOMAIN.md d): 1000 cells/mm3 = 1.0 x10^9/L; 10 g/L = 1 g/dL."""
    for unit in (from_unit, to_unit):
        if unit not in _PER_CANONICAL:
            raise ValueError(f"unknown lab unit {unit!r}; use one of {list(_PER_CANONICAL)}")
    if _CANONICAL[from_unit] != _CANONICAL[to_unit]:
        raise ValueError(f"cannot convert {from_unit} to {to_unit}")
    # Rounded so that 1.1 x10^9/L reads 1100 cells/mm3, not 1100.0000000000002.
    return round(value / _PER_CANONICAL[from_unit] * _PER_CANONICAL[to_unit], 9)


def _canonical_unit(test: str) -> str:
    return "g/dL" if test == "hemoglobin" else "10^9/L"


def lab_grade(*, test: str, value: float, unit: str, lln: float | None,
              lln_unit: str | None = None) -> int:
    """CTCAE v5.0 grade 0-4 of a low blood count (DOMAIN.md d; NCI CTCAE v5.0, 2017).

    - Value and LLN (in ``lln_unit``, default ``unit``) are converted to 10^9/L or g/dL first.
    - "< A - B" means A > value >= B: a value exactly on a cut-off gets the less severe grade
      (ANC 1.0 = G2, platelets 50 = G2, Hgb 8.0 = G2), as admiral encodes it.
    - Cut-offs G2/G3/G4: neutrophils 1.5/1.0/0.5; platelets 75/50/25; WBC 3.0/2.0/1.0;
      lymphocytes 0.8/0.5/0.2 (x10^9/L); hemoglobin 10.0/8.0 g/dL.
    - Grade 1 needs value < LLN (value == LLN is 0). Without an LLN no grade 1 is possible.
    - Grades 2-4 are absolute: an LLN below the grade-2 cut-off does not lower them (admiral).
    - Hemoglobin is capped at grade 3 (grade 4 is clinical only, no lab value).
    """
    if test not in _CUT_OFFS:
        raise ValueError(f"unknown lab test {test!r}; use one of {list(_CUT_OFFS)}")
    canonical = _canonical_unit(test)
    level = convert_lab_unit(value, unit, canonical)
    for grade, cut_off in _CUT_OFFS[test].items():
        if level < cut_off:
            return grade
    if lln is not None and level < convert_lab_unit(lln, lln_unit or unit, canonical):
        return 1
    return 0


# --------------------------------------------------------------------------- stored data

Data = dict[str, Any]


def _checked(kind: str, given: int | None, derived: int) -> int:
    if given is not None and given != derived:
        raise GradeConflict(kind, given, derived)
    return derived


def _icans_data(body: Icans, data: Data, protocol: Protocol) -> Data:
    """Choice: with a posted grade and only some findings (not both ICE score and consciousness),
    the findings give a floor: they contradict the grade only if they already derive more."""
    if body.has_findings:
        derived = icans_grade(ice_score=body.ice_score, consciousness=body.consciousness,
                              seizure=body.seizure, motor_weakness=body.motor_weakness,
                              raised_icp=body.raised_icp)
        if body.has_all_findings or body.grade is None:
            data["grade"] = _checked("ICANS", body.grade, derived)
        elif derived > body.grade:
            raise GradeConflict("ICANS", body.grade, derived, at_least=True)
    return data | {"scale": "ASTCT-2019"}


def _chronic_gvhd_data(body: Gvhd, data: Data) -> Data:
    if body.organ_scores is not None:
        derived = cgvhd_severity(body.organ_scores.scores())  # None only if every score is 0 (refused)
        if derived is not None:
            if body.severity is not None and body.severity != derived:
                raise GradeConflict("chronic GVHD", body.severity, derived, field="severity")
            data["severity"] = derived
    return data | {"scale": "NIH-2014"}


def _crs_data(body: Crs, data: Data, protocol: Protocol) -> Data:
    if body.has_observations:
        derived = crs_grade(max_temp_c=body.max_temp_c, hypotension=body.hypotension,
                            vasopressors=body.vasopressors, oxygen=body.oxygen,
                            vasopressin=body.vasopressin, anticytokine_given=body.anticytokine_given)
        data["grade"] = _checked("CRS", body.grade, derived)
    return data | {"scale": "ASTCT-2019"}


def _gvhd_data(body: Gvhd, data: Data, protocol: Protocol) -> Data:
    if body.form == "chronic":
        return _chronic_gvhd_data(body, data)
    if body.has_findings:
        stages = agvhd_stages(
            skin_bsa_pct=body.skin_bsa_pct, bullae=body.bullae, bilirubin_mg_dl=body.bilirubin_mg_dl,
            upper_gi=body.upper_gi, stool_ml_day=body.stool_ml_day,
            severe_abdominal_pain=body.severe_abdominal_pain)
        data |= {"stages": stages, "grade": _checked("acute GVHD", body.grade, agvhd_grade(stages))}
    return data | {"scale": "MAGIC-2016"}


def _lab_data(body: Lab, data: Data, protocol: Protocol) -> Data:
    lln = body.lln
    if lln is None and body.test in protocol.labs.lln:
        # A protocol LLN without its unit is read in the canonical unit (10^9/L, g/dL).
        default_unit = protocol.labs.lln_unit.get(body.test, _canonical_unit(body.test))
        lln = convert_lab_unit(protocol.labs.lln[body.test], default_unit, body.unit)
        data["lln"] = lln
    grade = lab_grade(test=body.test, value=body.value, unit=body.unit, lln=lln)
    return data | {"grade": grade, "scale": "CTCAE-5.0"}


def _scale_only(scale: str) -> Callable[[Any, Data, Protocol], Data]:
    return lambda body, data, protocol: data | {"scale": scale}


def _correction_data(body: Correction, data: Data, protocol: Protocol) -> Data:
    new = body.replacement
    replacement = derive_data(new, protocol)
    replacement |= {"type": new.type, "occurred_at": new.occurred_at.isoformat()}
    return data | {"replacement": replacement}


_DERIVERS: dict[type[BaseModel], Callable[[Any, Data, Protocol], Data]] = {
    Crs: _crs_data,
    Gvhd: _gvhd_data,
    Lab: _lab_data,
    Infection: _scale_only("CTCAE-5.0"),
    Icans: _icans_data,
    Correction: _correction_data,
}


def derive_data(body: BaseModel, protocol: Protocol) -> Data:
    """The ``data`` stored for a clinical body (CONTRACT.md section 2): observations plus grades.

    - Every body: its JSON dump without ``type``, ``occurred_at`` and unset (None) fields.
    - crs (DOMAIN.md a): with observations, the ASTCT ``grade`` (0 = no CRS); ``scale``.
    - acute gvhd (DOMAIN.md b): with findings, organ ``stages`` and MAGIC ``grade`` 0-4;
      chronic gvhd (DOMAIN.md c): with ``organ_scores`` (as given), the NIH 2014 global
      ``severity``; ``scale`` NIH-2014.
    - icans (DOMAIN.md a, ICANS): with bedside findings, the ASTCT ``grade`` (0 = no ICANS);
      ``scale`` ASTCT-2019.
    - A posted grade (or severity) that differs from the derived one raises ``GradeConflict``; missing
      observations count as absent (a CRS grade posted with hypotension but no temperature and
      no anti-cytokine therapy derives 0 and conflicts).
    - lab (DOMAIN.md d): ``lln`` from the protocol (converted to the event's unit) when not
      posted, the CTCAE ``grade`` 0-4 and ``scale``.
    - infection: ``scale`` CTCAE-5.0 (grades are posted).
    - correction: ``replacement`` holds the replacement's derived data plus its ``type`` and
      ``occurred_at`` (ISO 8601), so a consumer can rebuild the replacement event.
    """
    data = body.model_dump(mode="json", exclude={"type", "occurred_at"}, exclude_none=True)
    derive = _DERIVERS.get(type(body))
    return derive(body, data, protocol) if derive else data
