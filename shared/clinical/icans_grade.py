"""ICANS grading, ASTCT 2019 consensus for adults (DOMAIN.md a, "ICANS"; Lee DW et al., Biol Blood
Marrow Transplant 2019;25:625-638, table 5 and its footnotes).

Pure functions, no I/O. The grade is the most severe of five domains, each scored 0-4 here:

| domain | 0 | 1 | 2 | 3 | 4 |
|---|---|---|---|---|---|
| ICE score (0-10) | 10 | 7-9 | 3-6 | 0-2 | 0 and unarousable (by consciousness) |
| consciousness | alert | awakens spontaneously | awakens to voice | awakens only to touch | unarousable |
| seizure | none | - | - | resolved rapidly (any clinical, or EEG seizure resolving with intervention) | prolonged (> 5 min) or repetitive without return to baseline |
| motor | no deep focal weakness | - | - | - | deep focal weakness (hemiparesis, paraparesis) |
| raised ICP / cerebral oedema | none | - | - | focal/local oedema on imaging | diffuse oedema, posturing, CN VI palsy, papilloedema, Cushing's triad |

Choices (each with its source):

- Choice: ICE 0 in an *awake* patient is grade 3 (ICE row 0-2); it is grade 4 only when the patient
  is unarousable, which the consciousness domain gives (ASTCT table 5 footnote: "a patient with an
  ICE score of 0 may be classified as grade 3 ICANS if awake with global aphasia, but ... grade 4
  ICANS if unarousable"). An unarousable patient cannot perform the ICE assessment (ICE row, grade
  4: "0, patient is unarousable and unable to perform ICE"), so the body refuses ``unarousable``
  with an ICE score above 0 (``shared.events.Icans``), and an ICE score left out for an unarousable
  patient is read as 0.
- Choice: ``alert`` is no depressed consciousness (domain 0); ASTCT's grade-1 row "awakens
  spontaneously" is a drowsy patient, so it is grade 1 even with ICE 10 (ASTCT table 5). Voice is
  grade 2, touch grade 3, unarousable grade 4 (DOMAIN.md a, ASTCT table 5; not the "voice = 1"
  reading of some restatements).
- Choice: the seizure, motor and ICP domains have no grade 1-2 rows (ASTCT table 5: "N/A");
  a missing one counts as absent, as a missing CRS observation does.
- ICE 10, alert and nothing else is grade 0: no ICANS (CONTRACT.md section 2).
- The findings are taken as not attributable to another cause (sedation, intracranial haemorrhage):
  ASTCT excludes those, and the person recording them decides. Tremor and myoclonus are CTCAE, not
  ICANS, and have no field. Children <= 12 years are graded with CAPD instead of ICE (ASTCT); the
  contract takes ICE only, so a CAPD-based grade is posted as ``grade``.
"""

from __future__ import annotations

from collections.abc import Mapping

CONSCIOUSNESS_LEVEL: Mapping[str, int] = {
    "alert": 0,
    "awakens_spontaneously": 1,
    "awakens_to_voice": 2,
    "awakens_to_touch": 3,
    "unarousable": 4,
}
SEIZURE_LEVEL: Mapping[str, int] = {"none": 0, "resolved": 3, "prolonged_or_repetitive": 4}
RAISED_ICP_LEVEL: Mapping[str, int] = {"none": 0, "focal_edema": 3, "diffuse_edema_or_signs": 4}


def ice_level(ice_score: int | None) -> int:
    """ICE 10 (or not given) -> 0; 7-9 -> 1; 3-6 -> 2; 0-2 -> 3 (ASTCT table 5, ICE row)."""
    if ice_score is None:
        return 0
    if not 0 <= ice_score <= 10:
        raise ValueError(f"ice_score {ice_score} is outside 0-10")
    if ice_score == 10:
        return 0
    if ice_score >= 7:
        return 1
    return 2 if ice_score >= 3 else 3


def _level(table: Mapping[str, int], name: str, value: str | None) -> int:
    if value is None:
        return 0
    if value not in table:
        raise ValueError(f"unknown {name} {value!r}; use one of {list(table)}")
    return table[value]


def icans_domains(*, ice_score: int | None, consciousness: str | None, seizure: str | None = None,
                  motor_weakness: bool | None = None, raised_icp: str | None = None) -> dict[str, int]:
    """Each domain's grade 0-4 (the table above); a domain not given is 0."""
    if ice_score is None and consciousness == "unarousable":
        ice_score = 0  # unable to perform ICE
    return {
        "ice": ice_level(ice_score),
        "consciousness": _level(CONSCIOUSNESS_LEVEL, "consciousness", consciousness),
        "seizure": _level(SEIZURE_LEVEL, "seizure", seizure),
        "motor": 4 if motor_weakness else 0,
        "raised_icp": _level(RAISED_ICP_LEVEL, "raised_icp", raised_icp),
    }


def icans_grade(*, ice_score: int | None, consciousness: str | None, seizure: str | None = None,
                motor_weakness: bool | None = None, raised_icp: str | None = None) -> int:
    """ASTCT 2019 ICANS grade 0-4: the most severe domain ("ICANS grade is determined by the most
    severe event ... e.g. ICE 3 with a generalized seizure is grade 3"); 0 is no ICANS."""
    return max(icans_domains(ice_score=ice_score, consciousness=consciousness, seizure=seizure,
                             motor_weakness=motor_weakness, raised_icp=raised_icp).values())
