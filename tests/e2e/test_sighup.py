"""SIGHUP makes a running `outrigger run` process re-read its config file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.support.sidecar import base_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def test_sighup_reloads_config_and_bumps_version(tmp_path: Path) -> None:
    admin = _free_port()
    data = base_config("http://127.0.0.1:9")
    data["admin"]["address"] = f"127.0.0.1:{admin}"
    data["listeners"][0]["address"] = f"127.0.0.1:{_free_port()}"
    path = tmp_path / "outrigger.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(path),
                             "--watch-interval", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 20
        version = None
        while time.monotonic() < deadline:
            try:
                version = _get_json(f"http://127.0.0.1:{admin}/readyz")["version"]
                break
            except OSError:
                time.sleep(0.1)
        assert version is not None, "sidecar never became ready"
        data["listeners"][0]["routes"][0]["rewrite_prefix"] = "/hup"
        path.write_text(yaml.safe_dump(data))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        new_version = version
        while time.monotonic() < deadline and new_version == version:
            time.sleep(0.1)
            new_version = _get_json(f"http://127.0.0.1:{admin}/config")["version"]
        assert new_version != version
        config = _get_json(f"http://127.0.0.1:{admin}/config")["config"]
        assert config["listeners"][0]["routes"][0]["rewrite_prefix"] == "/hup"  # type: ignore[index]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
