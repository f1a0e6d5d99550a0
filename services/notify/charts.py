"""The digest's figures as PNG bytes: survival by arm, aGVHD cumulative incidence, rule boundaries.

Rendered with matplotlib's object API on the Agg canvas, never through ``pyplot``: pyplot keeps a
global figure registry and an interactive backend choice, both wrong for a long-running service
(matplotlib's "Embedding in a web application server" advice). Every function draws a "no data
yet" figure instead of failing when there is nothing to plot.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from services.notify.competing_risks import READ_OUT_DAY
from services.notify.labels import ENDPOINT_LABELS, arm_label
from services.notify.summary import RuleSnapshot, Summary
from services.notify.survival import Curve, step_value

ARM_COLOURS = {"blinatumomab_dli": "#1f5fa8", "usual_care": "#c0392b"}
OTHER_COLOURS = ("#2e8b57", "#8e44ad", "#d68910")
SIZE = (7.0, 4.6)


@dataclass(frozen=True)
class Chart:
    key: str  # stable name, used for the Content-ID and the file name
    title: str
    png: bytes


def summary_charts(summary: Summary) -> tuple[Chart, ...]:
    survival = tuple(
        Chart(f"km_{e}", f"{ENDPOINT_LABELS[e]} by arm", survival_chart(e, curves))
        for e, curves in summary.survival_curves.items()
    )
    agvhd = Chart("agvhd_cif", "Cumulative incidence of acute GVHD", cumulative_incidence_chart(summary.agvhd_curves))
    rules = tuple(Chart(f"rule_{r.rule_id}", r.title, boundary_chart(r)) for r in summary.stopping_rules)
    return (*survival, agvhd, *rules)


def survival_chart(endpoint: str, curves: Sequence[Curve]) -> bytes:
    title = f"{ENDPOINT_LABELS.get(endpoint, endpoint)} (Kaplan-Meier, 95% log-log CI)"
    if not curves:
        return no_data_chart(title)
    fig, ax = _figure(title, bottom=0.2 + 0.06 * len(curves), left=0.2)
    _steps(ax, curves, shade=True)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("Probability")
    _at_risk_table(ax, curves, origin="first blinatumomab dose (usual care: enrolment)")
    return _png(fig)


def cumulative_incidence_chart(curves: Sequence[Curve]) -> bytes:
    title = "Acute GVHD after DLI (Aalen-Johansen, death as competing risk)"
    if not curves:
        return no_data_chart(title)
    fig, ax = _figure(title, bottom=0.2 + 0.06 * len(curves), left=0.2)
    _steps(ax, curves, shade=False)
    ax.axvline(READ_OUT_DAY, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("Cumulative incidence")
    _at_risk_table(ax, curves, origin="DLI")
    return _png(fig)


def boundary_chart(rule: RuleSnapshot) -> bytes:
    """The boundary as one stair per look (a gap where no count stops), the stop region above it."""
    fig, ax = _figure(rule.title, bottom=0.12)
    if rule.looks:
        ns = [float(n) for n, _ in rule.looks]
        stops = [math.nan if s is None else float(s) for _, s in rule.looks]
        gaps = [b - a for a, b in zip(ns, ns[1:])] or [1.0]
        edges = [ns[0] - gaps[0] / 2, *((a + b) / 2 for a, b in zip(ns, ns[1:])), ns[-1] + gaps[-1] / 2]
        top = max([rule.events, *(s for s in stops if not math.isnan(s))]) + 1
        ax.stairs(stops, edges, baseline=top, fill=True, color="#c0392b", alpha=0.08, label="Stop region")
        ax.stairs(stops, edges, baseline=None, color="#444444", linewidth=1.8, label="Stopping boundary (events that stop)")
        ax.set_ylim(0, top)
    colour = "#c0392b" if rule.crossed else "#1f5fa8"
    if rule.path:  # the trial's own path, look by look: where it crossed, if it did
        ax.step(range(0, len(rule.path) + 1), [0, *rule.path], where="post", color=colour, linewidth=1.2,
                alpha=0.7, label="Events among the first n evaluable")
    if rule.crossed_at_look is not None and rule.events_at_crossing is not None:
        ax.plot([rule.crossed_at_look], [rule.events_at_crossing], "X", color="#c0392b", markersize=10,
                label=f"Crossed at {rule.events_at_crossing} / {rule.crossed_at_look}")
    status = "crossed" if rule.crossed else "not crossed"
    ax.plot([rule.evaluable], [rule.events], "o", color=colour, markersize=8,
            label=f"Now: {rule.events} / {rule.evaluable} evaluable ({status})")
    ax.set_xlabel("Evaluable patients")
    ax.set_ylabel("Patients with the event")
    ax.set_xlim(0, max([rule.evaluable, *(n for n, _ in rule.looks)]) + 1)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return _png(fig)


def no_data_chart(title: str) -> bytes:
    fig, ax = _figure(title, bottom=0.12)
    ax.text(0.5, 0.5, "No data yet", ha="center", va="center", fontsize=16, color="grey",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(fig)


def _figure(title: str, *, bottom: float, left: float = 0.1) -> tuple[Figure, Axes]:
    fig = Figure(figsize=SIZE, dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    fig.subplots_adjust(left=left, right=0.97, top=0.92, bottom=bottom)
    ax.set_title(title, fontsize=10)
    return fig, ax


def _colour(arm: str, index: int) -> str:
    return ARM_COLOURS.get(arm, OTHER_COLOURS[index % len(OTHER_COLOURS)])


def _steps(ax: Axes, curves: Sequence[Curve], *, shade: bool) -> None:
    for index, curve in enumerate(curves):
        colour = _colour(curve.arm, index)
        ax.step(curve.times, curve.values, where="post", color=colour,
                label=f"{arm_label(curve.arm)} (n={len(curve.durations)})")
        if shade:
            ax.fill_between(curve.times, curve.lower, curve.upper, step="post", color=colour, alpha=0.15)
        marks = [step_value(curve.times, curve.values, t) for t in curve.censored]
        ax.plot(curve.censored, marks, "|", color=colour, markersize=8)
    end = max(max(c.durations) for c in curves)
    ax.set_xlim(0, max(end, 1) * 1.03)
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)


def _at_risk_table(ax: Axes, curves: Sequence[Curve], origin: str) -> None:
    """Numbers at risk at each x tick, one row per arm, under the axis (as in a published KM plot)."""
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    ax.set_xlabel(f"Days from {origin}", labelpad=2)
    transform = ax.get_xaxis_transform()  # x in data, y in axes fraction
    ax.text(low, -0.2, "At risk", transform=transform, fontsize=8, fontweight="bold", ha="right")
    for row, curve in enumerate(curves):
        y = -0.27 - 0.08 * row
        ax.text(low, y, arm_label(curve.arm) + "  ", transform=transform, fontsize=7, ha="right",
                color=_colour(curve.arm, row))
        for tick in ticks:
            ax.text(tick, y, str(curve.at_risk(tick)), transform=transform, fontsize=7, ha="center")


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
