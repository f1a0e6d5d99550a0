"""The stopping-rules page draws each rule's boundary and events path as inline SVG."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from services.ingest.web.chart_svg import Scale, boundary_svg
from services.ingest.web.review import boundary_ranges

SVG = "{http://www.w3.org/2000/svg}"
BOUNDARY = [{"n": 1, "stop_at": None}, {"n": 2, "stop_at": 2}, {"n": 3, "stop_at": 2}, {"n": 4, "stop_at": 3}]


def test_the_boundary_and_the_events_path_are_drawn_with_a_title() -> None:
    svg = ET.fromstring(boundary_svg(BOUNDARY, [0, 1, 2], title="CRS <3> & more", crossed=True))
    assert svg.find(f"{SVG}title").text == "CRS <3> & more"  # type: ignore[union-attr]
    boundary, path = svg.findall(f"{SVG}polyline")
    scale = Scale(n_max=4, y_max=3)
    first = [float(v) for v in re.split("[ ,]", boundary.get("points", ""))[:2]]
    assert first == [round(scale.x(2), 1), round(scale.y(1.5), 1)]  # stops from 2 events at 2 patients
    last = [float(v) for v in re.split("[ ,]", path.get("points", ""))[-2:]]
    assert last == [round(scale.x(3), 1), round(scale.y(2), 1)]  # 2 events in 3 patients
    assert path.get("stroke") == "#c0392b"  # crossed: drawn in the boundary's colour


def test_no_patients_yet_draws_the_boundary_alone() -> None:
    svg = ET.fromstring(boundary_svg(BOUNDARY, [], title="t", crossed=False))
    assert len(svg.findall(f"{SVG}polyline")) == 1


def test_the_table_groups_looks_with_the_same_stopping_count() -> None:
    assert boundary_ranges(BOUNDARY) == [{"first": 1, "last": 1, "stop_at": None},
                                         {"first": 2, "last": 3, "stop_at": 2},
                                         {"first": 4, "last": 4, "stop_at": 3}]
