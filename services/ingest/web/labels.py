"""Words for the pages: field labels with their units, option and state names.

A field or value missing here is humanised from its name (``stool_ml_day`` → "Stool (mL/day)"),
so a field added to a body schema shows up on its form with a readable label.
"""

from __future__ import annotations

FIELD_LABELS = {
    "occurred_at": "Occurred at",
    "course": "Course",
    "day": "Day of course",
    "dose_ug": "Dose (µg)",
    "mnc_per_kg": "Mononuclear cells (cells/kg)",
    "grade": "Grade",
    "max_temp_c": "Max temperature (°C)",
    "hypotension": "Hypotension",
    "vasopressors": "Vasopressors",
    "vasopressin": "Vasopressin",
    "oxygen": "Oxygen",
    "anticytokine_given": "Tocilizumab or steroids given",
    "ice_score": "ICE score (0–10)",
    "consciousness": "Level of consciousness",
    "seizure": "Seizure",
    "motor_weakness": "Deep focal motor weakness",
    "raised_icp": "Raised intracranial pressure",
    "form": "Form",
    "skin_bsa_pct": "Skin rash (% body surface)",
    "bullae": "Bullae",
    "bilirubin_mg_dl": "Bilirubin (mg/dL)",
    "upper_gi": "Upper GI symptoms",
    "stool_ml_day": "Stool output (mL/day)",
    "severe_abdominal_pain": "Severe abdominal pain",
    "severity": "Severity",
    "organ_scores": "Organ score (0–3)",
    "joints_fascia": "Joints and fascia",
    "gi": "GI tract",
    "site": "Site of infection",
    "organism": "Organism",
    "test": "Test",
    "value": "Value",
    "unit": "Unit",
    "lln": "Lower limit of normal",
    "mrd": "MRD",
    "response": "Response",
    "timepoint": "Assessment",
    "cause": "Cause of death",
    "reason": "Reason",
    "subject_id": "Subject ID",
    "site_id": "Site",
    "enrolled_at": "Enrolled at",
    "stable_vital_signs": "Stable vital signs",
    "severe_infection": "Severe infection",
    "gvhd_grade_2_to_4": "GVHD grade II–IV",
    "organ_failure": "Organ failure",
    "cns_leukemia": "CNS leukemia",
    "drug_allergy": "Allergy to the study drugs",
    "approved_by": "Approved by",
    "retracts_event_id": "Entry to retract",
    "corrects_event_id": "Entry to correct",
}

# Keys of dict fields whose type does not list them (a ``dict[str, int]``): one input per key.
KNOWN_KEYS = {
    "organ_scores": ("skin", "mouth", "eyes", "gi", "liver", "lungs", "joints_fascia", "genital"),
}

FIELD_HINTS = {
    "vasopressors": "count of vasopressors, not counting vasopressin",
    "grade": "leave empty to derive it from the findings",
    "mnc_per_kg": "e.g. 7.5e7",
    "severity": "chronic GVHD only (NIH)",
    "lln": "in the value's unit; leave empty for the protocol's",
    "subject_id": "1–32 letters, digits or -",
    "enrolled_at": "leave empty for now",
}

OPTION_WORDS = {
    "none": "None",
    "low_flow_nasal_cannula": "Low-flow nasal cannula (≤ 6 L/min)",
    "high_flow_nasal_cannula": "High-flow nasal cannula",
    "cpap": "CPAP",
    "bipap": "BiPAP",
    "cr": "CR (complete remission)",
    "cri": "CRi (incomplete count recovery)",
    "pr": "PR (partial remission)",
    "nr": "NR (no response)",
    "day14": "Day 14",
    "day100": "Day 100",
    "crs": "CRS",
    "gvhd": "GVHD",
    "wbc": "WBC",
    "10^9/L": "10^9/L",
    "cells/mm3": "cells/mm³",
    "g/dL": "g/dL",
    "g/L": "g/L",
    "prolonged_or_repetitive": "Prolonged or repetitive",
    "diffuse_edema_or_signs": "Diffuse edema or other signs",
    "mrd_positive": "MRD-positive",
    "hematologic_relapse": "Hematologic relapse",
    "blinatumomab_dli": "Blinatumomab + DLI",
    "usual_care": "Usual care",
}

EVENT_TYPES = {
    "blinatumomab_dose": "Blinatumomab dose",
    "dli": "DLI (donor lymphocyte infusion)",
    "crs": "CRS (cytokine release syndrome)",
    "icans": "ICANS (neurotoxicity)",
    "gvhd": "GVHD",
    "infection": "Infection",
    "lab": "Lab result",
    "disease_assessment": "Disease assessment",
    "relapse": "Relapse",
    "assessment_completed": "Assessment completed",
    "death": "Death",
    "follow_up": "Follow-up contact",
    "withdrawal": "Withdrawal",
    "correction": "Correction",
    "retraction": "Retraction",
    "patient_enrolled": "Enrolment",
}

_UNITS = {"c": "°C", "pct": "%", "kg": "kg", "ug": "µg", "mg_dl": "mg/dL", "ml_day": "mL/day", "years": "years"}


def humanise(name: str) -> str:
    for suffix, unit in _UNITS.items():
        if name.endswith("_" + suffix):
            return f"{humanise(name.removesuffix('_' + suffix))} ({unit})"
    words = name.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def field_label(name: str) -> str:
    return FIELD_LABELS.get(name) or humanise(name)


def option_words(value: str) -> str:
    return OPTION_WORDS.get(value) or humanise(value)


def event_words(type_: str) -> str:
    return EVENT_TYPES.get(type_) or humanise(type_)
