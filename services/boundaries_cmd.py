"""``trialwatch boundaries``: print a stopping boundary and its operating characteristics."""

from __future__ import annotations

import json
from itertools import accumulate

import typer

from shared.clinical.boundaries import Boundary, InvalidDesign, Look, bayes, pocock, stop_probabilities

OPTION_OF = {"p0": "--p0", "p1": "--p1", "n_max": "--n", "cp0": "--cp0", "looks": "--looks",
             "prior_a": "--prior-a", "prior_b": "--prior-b", "threshold": "--threshold"}
TITLE = {"pocock": "Pocock-type boundary (Ivanova, Qaqish & Schell 2005)",
         "bayes": "Beta-binomial posterior boundary (Thall, Simon & Estey 1995, fixed limit p0)"}


def boundaries(
    p0: float = typer.Option(..., "--p0", help="Acceptable event rate."),
    p1: float = typer.Option(..., "--p1", help="Unacceptable event rate (above p0)."),
    n: int = typer.Option(..., "--n", help="Maximum number of evaluable patients."),
    method: str = typer.Option("pocock", "--method", help="pocock or bayes."),
    cp0: float = typer.Option(0.1, "--cp0", help="pocock: allowed P(stop) when the rate is p0."),
    looks: int = typer.Option(1, "--looks", help="Patients per look."),
    prior_a: float = typer.Option(1.0, "--prior-a", help="bayes: Beta prior a."),
    prior_b: float = typer.Option(1.0, "--prior-b", help="bayes: Beta prior b."),
    threshold: float = typer.Option(0.95, "--threshold", help="bayes: stop if P(rate > p0) exceeds it."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Print a stopping boundary table and its operating characteristics."""
    try:
        if method == "pocock":
            boundary = pocock(p0, p1, n, cp0=cp0, looks=looks)
        elif method == "bayes":
            boundary = bayes(p0, p1, n, prior_a=prior_a, prior_b=prior_b, threshold=threshold,
                             looks=looks)
        else:
            raise typer.BadParameter(f"must be pocock or bayes, got {method!r}", param_hint="--method")
    except InvalidDesign as exc:
        message = str(exc).removeprefix(f"{exc.argument}: ")
        raise typer.BadParameter(message, param_hint=OPTION_OF.get(exc.argument, exc.argument)) from exc
    typer.echo(json.dumps(boundary.to_json()) if as_json else render(boundary))


def render(boundary: Boundary) -> str:
    """Header, one row per run of consecutive patients with the same boundary, then the OCs."""
    params = "   ".join(f"{k} = {_fmt(v)}" for k, v in boundary.params.items())
    p0, p1 = boundary.params["p0"], boundary.params["p1"]
    lines = [TITLE.get(boundary.method, boundary.method), f"  {params}",
             "  Stop as soon as the events among n evaluable patients reach 'stop at'",
             "  (clinfun's boundary + 1; '-' = no count stops yet).", "",
             f"  {'n':>9}  {'stop at':>7}  {'P(stopped by n | p0)':>20}  {'P(stopped by n | p1)':>20}"]
    by_p0 = list(accumulate(stop_probabilities(boundary.looks, p0)))
    by_p1 = list(accumulate(stop_probabilities(boundary.looks, p1))) if p1 is not None else None
    for first, last in _runs(boundary.looks):
        label = str(boundary.looks[first].n) if first == last else \
            f"{boundary.looks[first].n}-{boundary.looks[last].n}"
        stop = boundary.looks[last].stop_at
        cum1 = f"{by_p1[last]:20.4f}" if by_p1 is not None else f"{'':20}"
        lines.append(f"  {label:>9}  {'-' if stop is None else stop:>7}  {by_p0[last]:20.4f}  {cum1}")
    lines += ["", "Operating characteristics", f"  {'true rate':>12}  {'P(stop)':>8}  {'expected N':>10}",
              f"  {'p0 = ' + _fmt(p0):>12}  {boundary.p_stop_p0:8.4f}  {boundary.expected_n_p0:10.1f}"]
    if p1 is not None and boundary.p_stop_p1 is not None and boundary.expected_n_p1 is not None:
        lines.append(f"  {'p1 = ' + _fmt(p1):>12}  {boundary.p_stop_p1:8.4f}  {boundary.expected_n_p1:10.1f}")
    return "\n".join(lines)


def _runs(looks: tuple[Look, ...]) -> list[tuple[int, int]]:
    """Index ranges of looks one patient apart that share a boundary (clinfun's "r/n" compression)."""
    runs: list[tuple[int, int]] = []
    for i, look in enumerate(looks):
        if runs and look.stop_at == looks[i - 1].stop_at and look.n == looks[i - 1].n + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
