"""The headless-Service example for balanced upstreams: valid Kubernetes objects and a config Outrigger loads."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml

from proxy.config import load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "examples" / "headless-endpoints.yaml"


def test_the_headless_example_is_valid_and_its_config_loads() -> None:
    objects = list(yaml.safe_load_all(EXAMPLE.read_text()))
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30", strict=True)
    service = next(o for o in objects if o["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS record per ready pod
    configmap = next(o for o in objects if o["kind"] == "ConfigMap")
    config = load_config(configmap["data"]["outrigger.yaml"], env={})
    orders = config.upstreams["orders"]
    assert orders.discovery is not None and orders.discovery.refresh == 5.0
    host = service["metadata"]["name"]
    assert orders.url.startswith(f"http://{host}.")
    assert orders.url.endswith(f":{service['spec']['ports'][0]['port']}")
