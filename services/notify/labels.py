"""Human-readable names for the arms, endpoints and incidences shown in the DSMB digest."""

from __future__ import annotations

ARM_LABELS = {"blinatumomab_dli": "Blinatumomab + DLI", "usual_care": "Usual care", "all": "All arms"}

ENDPOINT_LABELS = {"os": "Overall survival", "dfs": "Disease-free survival"}

INCIDENCE_LABELS = {
    "crs_any_2w": "CRS, any grade (2 weeks)",
    "crs_grade_3_plus_2w": "CRS, grade >= 3 (2 weeks)",
    "icans_any_2w": "ICANS, any grade (2 weeks)",
    "infection_any_2w": "Infection, any grade (2 weeks)",
    "infection_grade_3_plus_2w": "Infection, grade >= 3 (2 weeks)",
    "heme_ae_grade_3_plus_2w": "Haematological AE, grade >= 3 (2 weeks)",
    "agvhd_any_100d": "Acute GVHD, any grade (100 days)",
    "agvhd_grade_3_4_100d": "Acute GVHD, grade III-IV (100 days)",
    "cgvhd_any_100d": "Chronic GVHD, any (100 days)",
}


def arm_label(arm: str) -> str:
    return ARM_LABELS.get(arm, arm)
