"""A real Prometheus server (Debian's ``/usr/bin/prometheus``) scraping loopback targets.

``PrometheusServer`` writes a temporary config that scrapes one target every
second, starts Prometheus on a free loopback port with its TSDB in a temp
directory, and answers instant queries through the HTTP API.  A missing
binary is an error, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import yaml

from tests.support.ports import free_port

__all__ = ["PrometheusServer", "prometheus_binary"]


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert os.path.exists(path), "the Prometheus server is required (Debian package `prometheus`)"
    return path


class PrometheusServer:
    def __init__(self, target: str, *, job: str = "outrigger", interval_s: float = 1.0) -> None:
        self.binary = prometheus_binary()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="prometheus-")
        config = {
            "global": {
                "scrape_interval": f"{interval_s:g}s",
                "scrape_timeout": f"{interval_s:g}s",
                "evaluation_interval": "1s",
            },
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}],
        }
        self.config_path = os.path.join(self.dir, "prometheus.yml")
        with open(self.config_path, "w") as file:
            yaml.safe_dump(config, file)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = open(os.path.join(self.dir, "prometheus.log"), "wb")  # noqa: SIM115 - closed in stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _supports(self, flag_value: str) -> bool:
        out = subprocess.run([self.binary, "--help"], capture_output=True, text=True, timeout=10, check=False)
        return flag_value in (out.stdout + out.stderr)

    def start(self, timeout: float = 15.0) -> PrometheusServer:
        args = [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={os.path.join(self.dir, 'data')}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        if self._supports("exemplar-storage"):
            args.append("--enable-feature=exemplar-storage")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {self.log()[-3000:]}"
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready after {timeout}s: {self.log()[-3000:]}")

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant vector results: ``[{"metric": {...}, "value": [ts, "1"]}, ...]``."""
        return list(self.api("query", query=expr)["result"])

    def log(self) -> str:
        self._log.flush()
        with open(os.path.join(self.dir, "prometheus.log"), "rb") as file:
            return file.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
