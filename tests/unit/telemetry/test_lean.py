"""The lean families expose exactly what prometheus_client's Counter and Histogram would, less the
``_created`` series the sidecar turns off."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from proxy.telemetry.lean import LeanCounterFamily, LeanHistogramFamily

BUCKETS = (0.001, 0.01, 0.1, 1.0)
OBSERVED = [0.0, 0.001, 0.0010001, 0.05, 0.1, 0.7, 1.0, 3.0, 1e9]


def _without_created(text: str) -> str:
    """Exposition text without the _created samples, whose timestamps differ by construction."""
    return "\n".join(line for line in text.splitlines() if not re.search(r"_created[{ ]", line))


def _pair() -> tuple[CollectorRegistry, CollectorRegistry]:
    return CollectorRegistry(), CollectorRegistry()


@pytest.mark.parametrize("render", [generate_latest, openmetrics_latest])
def test_a_lean_counter_renders_as_a_prometheus_client_counter(render: object) -> None:
    ours, theirs = _pair()
    lean = LeanCounterFamily("x_requests", "Requests.", ["route", "code"], ours)
    stock = Counter("x_requests", "Requests.", ["route", "code"], registry=theirs)
    for route, code, amount in [("a", "2xx", 1), ("a", "5xx", 2), ("b", "2xx", 0.5), ("a", "2xx", 3)]:
        lean.labels(route=route, code=code).inc(amount)
        stock.labels(route=route, code=code).inc(amount)
    ours_text, theirs_text = render(ours).decode(), render(theirs).decode()  # type: ignore[operator]
    assert "_created" not in ours_text
    assert _without_created(ours_text) == _without_created(theirs_text)


@pytest.mark.parametrize("render", [generate_latest, openmetrics_latest])
def test_a_lean_histogram_renders_as_a_prometheus_client_histogram_exemplars_included(render: object) -> None:
    ours, theirs = _pair()
    lean = LeanHistogramFamily("x_seconds", "Durations.", ["route"], ours, buckets=BUCKETS)
    stock = Histogram("x_seconds", "Durations.", ["route"], buckets=BUCKETS, registry=theirs)
    for n, value in enumerate(OBSERVED):
        exemplar = {"trace_id": f"{n:032x}"} if n % 3 == 0 else None
        lean.labels("r").observe(value, exemplar)
        stock.labels("r").observe(value, exemplar)
    ours_text, theirs_text = render(ours).decode(), render(theirs).decode()  # type: ignore[operator]
    # Exemplar timestamps differ too: compare them as present, not by value.
    strip = re.compile(r"( # \{[^}]*\} \S+) \d+\.\d+")
    assert "_created" not in ours_text
    assert strip.sub(r"\1", _without_created(ours_text)) == strip.sub(r"\1", _without_created(theirs_text))


def test_labels_by_position_and_by_name_give_the_same_child_and_remove_drops_it() -> None:
    registry = CollectorRegistry()
    family = LeanCounterFamily("x", "X.", ["a", "b"], registry)
    assert family.labels("1", "2") is family.labels(a="1", b="2")
    family.labels("1", "2").inc()
    assert registry.get_sample_value("x_total", {"a": "1", "b": "2"}) == 1
    family.remove("1", "2")
    assert registry.get_sample_value("x_total", {"a": "1", "b": "2"}) is None


@pytest.mark.parametrize(("args", "kwargs"), [(("1",), {}), ((), {"a": "1"}), (("1", "2"), {"a": "1"})])
def test_wrong_label_values_are_refused(args: tuple[str, ...], kwargs: dict[str, str]) -> None:
    family = LeanCounterFamily("x", "X.", ["a", "b"], None)
    with pytest.raises(ValueError):
        family.labels(*args, **kwargs)


def test_a_counter_never_goes_down() -> None:
    with pytest.raises(ValueError):
        LeanCounterFamily("x", "X.", [], None).labels().inc(-1)
