from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta, binom
from typer.testing import CliRunner

from services.boundaries_cmd import boundaries
from shared.clinical.boundaries import (
    Boundary,
    InvalidDesign,
    Look,
    bayes,
    crossing_probabilities,
    look_sizes,
    pocock,
    pocock_at,
)

CONTRACT_KEYS = {"method", "params", "looks", "p_stop_p0", "p_stop_p1", "expected_n_p0", "expected_n_p1"}


# --- (a) clinfun::toxbdry(0.2, 0.35, c(20, 40, 60, 75)), DOMAIN.md section f ----------------------

def test_pocock_reproduces_clinfun_hi_boundary() -> None:
    b = pocock_at(0.2, 0.35, [20, 40, 60, 75], cp0=0.1)

    # clinfun hi.bdry 7, 12, 17, 21 are the largest acceptable counts; ours are the least that stop.
    assert [(look.n, look.stop_at) for look in b.looks] == [(20, 8), (40, 13), (60, 18), (75, 22)]
    assert b.p_stop_p0 == pytest.approx(0.088, abs=0.01)
    assert b.p_stop_p1 == pytest.approx(0.911, abs=0.01)
    assert b.expected_n_p0 == pytest.approx(72.0, abs=0.2)
    assert b.expected_n_p1 == pytest.approx(39.9, abs=0.2)


def test_clinfun_lo_boundary_exceeds_cp0_so_ours_is_the_hi_one() -> None:
    # lo.bdry 7, 12, 17, 20 crosses slightly above cP0 = 0.1: "closest without exceeding" rejects it.
    lo = [Look(20, 8), Look(40, 13), Look(60, 18), Look(75, 21)]
    cross, _ = crossing_probabilities(lo, 0.2)
    assert 0.1 < cross < 0.105
    assert pocock_at(0.2, 0.35, [20, 40, 60, 75]).p_stop_p0 < 0.1 < cross


def test_uniform_looks_are_the_explicit_looks() -> None:
    assert look_sizes(75, 20) == (20, 40, 60, 75)
    assert pocock(0.2, 0.35, 75, 0.1, looks=20).looks == pocock_at(0.2, 0.35, [20, 40, 60, 75]).looks


def test_pocock_boundary_is_flat_alpha_and_the_next_alpha_would_exceed_cp0() -> None:
    b = pocock(0.1, 0.3, 30)
    alpha = b.params["alpha"]

    # Every look uses the same nominal alpha: the least b with P(X >= b | p0) <= alpha.
    for look in b.looks:
        tails = binom.sf(np.arange(-1, look.n + 1), look.n, 0.1)
        least = int(np.argmax(tails <= alpha))
        assert look.stop_at == (None if least > look.n else least)

    # Raising alpha to the next value where any look's boundary moves crosses more than cp0.
    next_alpha = min(binom.sf((look.stop_at or look.n + 1) - 2, look.n, 0.1) for look in b.looks)
    lowered = [Look(look.n, int(np.argmax(binom.sf(np.arange(-1, look.n + 1), look.n, 0.1) <= next_alpha)))
               for look in b.looks]
    assert crossing_probabilities(lowered, 0.1)[0] > 0.1 >= b.p_stop_p0


# --- (b) exact operating characteristics agree with Monte Carlo ------------------------------------

def simulate(looks: tuple[Look, ...], p: float, paths: int = 200_000) -> tuple[float, float, float, float]:
    """(P(stop), its SE, mean N, its SE) over simulated patient sequences."""
    rng = np.random.default_rng(20240601)
    ns = np.array([look.n for look in looks])
    bars = np.array([look.n + 1 if look.stop_at is None else look.stop_at for look in looks])
    events = np.cumsum(rng.random((paths, ns[-1])) < p, axis=1, dtype=np.int16)[:, ns - 1]
    crossed = events >= bars
    stopped = crossed.any(axis=1)
    size = np.where(stopped, ns[np.argmax(crossed, axis=1)], ns[-1])
    return (stopped.mean(), stopped.std() / np.sqrt(paths), size.mean(), size.std() / np.sqrt(paths))


@pytest.mark.parametrize("boundary", [
    pocock(0.1, 0.3, 30), pocock(0.2, 0.35, 40, cp0=0.05, looks=6),
    bayes(0.1, 0.3, 30), bayes(0.2, 0.4, 40, prior_a=0.4, prior_b=1.6, threshold=0.9, looks=5),
], ids=["pocock-continuous", "pocock-every-6", "bayes-continuous", "bayes-every-5"])
def test_exact_operating_characteristics_match_simulation(boundary: Boundary) -> None:
    for p, p_stop, expected_n in [(boundary.params["p0"], boundary.p_stop_p0, boundary.expected_n_p0),
                                  (boundary.params["p1"], boundary.p_stop_p1, boundary.expected_n_p1)]:
        sim_stop, se_stop, sim_n, se_n = simulate(boundary.looks, p)
        assert abs(p_stop - sim_stop) < 4 * se_stop
        assert abs(expected_n - sim_n) < 4 * se_n


