"""The Kubernetes manifests under deploy/kubernetes, rendered by kustomize and
validated against the Kubernetes OpenAPI schemas (kubernetes-validate, offline).

Schema versions: the base needs native sidecars (restartPolicy on an init
container, GA-track since 1.29), so it is checked against 1.30 and shown to be
rejected by 1.27; the legacy overlay exists for pre-1.29 clusters, so it must
pass the 1.27 schema as well.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import kubernetes_validate
import pytest
import yaml

KUBE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
BASE = KUBE / "base"
LEGACY = KUBE / "overlays" / "legacy-sidecar"
DEAD_LETTER_PVC = KUBE / "overlays" / "dead-letter-pvc"
DEAD_LETTER_DIR = "/var/lib/outrigger/dead-letter"
MONITORING = KUBE / "monitoring"
NATIVE_SIDECAR_VERSION = "1.30"
PRE_NATIVE_SIDECAR_VERSION = "1.27"
CRD_GROUP = "monitoring.coreos.com/v1"
ADMIN_PORT = 9901

Render = Callable[[Path], list[dict[str, Any]]]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in spec.get(where, []) if c["name"] == name]
    assert found, f"no {where} entry named {name!r}"
    return found[0]


def outrigger_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    configmap = one(objects, "ConfigMap")
    loaded: dict[str, Any] = yaml.safe_load(configmap["data"]["outrigger.yaml"])
    return loaded


def resolve_port(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    assert port in named, f"probe port {port!r} is not a named port of {c['name']}"
    return int(named[port])


def validate(obj: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version}: {error}")


# ---------------------------------------------------------------- schema validation


@pytest.mark.parametrize(
    ("directory", "version"),
    [
        (BASE, NATIVE_SIDECAR_VERSION),
        (LEGACY, NATIVE_SIDECAR_VERSION),
        (LEGACY, PRE_NATIVE_SIDECAR_VERSION),
        (MONITORING, NATIVE_SIDECAR_VERSION),
        (DEAD_LETTER_PVC, NATIVE_SIDECAR_VERSION),
    ],
    ids=["base@1.30", "legacy@1.30", "legacy@1.27", "monitoring@1.30", "dead-letter-pvc@1.30"],
)
def test_rendered_objects_validate_strictly_against_kubernetes_schema(
    render: Render, directory: Path, version: str
) -> None:
    """Every built-in object kustomize renders passes the strict OpenAPI schema."""
    objects = render(directory)
    assert objects, f"{directory} rendered nothing"
    for obj in objects:
        if obj["apiVersion"] != CRD_GROUP:  # CRDs: see test_*monitor_* below
            validate(obj, version)


def test_native_sidecar_base_is_rejected_by_a_pre_1_28_schema(render: Render) -> None:
    """Proves the strict schema check has teeth: 1.27 has no container restartPolicy."""
    deployment = one(render(BASE), "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(deployment, PRE_NATIVE_SIDECAR_VERSION, strict=True)


def test_standalone_manifests_outside_kustomizations_are_valid() -> None:
    """Alternative files (ServiceMonitor + its Service) are checked even though not rendered by default."""
    for path in sorted(MONITORING.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for obj in yaml.safe_load_all(path.read_text()):
            if obj["apiVersion"] != CRD_GROUP:
                validate(obj, NATIVE_SIDECAR_VERSION)


def test_base_contains_no_prometheus_operator_objects(render: Render) -> None:
    """The base must apply on clusters without the monitoring.coreos.com CRDs."""
    assert not [o for o in render(BASE) if o["apiVersion"] == CRD_GROUP]
    assert not [o for o in render(LEGACY) if o["apiVersion"] == CRD_GROUP]


# ---------------------------------------------------------------- native sidecar shape


def test_outrigger_is_a_native_sidecar_and_the_app_a_regular_container(render: Render) -> None:
    spec = pod_spec(render(BASE))
    sidecar = container(spec, "outrigger", "initContainers")
    assert sidecar["restartPolicy"] == "Always"
    assert spec["initContainers"][0]["name"] == "outrigger", "the sidecar must start before other init containers"
    assert [c["name"] for c in spec["containers"]] == ["checkout"]
    assert "restartPolicy" not in spec["containers"][0]


def test_sidecar_probes_check_readiness_and_liveness_on_the_admin_port(render: Render) -> None:
    objects = render(BASE)
    sidecar = container(pod_spec(objects), "outrigger", "initContainers")
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path, probe
        assert resolve_port(sidecar, get["port"]) == ADMIN_PORT, probe
    # The admin server must listen beyond loopback for the kubelet to reach it.
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["OUTRIGGER_ADMIN_ADDRESS"] == f"0.0.0.0:{ADMIN_PORT}"
    assert "${OUTRIGGER_ADMIN_ADDRESS" in outrigger_config(objects)["admin"]["address"]


def test_sidecar_runs_unprivileged_with_a_read_only_root(render: Render) -> None:
    spec = pod_spec(render(BASE))
    context = container(spec, "outrigger", "initContainers")["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 65532
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_sidecar_resources_match_the_benchmark_sizing(render: Render) -> None:
    resources = container(pod_spec(render(BASE)), "outrigger", "initContainers")["resources"]
    assert resources["requests"] == {"cpu": "100m", "memory": "64Mi"}
    assert resources["limits"] == {"cpu": "1", "memory": "128Mi"}


def test_termination_grace_covers_the_configured_drain(
    render: Render, parse_duration: Callable[[object], float]
) -> None:
    """SIGKILL must not cut the drain short: grace + timeout + a margin must fit."""
    objects = render(BASE)
    drain = outrigger_config(objects)["drain"]
    needed = parse_duration(drain["grace"]) + parse_duration(drain["timeout"])
    assert pod_spec(objects)["terminationGracePeriodSeconds"] >= needed + 5


def test_config_volume_mounts_the_generated_configmap_where_the_command_reads_it(render: Render) -> None:
    objects = render(BASE)
    spec = pod_spec(objects)
    sidecar = container(spec, "outrigger", "initContainers")
    config_path = Path(sidecar["args"][sidecar["args"].index("--config") + 1])
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    configmap_name = one(objects, "ConfigMap")["metadata"]["name"]
    (volume_name,) = [n for n, v in volumes.items() if v.get("configMap", {}).get("name") == configmap_name]
    assert Path(mounts[volume_name]["mountPath"]) == config_path.parent
    assert config_path.name in one(objects, "ConfigMap")["data"]
    assert mounts[volume_name]["readOnly"] is True


def test_config_in_the_configmap_has_the_documented_shape(render: Render) -> None:
    config = outrigger_config(render(BASE))
    assert config["version"] == 1
    listeners = config["listeners"]
    assert all(listener["address"].startswith("127.0.0.1:") for listener in listeners), (
        "listeners stay on loopback: only the app in the pod should call them"
    )
    routes = [route for listener in listeners for route in listener["routes"]]
    assert {route["upstream"] for route in routes} <= set(config["upstreams"])
    assert len({route["name"] for route in routes}) == len(routes), "route names label metrics: keep them unique"


def test_app_calls_its_dependencies_through_the_loopback_listeners(render: Render) -> None:
    objects = render(BASE)
    listener_ports = {int(lis["address"].rsplit(":", 1)[1]) for lis in outrigger_config(objects)["listeners"]}
    app = container(pod_spec(objects), "checkout", "containers")
    urls = {e["name"]: e["value"] for e in app["env"] if e["name"].endswith("_URL")}
    assert urls["PAYMENTS_URL"] == "http://127.0.0.1:15001"
    for name, url in urls.items():
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", url)
        assert match and int(match.group(1)) in listener_ports, f"{name}={url} is not an Outrigger listener"


def test_telemetry_env_uses_the_downward_api(render: Render) -> None:
    sidecar = container(pod_spec(render(BASE)), "outrigger", "initContainers")
    env = sidecar["env"]
    names = [e["name"] for e in env]
    field_refs = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in env if "valueFrom" in e}
    assert field_refs == {
        "K8S_POD_NAME": "metadata.name",
        "K8S_NAMESPACE_NAME": "metadata.namespace",
        "K8S_NODE_NAME": "spec.nodeName",
    }
    attributes = next(e["value"] for e in env if e["name"] == "OTEL_RESOURCE_ATTRIBUTES")
    referenced = re.findall(r"\$\((\w+)\)", attributes)
    assert set(referenced) == set(field_refs)
    position = names.index("OTEL_RESOURCE_ATTRIBUTES")
    for var in referenced:
        assert names.index(var) < position, f"$({var}) only expands if {var} is defined earlier"
    assert "k8s.pod.name=$(K8S_POD_NAME)" in attributes.split(",")
    assert "k8s.namespace.name=$(K8S_NAMESPACE_NAME)" in attributes.split(",")
    endpoint = next(e["value"] for e in env if e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT")
    assert re.fullmatch(r"https?://[\w.-]+:4317", endpoint)


def test_pod_is_annotated_for_prometheus_scraping_of_the_admin_port(render: Render) -> None:
    template = one(render(BASE), "Deployment")["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(ADMIN_PORT),
        "prometheus.io/path": "/metrics",
    }


def test_app_service_does_not_publish_the_admin_port(render: Render) -> None:
    service = one(render(BASE), "Service")
    assert ADMIN_PORT not in [p["port"] for p in service["spec"]["ports"]]
    labels = one(render(BASE), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


# ---------------------------------------------------------------- legacy overlay


def test_legacy_overlay_runs_outrigger_first_as_an_ordinary_container(render: Render) -> None:
    spec = pod_spec(render(LEGACY))
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["outrigger", "checkout"]
    assert "restartPolicy" not in spec["containers"][0]


def test_legacy_overlay_holds_the_app_until_ready_and_delays_the_proxy_shutdown(
    render: Render, parse_duration: Callable[[object], float]
) -> None:
    objects = render(LEGACY)
    spec = pod_spec(objects)
    lifecycle = spec["containers"][0]["lifecycle"]
    post_start = lifecycle["postStart"]["exec"]["command"]
    pre_stop = lifecycle["preStop"]["exec"]["command"]
    assert post_start[:2] == ["outrigger", "wait-ready"]
    assert post_start[post_start.index("--address") + 1] == f"127.0.0.1:{ADMIN_PORT}"
    assert pre_stop[:2] == ["outrigger", "sleep"]
    sleep_s = parse_duration(pre_stop[2])
    drain = outrigger_config(objects)["drain"]
    needed = sleep_s + parse_duration(drain["grace"]) + parse_duration(drain["timeout"])
    assert spec["terminationGracePeriodSeconds"] >= needed + 5


def test_legacy_overlay_keeps_everything_else_from_the_base(render: Render) -> None:
    base = container(pod_spec(render(BASE)), "outrigger", "initContainers")
    legacy = dict(pod_spec(render(LEGACY))["containers"][0])
    legacy.pop("lifecycle")
    base = {k: v for k, v in base.items() if k != "restartPolicy"}
    assert legacy == base


# ---------------------------------------------------------------- prometheus-operator objects


def load_crd(name: str) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load((MONITORING / name).read_text())
    assert obj["apiVersion"] == CRD_GROUP
    assert obj["metadata"]["name"]
    return obj


def test_podmonitor_selects_the_pods_and_scrapes_the_sidecar_admin_port(render: Render) -> None:
    monitor = load_crd("podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor"
    assert monitor in render(MONITORING)
    template = one(render(BASE), "Deployment")["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    sidecar = container(template["spec"], "outrigger", "initContainers")
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert resolve_port(sidecar, endpoint["port"]) == ADMIN_PORT
        assert endpoint["path"] == "/metrics"


def test_servicemonitor_selects_the_metrics_service_and_its_admin_port(render: Render) -> None:
    monitor = load_crd("servicemonitor.yaml")
    assert monitor["kind"] == "ServiceMonitor"
    service = yaml.safe_load((MONITORING / "metrics-service.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    template = one(render(BASE), "Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    sidecar = container(template["spec"], "outrigger", "initContainers")
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        assert resolve_port(sidecar, ports[endpoint["port"]]["targetPort"]) == ADMIN_PORT


def test_only_one_prometheus_operator_scrape_object_is_enabled(render: Render) -> None:
    """Two monitors over the same pods would scrape every sample twice."""
    kinds = [o["kind"] for o in render(MONITORING) if o["apiVersion"] == CRD_GROUP]
    assert len(kinds) == 1


# ---------------------------------------------------------------- the dead-letter spool


def _spool_volume(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The volume mounted at the config's dead_letter.dir in the sidecar, which must be writable."""
    spec = pod_spec(objects)
    sidecar = container(spec, "outrigger", "initContainers")
    config_dir = outrigger_config(objects)["dead_letter"]["dir"]
    assert config_dir == f"${{OUTRIGGER_DEAD_LETTER_DIR:-{DEAD_LETTER_DIR}}}"
    (mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == DEAD_LETTER_DIR]
    assert not mount.get("readOnly"), "the spool is written to"
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return cast(dict[str, Any], volume)


