"""Chronic GVHD global severity, NIH 2014 consensus (DOMAIN.md c; Jagasia MH et al., Biol Blood
Marrow Transplant 2015;21:389-401, "Global severity of chronic GVHD").

Pure functions, no I/O. Eight organs or sites are scored 0-3 (0 none; 1 no significant functional
impairment; 2 significant impairment but no major disability; 3 major disability): skin, mouth,
eyes, GI tract, liver, lungs, joints and fascia, genital tract. From them, evaluated top-down:

| severity | when (DOMAIN.md c, NIH 2014) |
|---|---|
| severe | any organ scored 3, or lung score 2 or 3 |
| moderate | any organ other than the lung scored 2, or lung score 1, or 3 or more organs involved (each at most 1) |
| mild | 1 or 2 organs involved, each at most score 1, lung score 0 |

Choices (each with its source):

- Choice: an organ left out of ``organ_scores`` is scored 0, not involved (as a missing CRS
  observation or MAGIC finding counts as absent); at least one organ must score above 0, or it is
  no chronic GVHD to record (CONTRACT.md section 2).
- Choice: an organ is "involved" when its score is above 0 (NIH 2014: "organs involved" counts the
  organs with a score of 1 or more).
- The lung is never "an organ with a score of 2" for moderate: its score 2 is already severe (NIH
  2014: "at least 1 organ (not lung) with a score of 2"). The lung score is the one the 2014 form
  derives from FEV1 where measured (NIH 2014: "in lung, FEV1 is used instead of the clinical score");
  the site records that single lung score.
- A score is taken as what the site attributes to chronic GVHD: NIH 2014 leaves out an organ whose
  whole abnormality has a documented non-GVHD cause and does not downgrade one with mixed causes,
  so the site scores 0 or the full score respectively.
"""

from __future__ import annotations

from collections.abc import Mapping

ORGANS = ("skin", "mouth", "eyes", "gi", "liver", "lungs", "joints_fascia", "genital")
SEVERITIES = ("mild", "moderate", "severe")


def cgvhd_severity(scores: Mapping[str, int]) -> str | None:
    """NIH 2014 global severity from organ scores 0-3 (an organ not given is 0); None when no organ
    scores above 0 (no chronic GVHD)."""
    unknown = set(scores) - set(ORGANS)
    if unknown:
        raise ValueError(f"unknown organ(s) {sorted(unknown)}; use {list(ORGANS)}")
    for organ, score in scores.items():
        if not 0 <= score <= 3:
            raise ValueError(f"{organ} score {score} is outside 0-3")
    lungs = scores.get("lungs", 0)
    others = [score for organ, score in scores.items() if organ != "lungs"]
    involved = sum(1 for score in scores.values() if score > 0)
    if 3 in others or lungs >= 2:
        return "severe"
    if 2 in others or lungs == 1 or involved >= 3:
        return "moderate"
    return "mild" if involved else None