# --- (c) properties ------------------------------------------------------------------------------

designs = st.tuples(
    st.floats(0.02, 0.6), st.floats(0.05, 0.35), st.integers(2, 120), st.floats(0.01, 0.3),
    st.integers(1, 12),
)


def effective(look: Look) -> int:
    return look.n + 1 if look.stop_at is None else look.stop_at


def assert_monotone(b: Boundary) -> None:
    thresholds = [effective(look) for look in b.looks]
    assert thresholds == sorted(thresholds)
    stopping = [look.stop_at is not None for look in b.looks]
    assert stopping == sorted(stopping)  # once a count can stop, one always can
    counts = [s for s in (b.stop_at(n) for n in range(b.looks[-1].n + 1)) if s is not None]
    assert counts == sorted(counts)


@settings(max_examples=60, deadline=None)
@given(designs)
def test_pocock_never_lowers_the_bar_and_respects_cp0(design: tuple[float, float, int, float, int]) -> None:
    p0, gap, n, cp0, looks = design
    b = pocock(p0, min(p0 + gap, 0.99), n, cp0, looks)
    assert_monotone(b)
    assert b.p_stop_p0 <= cp0
    assert b.p_stop_p1 is not None and b.p_stop_p1 >= b.p_stop_p0


@settings(max_examples=60, deadline=None)
@given(designs, st.floats(0.2, 3), st.floats(0.2, 3), st.floats(0.7, 0.99))
def test_bayes_never_lowers_the_bar_and_is_the_least_stopping_count(
    design: tuple[float, float, int, float, int], a: float, b_: float, threshold: float,
) -> None:
    p0, gap, n, _, looks = design
    b = bayes(p0, min(p0 + gap, 0.99), n, a, b_, threshold, looks)
    assert_monotone(b)
    for look in b.looks:  # brute force over every count, against the windowed search
        stops = beta.sf(p0, a + np.arange(look.n + 1), b_ + look.n - np.arange(look.n + 1)) > threshold
        assert look.stop_at == (int(np.argmax(stops)) if stops.any() else None)


# --- (d) Bayesian boundary by hand ---------------------------------------------------------------

def test_bayes_small_case_by_hand() -> None:
    # Beta(1, 1) prior, p0 = 0.2, threshold 0.9, a look every 5 patients up to 10.
    b = bayes(0.2, 0.4, 10, prior_a=1, prior_b=1, threshold=0.9, looks=5)

    # P(theta > 0.2 | x, n) = P(Bin(n + 1, 0.2) <= x) for a Beta(1, 1) prior (integer parameters).
    # n = 5: 2 events give 1 - 0.8^6 - 6 * 0.2 * 0.8^5 - 15 * 0.04 * 0.8^4 = 0.90112 > 0.9;
    #        1 event gives 0.8^6 + 6 * 0.2 * 0.8^5 = 0.65536.
    assert beta.sf(0.2, 3, 4) == pytest.approx(0.90112) and beta.sf(0.2, 2, 5) == pytest.approx(0.65536)
    # n = 10: 4 events give P(Bin(11, 0.2) <= 4) = 0.94959 > 0.9; 3 events give 0.83886.
    assert beta.sf(0.2, 5, 7) == pytest.approx(0.9495904256)
    assert beta.sf(0.2, 4, 8) == pytest.approx(0.8388608)
    assert b.looks == (Look(5, 2), Look(10, 4))
    assert (b.stop_at(4), b.stop_at(5), b.stop_at(9), b.stop_at(10), b.stop_at(12)) == (None, 2, 2, 4, 4)

    # P(stop | p) = P(X5 >= 2) + P(X5 <= 1 and X5 + Y5 >= 4), with X5, Y5 ~ Bin(5, p).
    for p in (0.2, 0.4):
        first = binom.sf(1, 5, p)
        second = sum(binom.pmf(x, 5, p) * binom.sf(3 - x, 5, p) for x in (0, 1))
        cross, expected_n = crossing_probabilities(b.looks, p)
        assert cross == pytest.approx(first + second, rel=1e-12)
        assert expected_n == pytest.approx(5 * first + 10 * (1 - first), rel=1e-12)


