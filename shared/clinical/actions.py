"""What an alert tells the investigator to do: label and reporting practice as text.

Sources:

- BLINCYTO dose modifications (DOMAIN.md e): CRS 3 -> interrupt, dexamethasone 8 mg q8h up to
  3 days then taper over 4 days, restart at 9 ug/day when resolved and escalate to 28 ug/day after
  7 days without recurrence; CRS 4 -> discontinue permanently. Neurological toxicity (ICANS) 3 ->
  withhold until <= grade 1 for at least 3 days, restart at 9 ug/day; discontinue permanently if it
  occurred at 9 ug/day or takes > 7 days to resolve, or after more than one seizure; 4 -> discontinue
  permanently. Other clinically relevant reactions 3 -> withhold until <= grade 1 (discontinue if
  > 14 days to resolve); 4 -> consider permanent discontinuation. Patients < 45 kg: 5 -> 15
  ug/m2/day and dexamethasone 5 mg/m2 (max 8 mg).
- Safety reporting (DOMAIN.md g): deaths and life-threatening (grade >= 4) events are serious
  adverse events, reported to the sponsor immediately (operationally within 24 h, ICH E6 4.11.1).
"""

from __future__ import annotations

SAE = ("Report as a serious adverse event (SAE) to the sponsor immediately, within 24 h of "
       "becoming aware (ICH E6 4.11.1).")
LOW_WEIGHT_KG = 45.0


def _dex(weight_kg: float) -> str:
    dose = "5 mg/m² (max 8 mg)" if weight_kg < LOW_WEIGHT_KG else "8 mg"
    return f"dexamethasone {dose} IV/PO every 8 h for up to 3 days, then taper over 4 days"


def _restart(weight_kg: float) -> str:
    low, full = ("5 µg/m²/day", "15 µg/m²/day") if weight_kg < LOW_WEIGHT_KG else ("9 µg/day", "28 µg/day")
    return f"restart at {low} and escalate to {full} after 7 days if it does not recur"


def crs(grade: int, weight_kg: float) -> str:
    if grade >= 4:
        return f"Discontinue blinatumomab permanently; {_dex(weight_kg)}. {SAE}"
    if grade == 3:
        return (f"Interrupt blinatumomab; {_dex(weight_kg)}. When CRS has resolved, "
                f"{_restart(weight_kg)}.")
    return ("Supportive care and close monitoring (label: no dose change for grade 1-2 CRS; "
            "interrupt at grade 3).")


def icans(grade: int, weight_kg: float, dose_ug: float | None, seizures: int = 0) -> str:
    """``seizures``: how many the patient has had with ICANS so far (this event's included)."""
    if grade >= 4:
        return f"Discontinue blinatumomab permanently. {SAE}"
    if seizures > 1:
        return ("More than one seizure has occurred: discontinue blinatumomab permanently "
                "(label: neurological toxicity, seizure).")
    if grade == 3 and dose_ug is not None and dose_ug <= 9.0:
        return (f"It occurred at {dose_ug:g} µg/day: discontinue blinatumomab permanently "
                "(label: grade 3 neurological toxicity at 9 µg/day).")
    if grade == 3:
        return ("Withhold blinatumomab until ICANS is grade <= 1 for at least 3 days, then "
                f"{_restart(weight_kg)}; discontinue permanently if it takes more than 7 days to "
                "resolve or after more than one seizure.")
    return "Monitor neurological status (ICE score) closely; withhold blinatumomab at grade 3."


def agvhd(grade: int) -> str:
    text = ("Treat acute GVHD per the site's standard (systemic corticosteroids first line for "
            "grade II-IV) and inform the principal investigator before any further DLI or course.")
    return f"{text} {SAE}" if grade >= 4 else text


def agvhd_low(grade: int) -> str:
    return ("Treat per the site's standard and stage the organs at each visit; grade III-IV is urgent "
            "and counts toward the stopping rule.")


def cgvhd(severity: str, *, scored: bool = False) -> str:
    if scored:
        return (f"Treat {severity} chronic GVHD per the site's standard and score the organs again at "
                "each visit.")
    return f"Record the NIH organ scores ({severity} global severity) and treat per the site's standard."


def infection(grade: int) -> str:
    if grade >= 5:
        return f"Record the death. {SAE}"
    if grade == 4:
        return (f"Treat urgently; consider permanent discontinuation of blinatumomab (label: grade 4 "
                f"clinically relevant reaction). {SAE}")
    return ("Treat per the site's standard; withhold blinatumomab until grade <= 1 (label: grade 3 "
            "clinically relevant reaction), discontinue if it takes more than 14 days to resolve.")


def heme(grade: int) -> str:
    text = "Review the count and supportive care (transfusion, growth factors per site practice)."
    return f"{text} {SAE}" if grade >= 4 else text


def death() -> str:
    return (f"{SAE} Stop all study treatment; supply the autopsy or terminal report to the sponsor "
            "on request.")


def relapse() -> str:
    return "Record the disease assessment (MRD, response); relapse is a disease-free-survival event."


def withdrawal() -> str:
    return ("No further study treatment; confirm whether the patient consents to survival follow-up "
            "and record the last contact.")


DEVIATION_STEPS = {
    "eligibility_override": "Confirm the override is documented and approved by the principal investigator.",
    "dose_off_schedule": "Check the infusion rate and bag against the cohort's schedule before the next bag.",
    "dose_unscheduled_day": "Check the infusion against the cohort's schedule.",
    "course_too_long": "Stop the course: the cohort's maximum course length is reached.",
    "course_too_short": "Document why the course stopped early.",
    "dli_without_course1": "Check the dates: the DLI follows blinatumomab course 1.",
    "dli_cell_dose": "Document the infused MNC dose and why it was outside the protocol range.",
    "second_course_without_dli": "Check the dates: course 2 follows the DLI.",
    "second_course_timing": "Document why course 2 started outside the protocol's interval after the DLI.",
    "usual_care_blinatumomab": "Check the arm: usual-care patients get no blinatumomab.",
    "usual_care_dli": "Check the arm: usual-care patients get no study DLI.",
}


def deviation(code: str) -> str:
    step = DEVIATION_STEPS.get(code, "")
    return (f"{step} Record it in the protocol deviation log, inform the principal investigator and "
            "assess the impact on patient safety and on the data.").strip()


def overdue(label: str, due: str) -> str:
    return (f"Complete and record the {label} assessment (due by {due}), or record why it was "
            "not done.")
