"""The benchmark's Outrigger configs load, and each measures what its target's label says (no load run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.loader import load_config_file
from proxy.config.types import Config
from tests.bench.bench import TARGETS, Target, render

_OUTRIGGER = [t for t in TARGETS if t.kind == "outrigger"]


def _load(target: Target, tmp_path: Path) -> Config:
    values = {"port": 18_001, "upstream_port": 18_002, "admin_port": 18_003, "otlp_port": 18_004,
              "otlp_protocol": "http/protobuf", "sample_ratio": target.sample_ratio}
    path = tmp_path / f"{target.key}.yaml"
    path.write_text(render(target.template, values))
    return load_config_file(str(path), env={})


@pytest.mark.parametrize("target", _OUTRIGGER, ids=lambda t: t.key)
def test_every_outrigger_target_renders_a_config_the_sidecar_accepts(target: Target, tmp_path: Path) -> None:
    config = _load(target, tmp_path)
    assert config.listeners[0].address == "127.0.0.1:18001"
    assert config.upstreams["bench"].url == "http://127.0.0.1:18002"


@pytest.mark.parametrize("key", ["outrigger-1", "outrigger-100"])
def test_the_all_policies_targets_run_every_policy_and_trace_at_their_ratio(key: str, tmp_path: Path) -> None:
    target = next(t for t in TARGETS if t.key == key)
    config = _load(target, tmp_path)
    route = config.listeners[0].routes[0]
    assert route.retry.max_attempts == 3 and route.circuit_breaker.enabled and route.rate_limit is not None
    assert config.telemetry.tracing.enabled and config.telemetry.tracing.sample_ratio == target.sample_ratio
    assert config.telemetry.access_log.enabled


def test_the_core_target_has_every_optional_feature_off(tmp_path: Path) -> None:
    config = _load(next(t for t in TARGETS if t.key == "outrigger-core"), tmp_path)
    route = config.listeners[0].routes[0]
    assert route.retry.max_attempts == 1
    assert not route.circuit_breaker.enabled and route.rate_limit is None
    upstream = config.upstreams["bench"]
    assert upstream.circuit_breaker is not None and not upstream.circuit_breaker.enabled
    assert not config.telemetry.tracing.enabled and not config.telemetry.access_log.enabled
    assert (route.timeout.attempt, route.timeout.total) == (2.0, 5.0)  # the same timeouts as outrigger-1
