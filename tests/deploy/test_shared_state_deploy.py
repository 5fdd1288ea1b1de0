"""Redis for the shared-state features in the deploy artefacts: the compose stack wires it to the sidecar,
the Kubernetes example ships a valid minimal Redis, the dashboard and alerts watch the limit's mode."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import load_config_file
from tests.deploy.test_kubernetes_manifests import NATIVE_SIDECAR_VERSION, Render, one, validate

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose"
REDIS_K8S = REPO / "deploy" / "kubernetes" / "redis"


@pytest.fixture(scope="module")
def model(compose_cli: list[str]) -> dict[str, Any]:
    proc = subprocess.run([*compose_cli, "-f", str(COMPOSE / "docker-compose.yaml"), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded: dict[str, Any] = json.loads(proc.stdout)
    return loaded


def test_compose_runs_redis_and_the_sidecar_waits_for_it(model: dict[str, Any]) -> None:
    redis = model["services"]["redis"]
    assert redis["read_only"] is True and redis["cap_drop"] == ["ALL"]
    assert "6379" in [str(p) for p in redis["expose"]]
    assert model["services"]["outrigger"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_sidecar_config_uses_the_redis_service_for_a_global_limit(tmp_path: Path) -> None:
    # The spool directory exists in the image; here a temporary one stands in for it.
    config = load_config_file(str(COMPOSE / "outrigger.yaml"), env={"OUTRIGGER_DEAD_LETTER_DIR": str(tmp_path)})
    assert config.redis is not None
    url = urlsplit(config.redis.url)
    assert (url.scheme, url.hostname, url.port or 6379) == ("redis", "redis", 6379)
    limits = [r.rate_limit for lst in config.listeners for r in lst.routes if r.rate_limit is not None]
    assert any(limit.scope == "global" for limit in limits)


def test_kubernetes_redis_example_validates_and_its_service_selects_its_pod(render: Render) -> None:
    objects = render(REDIS_K8S)
    for obj in objects:
        validate(obj, NATIVE_SIDECAR_VERSION)
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["metadata"]["name"] == "outrigger-redis" and service["spec"]["ports"][0]["port"] == 6379
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_dashboard_shows_limit_mode_and_store_errors() -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "outrigger-dashboard.json").read_text())
    exprs = {panel["title"]: " ".join(t["expr"] for t in panel.get("targets", [])) for panel in dashboard["panels"]}
    mode = next(p for p in dashboard["panels"] if "outrigger_rate_limit_mode" in exprs[p["title"]])
    assert mode["type"] == "state-timeline"
    assert {m["text"] for m in mode["fieldConfig"]["defaults"]["mappings"][0]["options"].values()} == {
        "global", "local_fallback", "open", "closed"}
    assert any("outrigger_rate_limit_store_errors_total" in expr for expr in exprs.values())
    assert any("outrigger_idempotency_total" in expr for expr in exprs.values())


def test_an_alert_fires_when_a_limit_is_in_fallback_for_five_minutes() -> None:
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yaml").read_text())["groups"][0]["rules"]
    alert = next(r for r in rules if r.get("alert") == "OutriggerRateLimitInFallback")
    assert alert["for"] == "5m" and 'outrigger_rate_limit_mode{mode!="global"}' in alert["expr"]
