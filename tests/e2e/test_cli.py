"""The `outrigger` command as users run it: --version, run (config path rules), JSON logs on stderr."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy import __version__
from tests.support.ports import free_port
from tests.support.process import SidecarProcess
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream

CONSOLE_SCRIPT = Path(sys.executable).with_name("outrigger")
COMMANDS = {"console-script": [str(CONSOLE_SCRIPT)], "python-m-proxy": [sys.executable, "-m", "proxy"]}


async def _start(command: list[str], upstream_url: str, config_path: Path, *, cwd: Path,
                 args: list[str] | None = None, env: dict[str, str] | None = None) -> SidecarProcess:
    """``command run ...`` (``args`` default to ``--config config_path``) on a config written to ``config_path``."""
    process = SidecarProcess(base_config(upstream_url), config_path=config_path, command=command, args=args, cwd=cwd,
                             env=env)
    return await process.start(within_s=10)


async def _call(port: int, path: str = "/hello") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.read()


def test_console_script_is_installed() -> None:
    assert CONSOLE_SCRIPT.is_file()


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_version_flag_prints_the_package_version(command: list[str]) -> None:
    result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0
    assert result.stdout.strip() == f"outrigger {__version__}"


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
async def test_run_with_config_flag_proxies_calls_and_exits_0_on_sigterm(
        command: list[str], upstream: ScriptedUpstream, tmp_path: Path) -> None:
    upstream.default = Reply(body=b"through the subprocess")
    sidecar = await _start(command, upstream.url, tmp_path / "custom.yaml", cwd=tmp_path)
    try:
        assert await _call(sidecar.port) == (200, b"through the subprocess")
    finally:
        code = await sidecar.stop(within_s=15)
    assert code == 0
    assert [r.path for r in upstream.requests] == ["/hello"]


async def test_run_takes_the_config_path_from_outrigger_config(upstream: ScriptedUpstream,
                                                               tmp_path: Path) -> None:
    sidecar = await _start(COMMANDS["console-script"], upstream.url, tmp_path / "elsewhere" / "env.yaml",
                           cwd=tmp_path, args=[], env={"OUTRIGGER_CONFIG": str(tmp_path / "elsewhere" / "env.yaml")})
    try:
        assert (await _call(sidecar.port))[0] == 200
    finally:
        assert await sidecar.stop(within_s=15) == 0


async def test_run_without_flag_or_env_uses_config_outrigger_yaml_in_the_working_directory(
        upstream: ScriptedUpstream, tmp_path: Path) -> None:
    sidecar = await _start(COMMANDS["python-m-proxy"], upstream.url, tmp_path / "config" / "outrigger.yaml",
                           cwd=tmp_path, args=[])
    try:
        assert (await _call(sidecar.port))[0] == 200
    finally:
        assert await sidecar.stop(within_s=15) == 0


async def test_config_flag_wins_over_outrigger_config(upstream: ScriptedUpstream, tmp_path: Path) -> None:
    sidecar = await _start(COMMANDS["console-script"], upstream.url, tmp_path / "flag.yaml", cwd=tmp_path,
                           env={"OUTRIGGER_CONFIG": str(tmp_path / "missing.yaml")})
    try:
        assert (await _call(sidecar.port))[0] == 200
    finally:
        assert await sidecar.stop(within_s=15) == 0


def test_run_with_an_invalid_config_exits_1_listing_errors_and_starts_nothing(tmp_path: Path) -> None:
    admin = free_port()
    data = base_config("http://127.0.0.1:9")
    data["admin"]["address"] = f"127.0.0.1:{admin}"
    data["listeners"][0]["routes"][0]["upstream"] = "paymnts"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([str(CONSOLE_SCRIPT), "run", "--config", str(path)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 1
    assert "listeners[0].routes[0].upstream: unknown upstream 'paymnts'" in result.stderr
    with socket.socket() as sock:  # the admin port was never bound
        assert sock.connect_ex(("127.0.0.1", admin)) != 0


def test_run_with_a_missing_config_file_exits_1_naming_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUTRIGGER_CONFIG"}
    result = subprocess.run([str(CONSOLE_SCRIPT), "run"], capture_output=True, text=True, timeout=30, check=False,
                            cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "config/outrigger.yaml" in result.stderr and "Traceback" not in result.stderr


def test_run_on_a_listener_address_already_in_use_exits_1_naming_it_and_closes_what_it_opened(tmp_path: Path) -> None:
    data = base_config("http://127.0.0.1:9")
    data["admin"]["address"] = f"127.0.0.1:{free_port()}"
    path = tmp_path / "busy.yaml"
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        data["listeners"][0]["address"] = f"127.0.0.1:{blocker.getsockname()[1]}"
        path.write_text(yaml.safe_dump(data))
        result = subprocess.run([str(CONSOLE_SCRIPT), "run", "--config", str(path)], capture_output=True, text=True,
                                timeout=30, check=False)
    assert result.returncode == 1
    assert "cannot start: listeners[0].address 127.0.0.1:" in result.stderr
    assert "address already in use" in result.stderr.lower()
    assert "Unclosed" not in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_outrigger_log_level_exits_2_naming_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:9")))
    env = {**os.environ, "OUTRIGGER_LOG_LEVEL": "verbose"}
    result = subprocess.run([str(CONSOLE_SCRIPT), "run", "--config", str(path)], capture_output=True, text=True,
                            timeout=30, check=False, env=env)
    assert result.returncode == 2
    assert "OUTRIGGER_LOG_LEVEL: unknown level 'verbose'" in result.stderr and "Traceback" not in result.stderr


async def test_outrigger_log_level_is_case_insensitive(upstream: ScriptedUpstream, tmp_path: Path) -> None:
    sidecar = await _start(COMMANDS["console-script"], upstream.url, tmp_path / "outrigger.yaml", cwd=tmp_path,
                           env={"OUTRIGGER_LOG_LEVEL": "WARNING"})
    assert await sidecar.stop() == 0
    assert "outrigger ready" not in sidecar.stderr()  # an info line, below WARNING


def test_wait_ready_with_a_malformed_address_is_a_usage_error() -> None:
    result = subprocess.run([str(CONSOLE_SCRIPT), "wait-ready", "--address", "nonsense"], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "--address" in result.stderr and "invalid address 'nonsense'" in result.stderr
    assert "Traceback" not in result.stderr


async def test_metrics_carry_no_created_twins_of_counters_and_histograms(upstream: ScriptedUpstream,
                                                                          tmp_path: Path) -> None:
    sidecar = await _start(COMMANDS["console-script"], upstream.url, tmp_path / "outrigger.yaml", cwd=tmp_path)
    try:
        assert (await _call(sidecar.port))[0] == 200
        text = await sidecar.metrics_text()
        assert "outrigger_requests_total{" in text
        assert "_created" not in text
    finally:
        assert await sidecar.stop() == 0


async def test_logs_are_json_lines_on_stderr_with_time_level_and_message(upstream: ScriptedUpstream,
                                                                       tmp_path: Path) -> None:
    sidecar = await _start(COMMANDS["console-script"], upstream.url, tmp_path / "o.yaml", cwd=tmp_path)
    await _call(sidecar.port)
    code = await sidecar.stop(within_s=15)
    lines = sidecar.stderr().splitlines()
    assert code == 0
    entries: list[dict[str, Any]] = [json.loads(line) for line in lines if line.strip()]
    assert entries, "no log lines on stderr"
    for entry in entries:
        assert {"time", "level", "message"} <= set(entry)
        assert entry["level"] in {"debug", "info", "warning", "error", "critical"}
    messages = [e["message"] for e in entries]
    assert "outrigger ready" in messages and "outrigger stopped" in messages


def _validate(args: list[str], *, cwd: Path, config_env: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OUTRIGGER_CONFIG"}
    if config_env is not None:
        env["OUTRIGGER_CONFIG"] = config_env
    return subprocess.run([str(CONSOLE_SCRIPT), "validate", *args], capture_output=True, text=True, timeout=30,
                          check=False, cwd=cwd, env=env)


def _write(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:9")))
    return path


def test_validate_accepts_the_config_flag_as_run_does(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.yaml")
    result = _validate(["--config", str(path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{path} is valid" in result.stdout


def test_bare_validate_finds_the_config_as_run_does(tmp_path: Path) -> None:
    from_env = _write(tmp_path / "env.yaml")
    result = _validate([], cwd=tmp_path, config_env=str(from_env))
    assert result.returncode == 0, result.stderr
    assert f"{from_env} is valid" in result.stdout
    _write(tmp_path / "config" / "outrigger.yaml")
    result = _validate([], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "./config/outrigger.yaml is valid" in result.stdout
