"""The event forms are generated from the API's body schemas: every field, its bounds and options,
and form text parsed back into the body the API would take."""

from __future__ import annotations

from typing import Annotated, Literal
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel, Field, ValidationError

from services.ingest.web.form_data import body_from_form, form_from_data, problems_of
from services.ingest.web.forms import OBSERVATION_BODIES, form_fields
from services.ingest.web.labels import humanise
from shared.events import OBSERVATION_TYPES, Crs, Enrolment, Flag, Integer, Lab, _Body

SHANGHAI = ZoneInfo("Asia/Shanghai")


def by_name(model: type[BaseModel]) -> dict[str, object]:
    return {f.name: f for f in form_fields(model)}


def test_every_observation_type_has_a_form_with_every_body_field() -> None:
    assert set(OBSERVATION_BODIES) == OBSERVATION_TYPES
    for type_, model in OBSERVATION_BODIES.items():
        names = {f.name.split(".")[0] for f in form_fields(model)}  # a nested model: one input per key
        assert names == set(model.model_fields) - {"type"}, type_
        assert all(f.label and not f.label.islower() for f in form_fields(model)), type_


def test_chronic_gvhd_organ_scores_are_one_input_per_organ() -> None:
    organs = {f.name for f in form_fields(OBSERVATION_BODIES["gvhd"]) if f.name.startswith("organ_scores.")}
    assert organs == {f"organ_scores.{o}" for o in
                      ("skin", "mouth", "eyes", "gi", "liver", "lungs", "joints_fascia", "genital")}


def test_crs_fields_are_labelled_in_words_with_units_bounds_and_the_bodys_options() -> None:
    fields = by_name(Crs)
    temperature, oxygen, grade = fields["max_temp_c"], fields["oxygen"], fields["grade"]
    assert temperature.label == "Max temperature (°C)" and temperature.kind == "number"  # type: ignore[attr-defined]
    assert (temperature.minimum, temperature.maximum) == (30, 45)  # type: ignore[attr-defined]
    assert [v for v, _ in oxygen.options][:2] == ["none", "low_flow_nasal_cannula"]  # type: ignore[attr-defined]
    assert grade.kind == "integer" and not grade.required  # type: ignore[attr-defined]
    assert fields["occurred_at"].kind == "datetime" and fields["occurred_at"].required  # type: ignore[attr-defined]
    assert fields["hypotension"].kind == "select"  # type: ignore[attr-defined]


def test_form_text_becomes_the_body_times_in_the_trials_zone() -> None:
    form = {"occurred_at": "2025-11-26T10:00", "max_temp_c": "39.5", "hypotension": "true", "vasopressors": "1",
            "oxygen": "none", "grade": "", "vasopressin": ""}
    body = body_from_form(form_fields(Crs), form, SHANGHAI)
    assert body == {"occurred_at": "2025-11-26T10:00:00+08:00", "max_temp_c": 39.5, "hypotension": True,
                    "vasopressors": 1, "oxygen": "none"}
    crs = Crs.model_validate(body | {"type": "crs"})
    assert crs.occurred_at.utcoffset().total_seconds() == 8 * 3600  # type: ignore[union-attr]


def test_bad_text_is_left_for_the_schema_to_name_beside_its_field() -> None:
    body = body_from_form(form_fields(Crs), {"occurred_at": "2025-11-26T10:00", "vasopressors": "two",
                                             "max_temp_c": "50"}, SHANGHAI)
    with pytest.raises(ValidationError) as refused:
        Crs.model_validate(body | {"type": "crs"})
    problems = problems_of(refused.value)
    assert "vasopressors" in problems and "max_temp_c" in problems


def test_a_stored_event_fills_its_form_again() -> None:
    data = {"occurred_at": "2025-11-26T02:00:00+00:00", "test": "platelets", "value": 20.0, "unit": "10^9/L"}
    values = form_from_data(form_fields(Lab), data, SHANGHAI)
    assert values == {"occurred_at": "2025-11-26T10:00", "test": "platelets", "value": "20", "unit": "10^9/L"}


def test_enrolment_checklist_and_override_are_nested_fields() -> None:
    fields = by_name(Enrolment)
    assert fields["eligibility.severe_infection"].required  # type: ignore[attr-defined]
    assert not fields["eligibility_override.reason"].required  # type: ignore[attr-defined]
    body = body_from_form(form_fields(Enrolment), {"eligibility.cns_leukemia": "false",
                                                   "eligibility_override.reason": ""}, SHANGHAI)
    assert body == {"eligibility": {"cns_leukemia": False}}


Organ = Literal["skin", "mouth", "joints_fascia"]


class FutureGvhd(_Body):
    """The shape another branch gives chronic GVHD and ICANS: organ scores and bedside findings."""

    type: Literal["gvhd"]
    organ_scores: dict[Organ, Annotated[Integer, Field(ge=0, le=3)]] | None = None
    ice_score: Integer | None = Field(default=None, ge=0, le=10)
    seizure: Literal["none", "resolved", "prolonged_or_repetitive"] | None = None
    motor_weakness: Flag | None = None
    free_form: dict[str, int] | None = None
    level: Literal[1, 2, 3] | None = None


class LooseGvhd(_Body):
    """Organ scores typed loosely (names checked elsewhere): the inputs follow the contract's organs."""

    type: Literal["gvhd"]
    organ_scores: dict[str, Annotated[Integer, Field(ge=0, le=3)]] | None = None


def test_fields_added_to_a_body_appear_on_its_form_sensibly() -> None:
    fields = by_name(FutureGvhd)
    skin = fields["organ_scores.skin"]
    assert skin.label == "Organ score (0–3): Skin" and skin.kind == "integer"  # type: ignore[attr-defined]
    assert (skin.minimum, skin.maximum) == (0, 3) and not skin.required  # type: ignore[attr-defined]
    assert fields["organ_scores.joints_fascia"].label.endswith("Joints and fascia")  # type: ignore[attr-defined]
    assert fields["ice_score"].label == "ICE score (0–10)"  # type: ignore[attr-defined]
    assert fields["free_form"].kind == "json"  # type: ignore[attr-defined]
    form = {"occurred_at": "2026-01-02T08:00", "organ_scores.skin": "2", "organ_scores.mouth": "",
            "free_form": '{"a": 1}', "level": "2", "motor_weakness": "false"}
    body = body_from_form(form_fields(FutureGvhd), form, SHANGHAI)
    assert body["organ_scores"] == {"skin": 2} and body["free_form"] == {"a": 1}
    assert body["level"] == 2 and body["motor_weakness"] is False
    FutureGvhd.model_validate(body | {"type": "gvhd"})


def test_a_name_without_a_label_is_put_in_words_with_its_unit() -> None:
    assert humanise("stool_ml_day") == "Stool (mL/day)"
    assert humanise("body_temp_c") == "Body temp (°C)"
    assert humanise("platelet_transfusions") == "Platelet transfusions"


def test_organ_scores_typed_loosely_still_get_one_input_per_organ() -> None:
    fields = by_name(LooseGvhd)
    assert [n for n in fields if n.startswith("organ_scores.")] == [
        "organ_scores.skin", "organ_scores.mouth", "organ_scores.eyes", "organ_scores.gi", "organ_scores.liver",
        "organ_scores.lungs", "organ_scores.joints_fascia", "organ_scores.genital"]
    body = body_from_form(form_fields(LooseGvhd), {"organ_scores.lungs": "2"}, SHANGHAI)
    assert body == {"organ_scores": {"lungs": 2}}
