"""A stopping rule's chart as inline SVG: the boundary (least events that stop, per patients
evaluated) as a step line over the shaded stopping region, and the trial's events path.

The notify service draws the digest's PNG charts; services never import each other, so the page
draws its own from the rule's public data. No script, no external file: it prints and zooms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 520, 330, 52, 16, 14, 48  # font 16: ~10 px on a phone


@dataclass(frozen=True)
class Scale:
    n_max: int
    y_max: int

    def x(self, n: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * n / max(self.n_max, 1)

    def y(self, events: float) -> float:
        return HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * events / max(self.y_max, 1)


def _ticks(top: int, count: int = 5) -> list[int]:
    step = max(1, -(-top // count))
    return list(range(0, top + 1, step))


def boundary_svg(boundary: Sequence[dict[str, int | None]], path: Sequence[int], *, title: str, crossed: bool) -> str:
    """``boundary``: [{"n", "stop_at"}] per look; ``path``: events among the first n evaluable patients."""
    looks = [(int(b["n"] or 0), b["stop_at"]) for b in boundary]
    n_max = max([n for n, _ in looks] + [len(path), 1])
    y_max = max([s for _, s in looks if s is not None] + list(path) + [1])
    s = Scale(n_max, y_max)
    parts = [f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="t-{id(s)}" class="chart" '
             f'xmlns="http://www.w3.org/2000/svg" font-size="16" font-family="sans-serif">',
             f'<title id="t-{id(s)}">{_escape(title)}</title>',
             f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
             'fill="#fff" stroke="#888"/>']
    for n in _ticks(n_max):
        parts.append(f'<text x="{s.x(n):.1f}" y="{HEIGHT - BOTTOM + 19}" text-anchor="middle">{n}</text>')
    for e in _ticks(y_max):
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{s.y(e):.1f}" y2="{s.y(e):.1f}" stroke="#e3e3e3"/>'
                     f'<text x="{LEFT - 6}" y="{s.y(e) + 5:.1f}" text-anchor="end">{e}</text>')
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" text-anchor="middle">patients evaluated</text>')
    parts.append(f'<text x="16" y="{(TOP + HEIGHT - BOTTOM) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 16 {(TOP + HEIGHT - BOTTOM) / 2})">events</text>')
    steps = _boundary_steps(looks, s)
    if steps:
        region = steps + [(steps[-1][0], TOP), (steps[0][0], TOP)]
        parts.append(f'<polygon points="{_points(region)}" fill="#c0392b" fill-opacity="0.12"/>')
        parts.append(f'<polyline points="{_points(steps)}" fill="none" stroke="#c0392b" stroke-width="2.5"/>')
    if path:
        trail, before = [(s.x(0), s.y(0))], 0
        for n, events in enumerate(path, start=1):  # a count: flat, then up at the patient who had the event
            trail += [(s.x(n), s.y(before)), (s.x(n), s.y(events))]
            before = events
        colour = "#c0392b" if crossed else "#1f5fa8"
        parts.append(f'<polyline points="{_points(trail)}" fill="none" stroke="{colour}" stroke-width="2.5" '
                     'stroke-dasharray="6 3"/>')
        parts.append(f'<circle cx="{trail[-1][0]:.1f}" cy="{trail[-1][1]:.1f}" r="5" fill="{colour}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _boundary_steps(looks: list[tuple[int, int | None]], s: Scale) -> list[tuple[float, float]]:
    """From each look's n to the next, the level at which the trial stops."""
    points: list[tuple[float, float]] = []
    stopping = [(n, stop) for n, stop in looks if stop is not None]
    for i, (n, stop) in enumerate(stopping):
        end = stopping[i + 1][0] if i + 1 < len(stopping) else n
        points += [(s.x(n), s.y(stop - 0.5)), (s.x(end), s.y(stop - 0.5))]
    return points


def _points(points: Sequence[tuple[float, float]]) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in points)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
