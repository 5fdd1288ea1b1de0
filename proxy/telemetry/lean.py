"""Lean counter and histogram families for the series every request touches.

prometheus_client's ``Counter.inc`` and ``Histogram.observe`` take a thread lock
per value (two for an observation), check observability and validate exemplars
on every call: about a tenth of the sidecar's own CPU per request went there.
The four families the hot path updates per request (requests, request duration,
attempts, attempt duration) are these instead: children are plain Python
numbers, updated only on the event loop, and turned into the same samples
prometheus_client would expose (``_total``, ``_bucket`` with exemplars,
``_count``, ``_sum``) when the registry is scraped.  Like every family of the
sidecar (``outrigger run`` turns them off in prometheus_client), they have no
``_created`` series: a counter's start is its process's start.
``/metrics`` is served on the same event loop, so no update is ever half seen.

They are registered on the sidecar's registry like any collector; the other
families stay prometheus_client's own.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Final, Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from proxy.telemetry.live import LiveStats

__all__ = ["LeanCounter", "LeanCounterFamily", "LeanHistogram", "LeanHistogramFamily"]

Child = TypeVar("Child")


class LeanCounter:
    """One counter series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class LeanHistogram:
    """One histogram series: a count per bucket (not cumulative; summed at scrape), sum and exemplars."""

    __slots__ = ("_bounds", "counts", "exemplars", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self._bounds = bounds  # upper bounds, ascending, ending with +Inf
        self.counts = [0.0] * len(bounds)
        self.exemplars: list[Exemplar | None] = [None] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        index = bisect_left(self._bounds, amount)  # the first bucket whose bound is >= amount (`le`)
        self.counts[index] += 1
        self.sum += amount
        if exemplar:
            self.exemplars[index] = Exemplar(exemplar, amount, time.time())


Series = tuple[LeanCounter, LeanHistogram]
_MAX_CACHED: Final = 1024


class RequestSeries:
    """What one request adds to its route's metrics: the live figures, then the counter and the
    duration histogram of its (method, status, outcome), bound by ``bind`` on first use.

    Here rather than in ``metrics.RouteMetrics`` because this module is compiled: the call runs
    on every request. ``bind`` also says whether the series may be cached (made-up methods are
    not); at most ``_MAX_CACHED`` are.
    """

    __slots__ = ("_bind", "_cache", "_live")

    def __init__(self, live: LiveStats, bind: Callable[[str, int, str], tuple[Series, bool]]) -> None:
        self._live = live
        self._bind = bind
        self._cache: dict[tuple[str, int, str], Series] = {}

    def done(self, method: str, status: int, outcome: str, seconds: float,
             exemplar: dict[str, str] | None = None) -> None:
        self._live.done(status, seconds)
        key = (method, status, outcome)
        series = self._cache.get(key)
        if series is None:
            series, cacheable = self._bind(method, status, outcome)
            if cacheable and len(self._cache) < _MAX_CACHED:
                self._cache[key] = series
        series[0].inc()
        series[1].observe(seconds, exemplar)

    def cached(self) -> list[Series]:
        return list(self._cache.values())


class _Family(Collector, Generic[Child]):
    """Children by label values; the subclass says how a child is made and rendered."""

    _type = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> Child:
        raise NotImplementedError

    def labels(self, *values: str, **named: str) -> Child:
        key = self._key(values, named)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def remove(self, *values: str) -> None:
        self._children.pop(self._key(values, {}), None)

    def _key(self, values: tuple[str, ...], named: dict[str, str]) -> tuple[str, ...]:
        if named:
            if values:
                raise ValueError("label values are given either by position or by name, not both")
            if set(named) != set(self.labelnames):
                raise ValueError(f"{self.name}: labels {sorted(named)} are not {sorted(self.labelnames)}")
            return tuple(str(named[name]) for name in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(values)} label values for {len(self.labelnames)} labels")
        return tuple(str(value) for value in values)

    def _metric(self) -> Metric:
        return Metric(self.name, self.documentation, self._type)

    def describe(self) -> list[Metric]:
        return [self._metric()]


class LeanCounterFamily(_Family[LeanCounter]):
    """A labelled counter family exposed as ``<name>_total``."""

    _type = "counter"

    def _new_child(self) -> LeanCounter:
        return LeanCounter()

    def collect(self) -> Iterator[Metric]:
        metric = self._metric()
        for key, child in list(self._children.items()):
            metric.add_sample(self.name + "_total", dict(zip(self.labelnames, key, strict=True)), child.value)
        yield metric


class LeanHistogramFamily(_Family[LeanHistogram]):
    """A labelled histogram family with fixed buckets (+Inf added), exemplars on buckets."""

    _type = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None, *, buckets: Sequence[float]) -> None:
        super().__init__(name, documentation, labelnames, registry)
        bounds = [float(bound) for bound in buckets]
        if bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets not in ascending order")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = bounds
        self._le: list[str] = [floatToGoString(bound) for bound in bounds]  # type: ignore[no-untyped-call]

    def _new_child(self) -> LeanHistogram:
        return LeanHistogram(self._bounds)

    def collect(self) -> Iterator[Metric]:
        metric = self._metric()
        for key, child in list(self._children.items()):
            labels = dict(zip(self.labelnames, key, strict=True))
            total = 0.0
            for le, count, exemplar in zip(self._le, child.counts, child.exemplars, strict=True):
                total += count
                metric.add_sample(self.name + "_bucket", {**labels, "le": le}, total, None, exemplar)
            metric.add_sample(self.name + "_count", labels, total)
            if self._bounds[0] >= 0:
                metric.add_sample(self.name + "_sum", labels, child.sum)
        yield metric
