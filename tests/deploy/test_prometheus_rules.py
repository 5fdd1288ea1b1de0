"""deploy/prometheus/alerts.yaml: checked and unit-tested with the real promtool."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yaml"
ALERT_TESTS = PROMETHEUS / "alerts_test.yaml"


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    proc = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_unit_tests_pass_so_each_alert_fires_on_its_failure(promtool: str) -> None:
    proc = subprocess.run(
        [promtool, "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROMETHEUS,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for group in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in rules()} == tested


def test_required_alerts_watch_the_documented_signals() -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    breaker = by_name["OutriggerCircuitBreakerOpen"]
    assert 'outrigger_circuit_breaker_state{state="open"}' in breaker["expr"]
    assert breaker["for"] == "1m"
    errors = by_name["OutriggerHighErrorRatio"]["expr"]
    assert 'outcome!="upstream"' in errors and 'code="5xx"' in errors and "0.05" in errors
    assert "increase(outrigger_retry_budget_exhausted_total" in by_name["OutriggerRetryBudgetExhausted"]["expr"]
    latency = by_name["OutriggerLatencyP99AboveSLO"]["expr"]
    assert "histogram_quantile(0.99" in latency and "outrigger_request_duration_seconds_bucket" in latency
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_expressions_use_only_public_metrics_and_labels(
    check_promql: Callable[[str], list[str]],
) -> None:
    problems = {rule["alert"]: check_promql(rule["expr"]) for rule in rules()}
    assert not {name: found for name, found in problems.items() if found}
