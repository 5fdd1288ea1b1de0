"""deploy/compose: the demo stack validates with Docker Compose v2 itself (which
checks the Compose Specification JSON schema), and every file it mounts exists,
parses and is wired to the services around it: Prometheus config (promtool),
OpenTelemetry Collector pipelines, Grafana provisioning and the dashboard."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "compose" / "docker-compose.yaml"
REQUIRED_SERVICES = {"app", "outrigger", "payments", "otel-collector", "jaeger", "prometheus", "grafana"}


@pytest.fixture(scope="module")
def model(compose_cli: list[str]) -> dict[str, Any]:
    """The project as Compose resolves it: schema-validated, paths made absolute."""
    proc = subprocess.run(
        [*compose_cli, "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"docker compose rejected {COMPOSE_FILE}:\n{proc.stderr}"
    loaded: dict[str, Any] = json.loads(proc.stdout)
    return loaded


def service(model: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = model["services"][name]
    return found


def mounts(model: dict[str, Any], name: str) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts."""
    return {v["target"]: Path(v["source"]) for v in service(model, name).get("volumes", []) if v["type"] == "bind"}


def mounted_file(model: dict[str, Any], name: str, target: str) -> Path:
    """Host file visible at `target` inside service `name`, via a file or directory mount."""
    for container_path, host_path in mounts(model, name).items():
        if PurePosixPath(target).is_relative_to(container_path):
            relative = PurePosixPath(target).relative_to(container_path)
            return host_path / relative if str(relative) != "." else host_path
    pytest.fail(f"nothing is mounted at {target} in {name}")


def host_port(address: str) -> tuple[str, int]:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    assert parsed.hostname and parsed.port, address
    return parsed.hostname, parsed.port