def test_bayes_can_have_no_stopping_count_at_early_looks() -> None:
    b = bayes(0.3, 0.5, 10, threshold=0.99)
    assert b.looks[0] == Look(1, None)  # one event in one patient: P(theta > 0.3) = 0.91
    assert b.stop_at(0) is None


def test_invalid_designs_name_the_argument() -> None:
    for call, argument in [(lambda: pocock(0.3, 0.2, 30), "p1"), (lambda: pocock(0, 0.2, 30), "p0"),
                           (lambda: pocock(0.1, 0.2, 1), "n_max"), (lambda: pocock(0.1, 0.2, 30, 1.5), "cp0"),
                           (lambda: bayes(0.1, 0.2, 30, prior_a=0), "prior_a"),
                           (lambda: pocock_at(0.1, 0.2, [10, 5]), "ns")]:
        with pytest.raises(InvalidDesign) as caught:
            call()
        assert caught.value.argument == argument


@pytest.mark.parametrize(("call", "message"), [
    (lambda: pocock(0.3, 0.2, 30), "p1: must be above p0 (0.3), got 0.2"),
    (lambda: pocock(0.2, 0.2, 30), "p1: must be above p0 (0.2), got 0.2"),
    (lambda: pocock(0.2, 1.0, 30), "p1: must be strictly between 0 and 1, got 1.0"),
    (lambda: pocock(1.0, None, 30), "p0: must be strictly between 0 and 1, got 1.0"),
    (lambda: pocock(0.1, 0.2, 1), "n_max: must be at least 2, got 1"),
    (lambda: pocock(0.1, 0.2, 30, looks=0), "looks: must be at least 1 patient per look, got 0"),
    (lambda: bayes(0.1, 0.2, 30, prior_b=-1), "prior_b: must be positive, got -1"),
    (lambda: pocock_at(0.1, 0.2, [5, 5]), "ns: looks must be increasing positive sizes, got [5, 5]"),
    (lambda: pocock_at(0.1, 0.2, [0, 5]), "ns: looks must be increasing positive sizes, got [0, 5]"),
    (lambda: pocock_at(0.1, 0.2, []), "ns: looks must be increasing positive sizes, got []"),
])
def test_an_invalid_design_says_what_is_wrong_with_it(call, message) -> None:
    with pytest.raises(InvalidDesign) as caught:
        call()
    assert str(caught.value) == message


def test_look_sizes_run_up_to_n_max_whatever_the_step() -> None:
    assert look_sizes(6, 1) == (1, 2, 3, 4, 5, 6)
    assert look_sizes(7, 3) == (3, 6, 7)
    assert look_sizes(6, 3) == (3, 6)
    assert look_sizes(2, 5) == (2,)


def test_a_design_without_p1_has_no_operating_characteristics_under_p1() -> None:
    b = pocock_at(0.2, None, [5, 10])
    assert (b.p_stop_p1, b.expected_n_p1) == (None, None)
    assert b.method == "pocock" and 5 <= b.expected_n_p0 <= 10
    with_p1 = pocock_at(0.2, 0.4, [5, 10])
    assert with_p1.p_stop_p1 is not None and with_p1.expected_n_p1 is not None
    assert with_p1.expected_n_p1 < with_p1.expected_n_p0  # stopping comes sooner at the higher rate


# --- (e) the CLI ---------------------------------------------------------------------------------

app = typer.Typer()
app.command("boundaries")(boundaries)
app.command("noop")(lambda: None)  # a second command keeps "boundaries" a sub-command, as in the real CLI
runner = CliRunner()


