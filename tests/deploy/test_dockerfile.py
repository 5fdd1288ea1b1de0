"""The Dockerfile, read with BuildKit's own parser and replayed without Docker.

No Docker engine runs here, so the image is rebuilt as what it is: the build
stage's commands (parsed from the Dockerfile, not copied) run in a fresh venv
over the same build context (.dockerignore applied), then the final stage's
ENTRYPOINT + CMD run against the config the image copies in. The replay
installs from PyPI, so it takes a minute or two.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.process import free_port

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
DEAD_LETTER_DIR = "/var/lib/outrigger/dead-letter"
BUILD_TIMEOUT = pytest.mark.timeout(1200)  # first use of `image` pip-installs the package
ENV_ADDRESS = re.compile(r"\$\{(\w+):-([\w.-]+):(\d+)\}")


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def http_body(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


# ---------------------------------------------------------------- static checks


def test_dockerfile_passes_hadolint(hadolint: str) -> None:
    proc = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_build_stage_installs_the_package_into_a_venv(docker_build: Any) -> None:
    (build,) = [s for s in docker_build.stages if s is not docker_build.final]
    assert build.name, "the build stage needs a name for COPY --from"
    run = " && ".join(c.value[0] for c in build.all("RUN"))
    assert "python -m venv /opt/venv" in run
    assert "/opt/venv/bin/pip install --no-cache-dir ." in run


def test_final_stage_is_slim_unprivileged_and_labelled(docker_build: Any) -> None:
    final = docker_build.final
    build = next(s for s in docker_build.stages if s is not final)
    assert final.base == "python:3.11-slim"
    assert build.base == final.base, "the venv's interpreter symlinks must resolve in the final stage"
    (user,) = final.all("USER")
    uid = user.value[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root uid, so runAsNonRoot can verify it"
    assert [c.value for c in final.all("EXPOSE")] == [("9901",)]
    labels = {k: v for c in final.all("LABEL") for k, v in docker_build.pairs(c, final).items()}
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.version"]
    env = {k: v for c in final.all("ENV") for k, v in docker_build.pairs(c, final).items()}
    assert env["OUTRIGGER_ADMIN_ADDRESS"] == "0.0.0.0:9901"
    copies_from = [c for c in final.all("COPY") if c.flags]
    assert [(c.flags, c.value) for c in copies_from] == [
        ((f"--from={build.name}",), ("/opt/venv", "/opt/venv")),
        ((f"--from={build.name}", f"--chown={user.value[0]}"), ("/src/.dead-letter", DEAD_LETTER_DIR)),
    ]
    assert not final.all("RUN"), "the final stage only copies: no package manager, no shell steps"


def test_the_dead_letter_directory_of_the_deploy_configs_is_created_for_the_non_root_user(
    docker_build: Any,
) -> None:
    """The spool directory exists in the image, owned by USER, and is the one the shipped configs use."""
    final = docker_build.final
    (user,) = final.all("USER")
    (copy,) = [c for c in final.all("COPY") if c.value[-1] == DEAD_LETTER_DIR]
    assert f"--chown={user.value[0]}" in copy.flags
    build = next(s for s in docker_build.stages if s is not final)
    assert f"mkdir -m 0700 {copy.value[0]}" in " && ".join(c.value[0] for c in build.all("RUN"))
    for config in (KUBE / "base" / "outrigger.yaml", REPO / "deploy" / "compose" / "outrigger.yaml"):
        assert f"${{OUTRIGGER_DEAD_LETTER_DIR:-{DEAD_LETTER_DIR}}}" in config.read_text(), config


def test_entrypoint_runs_outrigger_on_the_copied_default_config(docker_build: Any) -> None:
    final = docker_build.final
    (entrypoint,) = final.all("ENTRYPOINT")
    (cmd,) = final.all("CMD")
    assert entrypoint.json and cmd.json
    assert entrypoint.value == ("outrigger",)
    assert cmd.value == ("run", "--config", "/etc/outrigger/outrigger.yaml")
    copies = {c.value[-1]: c.value[0] for c in final.all("COPY") if not c.flags}
    assert copies["/etc/outrigger/outrigger.yaml"] == "config/outrigger.yaml"


def test_build_context_keeps_tests_git_venvs_and_caches_out(docker_context: Path) -> None:
    assert (docker_context / "pyproject.toml").is_file()
    assert (docker_context / "proxy").is_dir()
    assert (docker_context / "config" / "outrigger.yaml").exists() or not (REPO / "config" / "outrigger.yaml").exists()
    if (REPO / "README.md").exists():  # pyproject's readme: the build needs it
        assert (docker_context / "README.md").is_file()
    for unwanted in ("tests", ".git", "deploy", ".venv", "venv"):
        assert not (docker_context / unwanted).exists(), unwanted
    leaked = [p for p in docker_context.rglob("*") if p.name in {"__pycache__", ".pytest_cache", ".ruff_cache"}]
    assert not leaked


# ---------------------------------------------------------------- the image's command, run


@BUILD_TIMEOUT
def test_image_command_becomes_ready_serves_metrics_and_drains_to_exit_0_on_sigterm(
    image: Any, parse_duration: Callable[[object], float], tmp_path: Path
) -> None:
    """ENTRYPOINT + CMD as the container runs them, with every `${VAR:-host:port}`
    address in the default config moved to a free loopback port."""
    config_path = Path(image.cmd[image.cmd.index("--config") + 1])
    config_text = config_path.read_text()
    env = dict(image.env)
    for name, _host, _port in ENV_ADDRESS.findall(config_text):
        env[name] = f"127.0.0.1:{free_port()}"
    admin = env["OUTRIGGER_ADMIN_ADDRESS"]
    assert admin.startswith("127.0.0.1:"), "the config must read its admin address from OUTRIGGER_ADMIN_ADDRESS"
    drain = (yaml.safe_load(config_text) or {}).get("drain", {})
    grace_s = parse_duration(drain.get("grace", "5s"))
    timeout_s = parse_duration(drain.get("timeout", "30s"))

    log = tmp_path / "outrigger.log"
    with log.open("w") as output:
        process = subprocess.Popen([*image.entrypoint, *image.cmd], env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while http_status(f"http://{admin}/readyz") != 200:
                assert process.poll() is None, f"exited with {process.returncode}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"/readyz not 200 within 60s:\n{log.read_text()}"
                time.sleep(0.2)
            assert http_status(f"http://{admin}/healthz") == 200
            assert "outrigger_build_info" in http_body(f"http://{admin}/metrics")

            # The legacy overlay's postStart hook must agree that the proxy is ready.
            hook = subprocess.run(
                [*image.entrypoint, "wait-ready", "--address", admin, "--timeout", "10s"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert hook.returncode == 0, hook.stdout + hook.stderr

            process.send_signal(signal.SIGTERM)
            if grace_s >= 1:  # readiness drops well inside the grace window, while requests are still served
                statuses = [http_status(f"http://{admin}/readyz")]
                flip_deadline = time.monotonic() + 0.5
                while statuses[-1] != 503 and time.monotonic() < flip_deadline:
                    time.sleep(0.05)
                    statuses.append(http_status(f"http://{admin}/readyz"))
                assert statuses[-1] == 503, f"/readyz after SIGTERM: {statuses}"
            returncode = process.wait(timeout=grace_s + timeout_s + 15)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert returncode == 0, log.read_text()


@BUILD_TIMEOUT
def test_outrigger_configs_shipped_under_deploy_pass_outrigger_validate(image: Any, tmp_path: Path) -> None:
    configs = [
        image.copied_files["/etc/outrigger/outrigger.yaml"],
        KUBE / "base" / "outrigger.yaml",
        REPO / "deploy" / "compose" / "outrigger.yaml",
    ]
    for config in configs:
        # The spool directory must exist and be writable to validate; here it is a temporary one.
        proc = image.run("validate", str(config), env={"OUTRIGGER_ADMIN_ADDRESS": "0.0.0.0:9901",
                                                       "OUTRIGGER_DEAD_LETTER_DIR": str(tmp_path)})
        assert proc.returncode == 0, f"{config}:\n{proc.stdout}{proc.stderr}"


@BUILD_TIMEOUT
def test_lifecycle_hook_commands_in_the_manifests_exist_in_the_image(
    image: Any, render: Callable[[Path], list[dict[str, Any]]]
) -> None:
    """The image has no shell: every exec hook must be an outrigger subcommand that works."""
    commands: list[list[str]] = []
    for directory in (KUBE / "base", KUBE / "overlays" / "legacy-sidecar"):
        for obj in render(directory):
            if obj["kind"] != "Deployment":
                continue
            spec = obj["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                for hook in c.get("lifecycle", {}).values():
                    if "exec" in hook:
                        commands.append(hook["exec"]["command"])
    outrigger_hooks = [c for c in commands if c[0] == "outrigger"]
    assert outrigger_hooks, "expected the legacy overlay's wait-ready / sleep hooks"
    for command in outrigger_hooks:
        help_run = image.run(command[1], "--help")
        assert help_run.returncode == 0, f"`outrigger {command[1]}` is not a subcommand:\n{help_run.stderr}"
    if any(c[1] == "sleep" for c in outrigger_hooks):
        started = time.monotonic()
        assert image.run("sleep", "1").returncode == 0
        assert time.monotonic() - started >= 1
    # wait-ready must not claim readiness when nothing listens.
    closed = f"127.0.0.1:{free_port()}"
    refused = image.run("wait-ready", "--address", closed, "--timeout", "1s", timeout=30)
    assert refused.returncode != 0


@pytest.mark.parametrize("leftover", [
    ".ci-venv/lib/python3.11/site-packages/aiohttp/__init__.py", ".venv/bin/python", "venv/bin/python",
    ".hypothesis/examples/0a/1b", ".pytest_cache/v/cache/nodeids", "tests/.pytest_cache/README.md",
    ".mypy_cache/3.11/proxy/app.data.json", ".ruff_cache/0.6.0/123", "build/lib/proxy/app.py",
    "dist/outrigger-0.1.0-py3-none-any.whl", "outrigger.egg-info/PKG-INFO", "proxy/outrigger.egg-info/PKG-INFO",
    "proxy/edge/protocol.cpython-311-x86_64-linux-gnu.so", "0123abcd__mypyc.cpython-311-x86_64-linux-gnu.so",
    "proxy/compiled-sources.json",
])
def test_dockerignore_keeps_build_and_test_leftovers_out_of_the_build_context(leftover: str) -> None:
    from tests.deploy.conftest import dockerignored

    assert dockerignored(leftover), f"{leftover} would reach the build context"


@pytest.mark.parametrize("needed", ["proxy/app.py", "pyproject.toml", "config/outrigger.yaml"])
def test_dockerignore_keeps_the_package_and_its_config_in_the_build_context(needed: str) -> None:
    from tests.deploy.conftest import dockerignored

    assert not dockerignored(needed)