def test_compose_file_passes_docker_compose_config_validation(compose_cli: list[str]) -> None:
    proc = subprocess.run(
        [*compose_cli, "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_validator_rejects_what_the_compose_schema_forbids(compose_cli: list[str], tmp_path: Path) -> None:
    """Guards the guard: the same call must fail on a key the Compose Specification does not allow."""
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump({"services": {"a": {"image": "x", "not_a_compose_key": 1}}}))
    proc = subprocess.run([*compose_cli, "-f", str(bad), "config", "--quiet"], capture_output=True, text=True)
    assert proc.returncode != 0 and "not_a_compose_key" in proc.stderr


def test_stack_has_every_service_of_the_demo(model: dict[str, Any]) -> None:
    assert set(model["services"]) >= REQUIRED_SERVICES


def test_every_bind_mount_source_exists_inside_the_repo_and_parses(
    model: dict[str, Any], load: Callable[[Path], Any]
) -> None:
    for name, svc in model["services"].items():
        for volume in svc.get("volumes", []):
            assert volume["type"] == "bind", f"{name}: only repo files are mounted in the demo"
            source = Path(volume["source"])
            assert source.exists(), f"{name} mounts {source}, which does not exist"
            assert source.resolve().is_relative_to(REPO), f"{name} mounts {source} from outside the repo"
            assert volume.get("read_only") is True, f"{name}: mount {source} read-only"
            files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
            assert files, f"{name} mounts an empty directory {source}"
            for path in files:
                assert path.suffix in {".yaml", ".yml", ".json"}, path
                assert load(path) is not None, f"{path} is empty"


def test_outrigger_is_built_from_the_repo_dockerfile(model: dict[str, Any]) -> None:
    for name in ("outrigger", "payments"):
        build = service(model, name)["build"]
        assert Path(build["context"]) == REPO
        assert (REPO / build["dockerfile"]).is_file()


def test_flaky_upstream_runs_the_demo_upstream_on_the_port_outrigger_calls(
    model: dict[str, Any], load: Callable[[Path], Any]
) -> None:
    command = service(model, "payments")["command"]
    assert command[0] == "demo-upstream"
    assert command[command.index("--failure-rate") + 1] == "0.2"
    port = int(command[command.index("--port") + 1])
    config = load(mounted_file(model, "outrigger", "/etc/outrigger/outrigger.yaml"))
    assert host_port(config["upstreams"]["payments"]["url"]) == ("payments", port)


def test_outrigger_runs_the_mounted_config_with_admin_reachable_and_hardened(
    model: dict[str, Any], load: Callable[[Path], Any]
) -> None:
    outrigger = service(model, "outrigger")
    command = outrigger["command"]
    config_path = command[command.index("--config") + 1]
    config = load(mounted_file(model, "outrigger", config_path))
    assert "${OUTRIGGER_ADMIN_ADDRESS" in config["admin"]["address"]
    assert outrigger["environment"]["OUTRIGGER_ADMIN_ADDRESS"] == "0.0.0.0:9901"
    assert outrigger["read_only"] is True
    assert outrigger["user"].split(":")[0] == "65532"
    assert outrigger["cap_drop"] == ["ALL"]
    assert "/readyz" in " ".join(outrigger["healthcheck"]["test"])


def test_app_shares_the_sidecar_network_and_calls_its_listener(
    model: dict[str, Any], load: Callable[[Path], Any]
) -> None:
    """Like a pod: the app reaches Outrigger on loopback, as PAYMENTS_URL says."""
    app = service(model, "app")
    assert app["network_mode"] == "service:outrigger"
    assert app["depends_on"]["outrigger"]["condition"] == "service_healthy"
    config = load(mounted_file(model, "outrigger", "/etc/outrigger/outrigger.yaml"))
    listeners = {host_port(listener["address"]) for listener in config["listeners"]}
    assert host_port(app["environment"]["PAYMENTS_URL"]) in listeners
    assert "PAYMENTS_URL" in " ".join(app["command"])


def test_prometheus_config_and_its_mounted_rules_pass_promtool(
    model: dict[str, Any], promtool: str, tmp_path: Path
) -> None:
    """Rebuild Prometheus's /etc/prometheus from the mounts, then `promtool check config` it.

    promtool then also loads the rule files the config names, through the
    same relative paths the container sees.
    """
    prometheus = service(model, "prometheus")
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_target = PurePosixPath(config_flag.split("=", 1)[1])
    root = tmp_path / "etc-prometheus"
    for target, source in mounts(model, "prometheus").items():
        relative = PurePosixPath(target).relative_to(config_target.parent)
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / relative)
    proc = subprocess.run(
        [promtool, "check", "config", str(root / config_target.name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yaml").read_text())
    count = sum(len(group["rules"]) for group in rules["groups"])
    assert f"SUCCESS: {count} rules found" in proc.stdout, "the alert rules were not loaded through rule_files"
    assert "--enable-feature=exemplar-storage" in prometheus["command"], "exemplars need this flag"


def test_prometheus_scrapes_the_outrigger_admin_port(model: dict[str, Any], load: Callable[[Path], Any]) -> None:
    config = load(mounted_file(model, "prometheus", "/etc/prometheus/prometheus.yml"))
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "outrigger")
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == ["outrigger:9901"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_collector_pipeline_wiring(model: dict[str, Any], load: Callable[[Path], Any]) -> None:
    """Every component a pipeline names is defined, and OTLP flows app -> collector -> Jaeger."""
    collector = service(model, "otel-collector")
    config_flag = next(a for a in collector["command"] if a.startswith("--config="))
    config = load(mounted_file(model, "otel-collector", config_flag.split("=", 1)[1]))
    pipelines = config["service"]["pipelines"]
    assert "traces" in pipelines
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            assert pipeline[kind], f"pipeline has no {kind}"
            assert set(pipeline[kind]) <= set(config[kind]), f"undefined {kind}: {pipeline[kind]}"
    assert set(config["service"].get("extensions", [])) <= set(config.get("extensions", {}))
    assert "batch" in pipelines["traces"]["processors"]
    protocols = config["receivers"]["otlp"]["protocols"]
    assert host_port(protocols["grpc"]["endpoint"])[1] == 4317
    assert host_port(protocols["http"]["endpoint"])[1] == 4318
    exporters = pipelines["traces"]["exporters"]
    assert "debug" in exporters
    (jaeger_exporter,) = [e for e in exporters if e.split("/")[0] == "otlp"]
    settings = config["exporters"][jaeger_exporter]
    assert host_port(settings["endpoint"]) == ("jaeger", 4317)
    assert settings["tls"]["insecure"] is True
    assert service(model, "jaeger")["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    # Outrigger exports to the collector's gRPC receiver.
    endpoint = service(model, "outrigger")["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert host_port(endpoint) == ("otel-collector", 4317)


def test_grafana_datasources_link_exemplars_to_jaeger(model: dict[str, Any], load: Callable[[Path], Any]) -> None:
    provisioning = mounted_file(model, "grafana", "/etc/grafana/provisioning/datasources")
    datasources = [ds for f in sorted(provisioning.glob("*.yaml")) for ds in load(f)["datasources"]]
    by_type = {ds["type"]: ds for ds in datasources}
    prometheus, jaeger = by_type["prometheus"], by_type["jaeger"]
    assert host_port(prometheus["url"]) == ("prometheus", 9090)
    assert host_port(jaeger["url"]) == ("jaeger", 16686)
    assert prometheus["isDefault"] is True, "the dashboard's datasource variable defaults to it"
    assert prometheus["jsonData"]["exemplarTraceIdDestinations"] == [
        {"name": "trace_id", "datasourceUid": jaeger["uid"]}
    ]


def test_grafana_dashboard_provider_loads_the_mounted_dashboard(
    model: dict[str, Any], load: Callable[[Path], Any]
) -> None:
    provisioning = mounted_file(model, "grafana", "/etc/grafana/provisioning/dashboards")
    providers = [p for f in sorted(provisioning.glob("*.yaml")) for p in load(f)["providers"]]
    (provider,) = providers
    assert provider["type"] == "file"
    dashboard = mounted_file(model, "grafana", provider["options"]["path"] + "/outrigger-dashboard.json")
    assert dashboard == REPO / "deploy" / "grafana" / "outrigger-dashboard.json"
    assert load(dashboard)["uid"] == "outrigger"
    home = service(model, "grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounted_file(model, "grafana", home) == dashboard
