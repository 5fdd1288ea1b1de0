"""``outrigger run`` as a subprocess, for tests that need what users run: a separate process.

``SidecarProcess`` writes the config on free loopback ports, starts the
sidecar, waits for ``/readyz``, and reads the process's resources from
``/proc``: open file descriptors, resident memory and (through a SIGUSR1
probe, see below) its asyncio task count.

The task probe: with ``task_probe=True`` the process is started as
``python -m tests.support.process --config ...``, which runs the very same
``outrigger run`` entry point with one addition, a SIGUSR1 handler that
writes ``len(asyncio.all_tasks())`` to a file.  Nothing else differs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

__all__ = ["SidecarProcess", "free_port"]

_PROBE_ENV = "OUTRIGGER_TEST_TASK_PROBE"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SidecarProcess:
    def __init__(self, data: dict[str, Any], *, env: dict[str, str] | None = None, task_probe: bool = False,
                 directory: Path | None = None) -> None:
        self.admin_port = free_port()
        self.port = free_port()
        data = json.loads(json.dumps(data))
        data["admin"] = {"address": f"127.0.0.1:{self.admin_port}"}
        data["listeners"][0]["address"] = f"127.0.0.1:{self.port}"
        self._dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="outrigger-"))
        self.config_path = self._dir / f"outrigger-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(data))
        self._probe = self._dir / f"tasks-{self.port}.txt" if task_probe else None
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "K8S_", "OUTRIGGER_"))}
        self.env = {**clean, "PYTHONUNBUFFERED": "1", **(env or {})}
        if self._probe is not None:
            self.env[_PROBE_ENV] = str(self._probe)
        self.proc: asyncio.subprocess.Process | None = None
        self._stderr = self._dir / f"stderr-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, within_s: float = 15.0) -> SidecarProcess:
        module = "tests.support.process" if self._probe is not None else "proxy"
        err = self._stderr.open("wb")  # the child writes to it; closed here once inherited
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, "run", "--config", str(self.config_path),
                env=self.env, stdout=asyncio.subprocess.DEVNULL, stderr=err)
        finally:
            err.close()
        deadline = time.monotonic() + within_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise AssertionError(f"sidecar exited during startup: {self.stderr()[-2000:]}")
                try:
                    async with session.get(f"http://127.0.0.1:{self.admin_port}/readyz") as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
        await self.kill()
        raise AssertionError(f"sidecar never became ready: {self.stderr()[-2000:]}")

    def stderr(self) -> str:
        return self._stderr.read_text(errors="replace") if self._stderr.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr().splitlines() if line.startswith("{")]

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    async def task_count(self, within_s: float = 5.0) -> int:
        assert self._probe is not None, "start with task_probe=True"
        self._probe.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self._probe.exists() and (text := self._probe.read_text()):
                return int(text)
            await asyncio.sleep(0.01)
        raise AssertionError("the task probe did not answer")

    async def stop(self, within_s: float = 20.0) -> int:
        """SIGTERM (drain) and the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), within_s)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def _run_with_task_probe(argv: list[str]) -> int:
    """``outrigger run`` plus a SIGUSR1 handler that writes the asyncio task count to a file."""
    from proxy import lifecycle
    from proxy.__main__ import main

    path = Path(os.environ[_PROBE_ENV])
    original = lifecycle.Sidecar.start

    async def start(self: lifecycle.Sidecar) -> None:
        await original(self)

        def report() -> None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(str(len(asyncio.all_tasks())))
            tmp.replace(path)

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, report)

    lifecycle.Sidecar.start = start  # type: ignore[method-assign]
    return main(argv)


if __name__ == "__main__":
    sys.exit(_run_with_task_probe(sys.argv[1:]))