def _parse_quantity(text: str) -> int:
    """A Kubernetes quantity (512Mi) or an Outrigger size (384MiB) in bytes."""
    match = re.fullmatch(r"(\d+)([KMG])i(?:B)?", text)
    assert match, text
    return int(match[1]) * int(1024 ** " KMG".index(match[2]))


def test_base_mounts_the_spool_on_a_disk_backed_emptydir_larger_than_max_bytes(render: Render) -> None:
    objects = render(BASE)
    volume = _spool_volume(objects)
    assert "medium" not in volume["emptyDir"], "on disk: the spool fsyncs and must not count as memory"
    max_bytes = outrigger_config(objects)["dead_letter"]["max_bytes"]
    assert _parse_quantity(max_bytes) < _parse_quantity(volume["emptyDir"]["sizeLimit"]), (
        "an emptyDir past its sizeLimit evicts the pod: the spool must fill up first")
    routes = [r for lst in outrigger_config(objects)["listeners"] for r in lst["routes"]]
    assert any(r.get("dead_letter") for r in routes)


def test_pvc_overlay_puts_the_spool_on_a_claim_writable_by_the_sidecar_user(render: Render) -> None:
    objects = render(DEAD_LETTER_PVC)
    volume = _spool_volume(objects)
    assert set(volume) == {"name", "persistentVolumeClaim"}
    claim = one(objects, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    max_bytes = outrigger_config(objects)["dead_letter"]["max_bytes"]
    assert _parse_quantity(max_bytes) < _parse_quantity(claim["spec"]["resources"]["requests"]["storage"])
    deployment = one(objects, "Deployment")
    spec = pod_spec(objects)
    user = container(spec, "outrigger", "initContainers")["securityContext"]["runAsUser"]
    assert spec["securityContext"]["fsGroup"] == user
    if claim["spec"]["accessModes"] == ["ReadWriteOnce"]:  # one node at a time: no overlap in a rollout
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
