"""``trialwatch boundaries`` as registered on the real CLI (services/cli.py), CONTRACT.md section 1."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from services.cli import app
from shared.clinical.boundaries import pocock

CONTRACT_KEYS = {"method", "params", "looks", "p_stop_p0", "p_stop_p1", "expected_n_p0", "expected_n_p1"}
CLINFUN_EXAMPLE = ["--p0", "0.2", "--p1", "0.35", "--n", "75", "--looks", "20"]  # DOMAIN.md f

runner = CliRunner()


def boundaries(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["boundaries", *args])


def test_json_is_one_object_with_the_contract_keys() -> None:
    result = boundaries(*CLINFUN_EXAMPLE, "--json")
    assert result.exit_code == 0, result.output

    # stdout alone is one JSON object of exactly the contract's keys.
    data = json.loads(result.stdout)
    assert set(data) == CONTRACT_KEYS

    # clinfun::toxbdry(0.2, 0.35, c(20, 40, 60, 75)): hi.bdry 7, 12, 17, 21; ours is the least that stops.
    assert data["method"] == "pocock"
    assert data["looks"] == [{"n": 20, "stop_at": 8}, {"n": 40, "stop_at": 13},
                             {"n": 60, "stop_at": 18}, {"n": 75, "stop_at": 22}]
    assert {k: data["params"][k] for k in ("p0", "p1", "n_max", "cp0", "looks")} == {
        "p0": 0.2, "p1": 0.35, "n_max": 75, "cp0": 0.1, "looks": 20}
    assert data["p_stop_p0"] == pytest.approx(0.088, abs=0.01) and data["p_stop_p0"] <= 0.1
    assert data["p_stop_p1"] == pytest.approx(0.911, abs=0.01)
    assert data["expected_n_p0"] == pytest.approx(72.0, abs=0.2)
    assert data["expected_n_p1"] == pytest.approx(39.9, abs=0.2)


def test_json_gives_null_where_no_count_stops() -> None:
    # One patient with the event never stops the bundled CRS rule's design; two in two do.
    data = json.loads(boundaries("--p0", "0.1", "--p1", "0.3", "--n", "30", "--json").stdout)
    assert data["looks"][:2] == [{"n": 1, "stop_at": None}, {"n": 2, "stop_at": 2}]
    assert data == json.loads(json.dumps(pocock(0.1, 0.3, 30).to_json()))


def test_the_table_lists_each_look_and_the_operating_characteristics() -> None:
    result = boundaries(*CLINFUN_EXAMPLE)
    assert result.exit_code == 0, result.output

    rows = [line.split() for line in result.stdout.splitlines()]
    looks = [(row[0], row[1]) for row in rows if len(row) == 4 and row[0].isdigit()]
    assert looks == [("20", "8"), ("40", "13"), ("60", "18"), ("75", "22")]

    assert "Pocock" in result.stdout
    characteristics = result.stdout.split("Operating characteristics")[1]
    assert "p0 = 0.2" in characteristics and "0.0875" in characteristics and "72.0" in characteristics
    assert "p1 = 0.35" in characteristics and "0.9114" in characteristics and "39.9" in characteristics


@pytest.mark.parametrize(("args", "named"), [
    (["--p0", "0.2", "--p1", "0.1", "--n", "30"], "--p1"),               # p1 not above p0
    (["--p0", "0", "--p1", "0.35", "--n", "30"], "--p0"),                # p0 outside (0, 1)
    (["--p0", "0.2", "--p1", "0.35", "--n", "1"], "--n"),                # too few patients
    (["--p0", "0.2", "--p1", "0.35", "--n", "abc"], "--n"),              # not a number
    (["--p0", "0.2", "--p1", "0.35", "--n", "30", "--looks", "0"], "--looks"),
    (["--p0", "0.2", "--p1", "0.35", "--n", "30", "--cp0", "1"], "--cp0"),
    (["--p0", "0.2", "--p1", "0.35", "--n", "30", "--method", "sprt"], "--method"),
    (["--p0", "0.2", "--p1", "0.35", "--n", "30", "--method", "bayes", "--threshold", "1.5"], "--threshold"),
    (["--p0", "0.2", "--p1", "0.35", "--n", "30", "--method", "bayes", "--prior-a", "0"], "--prior-a"),
    (["--p1", "0.35", "--n", "30"], "--p0"),                             # missing
])
def test_bad_arguments_exit_2_naming_the_argument(args: list[str], named: str) -> None:
    result = boundaries(*args, "--json")

    assert result.exit_code == 2
    assert result.stdout == ""  # nothing a script could mistake for a table or JSON
    assert named in result.stderr
