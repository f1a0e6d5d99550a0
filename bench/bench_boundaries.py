"""Time boundary construction with a cold cache: ``.venv/bin/python bench/bench_boundaries.py``."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.clinical import boundaries  # noqa: E402

DESIGNS = {"pocock": lambda n: boundaries.pocock(0.2, 0.35, n, cp0=0.1, looks=1),
           "bayes": lambda n: boundaries.bayes(0.2, 0.35, n, looks=1)}


def cold_seconds(build, n: int, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        boundaries.clear_caches()
        start = time.perf_counter()
        build(n)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    DESIGNS["pocock"](10)  # import-time warm-up of scipy, not part of any timing
    print(f"{'method':<8} | {'N':>4} | {'seconds':>8}")
    print(f"{'-' * 8}-+-{'-' * 4}-+-{'-' * 8}")
    for method, build in DESIGNS.items():
        for n in (50, 100, 200, 500):
            print(f"{method:<8} | {n:>4} | {cold_seconds(build, n):8.4f}")


if __name__ == "__main__":
    main()
