"""How a grade is explained in an alert: the scale and the observations it was derived from."""

from __future__ import annotations

from shared.clinical.history import Fact

ROMAN = {0: "0", 1: "I", 2: "II", 3: "III", 4: "IV"}
OXYGEN = {
    "low_flow_nasal_cannula": "low-flow nasal cannula", "high_flow_nasal_cannula": "high-flow nasal cannula",
    "facemask": "facemask", "nonrebreather": "non-rebreather mask", "venturi": "Venturi mask",
    "cpap": "CPAP", "bipap": "BiPAP", "mechanical_ventilation": "mechanical ventilation",
}
LAB_TERMS = {
    "neutrophils": "neutrophil count decreased", "platelets": "platelet count decreased",
    "hemoglobin": "anemia", "wbc": "white blood cell decreased", "lymphocytes": "lymphocyte count decreased",
}
WINDOW_LABELS = {"day14": "day-14", "day100": "day-100"}  # as in "the day-14 assessment"
DEVIATION_TITLES = {
    "eligibility_override": "enrolled with an eligibility override",
    "dose_off_schedule": "blinatumomab dose off schedule",
    "dose_unscheduled_day": "blinatumomab dose on an unscheduled day",
    "course_too_long": "blinatumomab course too long",
    "course_too_short": "blinatumomab course too short",
    "dli_without_course1": "DLI without blinatumomab course 1 before it",
    "dli_cell_dose": "DLI cell dose out of range",
    "second_course_without_dli": "second course with no DLI before it",
    "second_course_timing": "second course outside its interval after the DLI",
    "usual_care_blinatumomab": "blinatumomab given to a usual-care patient",
    "usual_care_dli": "DLI given to a usual-care patient",
}
_CRS_OBSERVATIONS = ("max_temp_c", "hypotension", "vasopressors", "oxygen")


def crs_basis(f: Fact) -> str:
    """'derived ASTCT grade 3 from 39.5 °C, 1 vasopressor, low-flow nasal cannula'."""
    d, g = f.data, f.grade
    if all(d.get(k) is None for k in _CRS_OBSERVATIONS):
        return f"reported ASTCT grade {g}"
    seen = []
    if d.get("max_temp_c") is not None:
        seen.append(f"{float(d['max_temp_c']):g} °C")
    pressors = int(d.get("vasopressors") or 0)
    if pressors:
        seen.append(f"{pressors} vasopressor{'s' if pressors > 1 else ''}"
                    + (" + vasopressin" if d.get("vasopressin") else ""))
    elif d.get("hypotension"):
        seen.append("hypotension without vasopressors")
    seen.append(OXYGEN.get(str(d.get("oxygen")), "no oxygen"))
    if d.get("anticytokine_given"):
        seen.append("after anti-cytokine therapy")
    return f"derived ASTCT grade {g} from {', '.join(seen)}"


def gvhd_basis(f: Fact) -> str:
    """'derived MAGIC grade III from stages skin 1, lower_gi 2' or 'reported MAGIC grade III'."""
    stages = f.data.get("stages")
    if not isinstance(stages, dict):
        return f"reported MAGIC grade {ROMAN[f.grade]}"
    staged = ", ".join(f"{organ} {stage}" for organ, stage in stages.items() if stage) or "all organs 0"
    return f"derived MAGIC grade {ROMAN[f.grade]} from stages {staged}"


CONSCIOUSNESS = {
    "alert": "alert", "awakens_spontaneously": "awakens spontaneously", "awakens_to_voice": "awakens to voice",
    "awakens_to_touch": "awakens only to touch", "unarousable": "unarousable",
}
SEIZURE = {"resolved": "seizure resolved rapidly", "prolonged_or_repetitive": "prolonged or repetitive seizures"}
RAISED_ICP = {"focal_edema": "focal cerebral oedema", "diffuse_edema_or_signs": "diffuse oedema or signs of raised ICP"}


def icans_basis(f: Fact) -> str:
    """'derived ASTCT grade 3 from ICE 2/10, awakens to voice', 'reported ASTCT grade 3' (with the
    findings given beside a posted grade in brackets)."""
    d = f.data
    seen = [f"ICE {int(d['ice_score'])}/10"] if d.get("ice_score") is not None else []
    seen += [CONSCIOUSNESS[d["consciousness"]]] if d.get("consciousness") in CONSCIOUSNESS else []
    seen += [SEIZURE[d["seizure"]]] if d.get("seizure") in SEIZURE else []
    seen += ["deep focal motor weakness"] if d.get("motor_weakness") else []
    seen += [RAISED_ICP[d["raised_icp"]]] if d.get("raised_icp") in RAISED_ICP else []
    assessed = d.get("ice_score") is not None or d.get("consciousness") == "unarousable"
    if assessed and d.get("consciousness") is not None:
        return f"derived ASTCT grade {f.grade} from {', '.join(seen)}"
    return f"reported ASTCT grade {f.grade}" + (f" ({', '.join(seen)})" if seen else "")


def cgvhd_basis(f: Fact) -> str:
    """'NIH 2014 global severity severe from organ scores lungs 2, skin 1' or 'NIH global severity mild'."""
    severity, scores = f.data.get("severity"), f.data.get("organ_scores")
    if not isinstance(scores, dict):
        return f"NIH global severity {severity}"
    scored = ", ".join(f"{organ} {score}" for organ, score in scores.items() if score) or "all organs 0"
    return f"NIH 2014 global severity {severity} from organ scores {scored}"


def lab_term(f: Fact) -> str:
    return LAB_TERMS.get(str(f.data.get("test")), str(f.data.get("test")))


def lab_basis(f: Fact) -> str:
    d = f.data
    lln = f" (LLN {float(d['lln']):g})" if d.get("lln") is not None else ""
    return f"{d.get('test')} {float(d.get('value', 0)):g} {d.get('unit')}{lln}: CTCAE v5.0 grade {f.grade}"


def deviation_title(code: str) -> str:
    return f"Protocol deviation: {DEVIATION_TITLES.get(code, code)}"


def window_label(name: str) -> str:
    return WINDOW_LABELS.get(name, name)
