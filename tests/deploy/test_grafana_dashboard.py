"""deploy/grafana/outrigger-dashboard.json: importable, and every query is real PromQL
over metrics Outrigger exports."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "outrigger-dashboard.json"
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$job": ".*",
    "$route": ".*",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> dict[str, str]:
    return {
        f"{panel['id']}_{target['refId']}": target["expr"]
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    }


def expand(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unexpanded Grafana variable in {expr!r}"
    return expr


def find(dashboard: dict[str, Any], predicate: Callable[[dict[str, Any], str], bool]) -> list[dict[str, Any]]:
    return [
        panel
        for panel in panels(dashboard)
        if any(predicate(panel, target["expr"]) for target in panel.get("targets", []))
    ]


def test_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "outrigger"
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None, "a fixed id breaks import into another Grafana"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_every_query_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    """No hard-coded datasource uid: the dashboard works in any Grafana, provisioned or imported."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_query_parses_with_promtool(
    dashboard: dict[str, Any], promtool_parses: Callable[[dict[str, str]], None]
) -> None:
    promtool_parses({key: expand(expr) for key, expr in queries(dashboard).items()})


def test_every_query_uses_only_public_metrics_and_labels(
    dashboard: dict[str, Any], check_promql: Callable[[str], list[str]]
) -> None:
    problems = {key: check_promql(expr) for key, expr in queries(dashboard).items()}
    assert not {key: found for key, found in problems.items() if found}


def test_template_variables_query_public_labels(
    dashboard: dict[str, Any], public_series: dict[str, frozenset[str]]
) -> None:
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((\w+)(?:\{[^}]*\})?,\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["name"]
        metric, label = match.groups()
        assert label in public_series[metric] | {"job", "namespace"}, variable["name"]


def test_required_panels_exist(dashboard: dict[str, Any]) -> None:
    def uses(*needles: str) -> Callable[[dict[str, Any], str], bool]:
        return lambda panel, expr: all(n in expr for n in needles)

    assert find(dashboard, uses("sum by (route)", "rate(outrigger_requests_total"))
    assert find(dashboard, uses('outcome!="upstream"', 'code="5xx"', "/"))
    for quantile in ("0.50", "0.99"):
        assert find(dashboard, uses(f"histogram_quantile({quantile}", "outrigger_request_duration_seconds_bucket"))
    assert find(dashboard, uses("outrigger_retries_total"))
    assert find(dashboard, uses("outrigger_retry_budget_exhausted_total"))
    assert find(dashboard, uses("outrigger_rate_limited_total"))
    assert find(dashboard, uses("rate(outrigger_upstream_attempts_total", "/", "rate(outrigger_requests_total"))
    timelines = find(dashboard, lambda p, e: p["type"] == "state-timeline" and "outrigger_circuit_breaker_state" in e)
    assert timelines, "breaker state needs a state-timeline panel"
    mappings = timelines[0]["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {m["text"] for m in mappings.values()} == {"closed", "open", "half_open"}


def test_latency_panel_shows_exemplars(dashboard: dict[str, Any]) -> None:
    """Exemplars are what links a latency spike to the trace of a slow request."""
    latency = find(dashboard, lambda p, e: "outrigger_request_duration_seconds_bucket" in e)
    assert any(target.get("exemplar") is True for panel in latency for target in panel["targets"])