def test_cli_prints_every_look() -> None:
    result = runner.invoke(app, ["boundaries", "--p0", "0.2", "--p1", "0.35", "--n", "75", "--looks", "20"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    assert [row[:2] for row in rows if row and row[0] in {"20", "40", "60", "75"}] == [
        ["20", "8"], ["40", "13"], ["60", "18"], ["75", "22"]]
    assert "0.0875" in result.output and "72.0" in result.output and "39.9" in result.output


def test_cli_compressed_rows_still_give_every_look() -> None:
    result = runner.invoke(app, ["boundaries", "--p0", "0.1", "--p1", "0.3", "--n", "30"])
    assert result.exit_code == 0, result.output
    recovered: dict[int, int | None] = {}
    for row in (line.split() for line in result.output.splitlines()):
        if row and row[0][0].isdigit() and len(row) == 4:
            first, _, last = row[0].partition("-")
            for n in range(int(first), int(last or first) + 1):
                recovered[n] = None if row[1] == "-" else int(row[1])
    assert recovered == {look.n: look.stop_at for look in pocock(0.1, 0.3, 30).looks}


def test_cli_json_has_the_contract_shape() -> None:
    result = runner.invoke(app, ["boundaries", "--p0", "0.2", "--p1", "0.35", "--n", "40",
                                 "--method", "bayes", "--threshold", "0.9", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) == CONTRACT_KEYS
    assert data["method"] == "bayes" and data["params"]["threshold"] == 0.9
    assert all(set(look) == {"n", "stop_at"} for look in data["looks"])
    assert data == bayes(0.2, 0.35, 40, threshold=0.9).to_json()


@pytest.mark.parametrize(("args", "named"), [
    (["--p0", "0.3", "--p1", "0.2", "--n", "30"], "--p1"),
    (["--p0", "1.2", "--p1", "0.2", "--n", "30"], "--p0"),
    (["--p0", "0.1", "--p1", "0.3", "--n", "1"], "--n"),
    (["--p0", "0.1", "--p1", "0.3", "--n", "30", "--method", "obf"], "--method"),
    (["--p0", "0.1", "--p1", "0.3", "--n", "30", "--cp0", "0"], "--cp0"),
    (["--p0", "0.1", "--p1", "0.3", "--n", "30", "--method", "bayes", "--prior-b", "-1"], "--prior-b"),
])
def test_cli_rejects_bad_arguments_naming_them(args: list[str], named: str) -> None:
    result = runner.invoke(app, ["boundaries", *args])
    assert result.exit_code == 2
    assert named in result.output


# --- the Pocock search against a plain scan over every candidate alpha --------------------------

def scanned_pocock(p0: float, ns: list[int], cp0: float) -> tuple[float, list[int | None]]:
    """The largest nominal alpha (a tail probability of some look) whose boundary crosses with
    probability <= cp0 under p0, found by trying every candidate: what the bisection must find."""
    tails = sorted({float(binom.sf(b - 1, n, p0)) for n in ns for b in range(n + 2)})
    best: tuple[float, list[int | None]] = (0.0, [None] * len(ns))
    for alpha in (t for t in tails if 0 < t <= cp0):
        stop_at = [next((b for b in range(n + 1) if binom.sf(b - 1, n, p0) <= alpha), None) for n in ns]
        looks = [Look(n, s) for n, s in zip(ns, stop_at, strict=True)]
        if crossing_probabilities(looks, p0)[0] <= cp0 and alpha > best[0]:
            best = (alpha, stop_at)
    return best


def searched(p0: float, ns: list[int], cp0: float) -> tuple[float, list[int | None]]:
    b = pocock_at(p0, None, ns, cp0)
    return b.params["alpha"], [look.stop_at for look in b.looks]


@pytest.mark.parametrize(("p0", "ns", "cp0"), [
    (0.1, [5], 0.1), (0.2, [3, 6], 0.05), (0.3, [2, 4, 6, 8], 0.2), (0.15, list(range(1, 13)), 0.1),
    (0.05, [10, 20], 0.01), (0.4, [1, 2, 3], 0.5), (0.25, [4, 9, 15], 0.02),
])
def test_the_pocock_bisection_finds_what_a_scan_of_every_candidate_finds(p0, ns, cp0) -> None:
    alpha, stop_at = searched(p0, ns, cp0)
    expected_alpha, expected_stop_at = scanned_pocock(p0, ns, cp0)
    assert alpha == pytest.approx(expected_alpha, rel=1e-12) and stop_at == expected_stop_at


def test_the_pocock_search_takes_the_smallest_candidate_when_only_it_qualifies() -> None:
    # cp0 set to the crossing probability of the strictest boundary: only the first candidate fits.
    p0, ns = 0.2, [5, 10]
    smallest = min(t for n in ns for b in range(n + 2) if (t := float(binom.sf(b - 1, n, p0))) > 0)
    strictest = [next((b for b in range(n + 1) if binom.sf(b - 1, n, p0) <= smallest), None) for n in ns]
    cp0 = crossing_probabilities([Look(n, s) for n, s in zip(ns, strictest, strict=True)], p0)[0]

    assert searched(p0, ns, cp0) == scanned_pocock(p0, ns, cp0)
    assert searched(p0, ns, cp0)[0] == pytest.approx(smallest, rel=1e-12)


def test_the_pocock_search_never_stops_when_no_candidate_qualifies() -> None:
    p0, ns = 0.5, [2, 4]
    smallest = min(t for n in ns for b in range(n + 2) if (t := float(binom.sf(b - 1, n, p0))) > 0)
    b = pocock_at(p0, None, ns, smallest / 2)
    assert b.params["alpha"] == 0.0 and [look.stop_at for look in b.looks] == [None, None]
