"""Cost per insert and per quantile of the latency sketch, beside the library sketches if installed.

    python -m tests.bench.sketch_cost            # ours; ddsketch / fastdigest when importable

docs/adaptive.md quotes its figures (why the sketch is a small log-bucket histogram).
"""

from __future__ import annotations

import random
import timeit
from collections.abc import Callable

from proxy.clock import SystemClock
from proxy.policies.latency import LatencySketch

N = 200_000


def measure(name: str, add: Callable[[float], None], quantile: Callable[[], object]) -> None:
    rng = random.Random(1)
    values = [rng.lognormvariate(-4.5, 0.6) for _ in range(N)]
    def insert_all() -> None:
        for v in values:
            add(v)

    per_insert = timeit.timeit(insert_all, number=1) / N * 1e9
    per_query = timeit.timeit(quantile, number=200) / 200 * 1e6
    print(f"{name:<34} insert {per_insert:7.0f} ns   quantile {per_query:8.1f} us")


def main() -> None:
    sketch = LatencySketch(30.0, SystemClock())
    def uncached() -> object:
        sketch._cache.clear()
        return sketch.quantile(99)

    measure("outrigger LatencySketch", sketch.add, uncached)
    cached = LatencySketch(30.0, SystemClock())
    measure("outrigger LatencySketch (cached)", cached.add, lambda: cached.quantile(99))
    try:
        from ddsketch import DDSketch  # type: ignore[import-not-found]
        dd = DDSketch(relative_accuracy=0.01)
        measure("ddsketch.DDSketch (no window)", dd.add, lambda: dd.get_quantile_value(0.99))
    except ImportError:
        print("ddsketch not installed")
    try:
        from fastdigest import TDigest  # type: ignore[import-not-found]
        td = TDigest()
        measure("fastdigest.TDigest (one at a time)", td.update, lambda: td.quantile(0.99))
    except ImportError:
        print("fastdigest not installed")


if __name__ == "__main__":
    main()
