"""``outrigger run`` as a subprocess: the one helper for tests that need what users run.

``SidecarProcess`` writes the config with free loopback ports for the admin
server and the first listener, starts the sidecar, waits for ``/readyz`` and
stops it with SIGTERM (drain).  The child's stdout (the access log) and
stderr (the JSON logs) go to files that can be read at any time.  It also
reads the process's resources from ``/proc``: open file descriptors,
resident memory and (through a SIGUSR1 probe, see below) its asyncio task
count.

By default the command is ``python -m proxy run --config <file>``; ``command``
(e.g. the ``outrigger`` console script), ``args`` (everything after ``run``)
and ``cwd`` replace the parts a CLI test varies.  The environment is the
test's own minus ``OTEL_*``, ``K8S_*`` and ``OUTRIGGER_*``, plus ``env``.

The task probe: with ``task_probe=True`` the process is started as
``python -m tests.support.process --config ...``, which runs the very same
``outrigger run`` entry point with one addition, a SIGUSR1 handler that
writes ``len(asyncio.all_tasks())`` to a file.  Nothing else differs.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.ports import free_port

__all__ = ["SidecarProcess", "free_port"]

_PROBE_ENV = "OUTRIGGER_TEST_TASK_PROBE"


class SidecarProcess:
    def __init__(self, data: dict[str, Any], *, env: dict[str, str] | None = None, task_probe: bool = False,
                 directory: Path | None = None, config_path: Path | None = None,
                 command: Sequence[str] | None = None, args: Sequence[str] | None = None,
                 cwd: Path | None = None) -> None:
        """``directory`` holds the config, the output files and the probe file (default: a temporary
        directory removed with this object); ``config_path`` puts the config elsewhere."""
        self.admin_port = free_port()
        self.port = free_port()
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="outrigger-")
            directory = Path(self._tmp.name)
        self.config_path = Path(config_path) if config_path else directory / f"outrigger-{self.port}.yaml"
        self.write_config(data)
        self._probe = directory / f"tasks-{self.port}.txt" if task_probe else None
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "K8S_", "OUTRIGGER_"))}
        self.env = {**clean, "PYTHONUNBUFFERED": "1", **(env or {})}
        if self._probe is not None:
            self.env[_PROBE_ENV] = str(self._probe)
        module = "tests.support.process" if self._probe is not None else "proxy"
        run_args = ["--config", str(self.config_path)] if args is None else list(args)
        self.argv = [*(command or [sys.executable, "-m", module]), "run", *run_args]
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self._stdout = directory / f"stdout-{self.port}.log"
        self._stderr = directory / f"stderr-{self.port}.log"

    def write_config(self, data: dict[str, Any]) -> None:
        """Write ``data`` to ``config_path`` with this process's admin and first-listener addresses."""
        data = copy.deepcopy(data)
        data["admin"] = {**data.get("admin", {}), "address": f"127.0.0.1:{self.admin_port}"}
        data["listeners"][0]["address"] = f"127.0.0.1:{self.port}"
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(data))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, within_s: float = 15.0) -> SidecarProcess:
        """Start the process and wait until ``/readyz`` answers 200 (killed if it never does)."""
        # The child writes to the files; they are closed here once inherited.
        with self._stdout.open("wb") as out, self._stderr.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(*self.argv, cwd=self.cwd, env=self.env,
                                                             stdout=out, stderr=err)
        deadline = time.monotonic() + within_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise AssertionError(f"sidecar exited during startup: {self.stderr()[-2000:]}")
                if await self.admin_status(session, "/readyz") == 200:
                    return self
                await asyncio.sleep(0.05)
        await self.kill()
        raise AssertionError(f"sidecar never became ready: {self.stderr()[-2000:]}")

    async def admin_status(self, session: aiohttp.ClientSession, path: str) -> int | None:
        """The admin server's status for ``path``; None when the connection fails."""
        try:
            async with session.get(self.admin_url + path) as resp:
                return resp.status
        except aiohttp.ClientConnectionError:
            return None

    async def metrics_text(self) -> str:
        async with aiohttp.ClientSession() as session, session.get(self.admin_url + "/metrics") as resp:
            return await resp.text()

    def stdout(self) -> str:
        return self._stdout.read_text(errors="replace") if self._stdout.exists() else ""

    def stderr(self) -> str:
        return self._stderr.read_text(errors="replace") if self._stderr.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines on stderr so far (a line still being written is left out)."""
        complete = self.stderr().split("\n")[:-1]
        return [json.loads(line) for line in complete if line.startswith("{")]

    def log_time(self, message_start: str) -> float | None:
        """Wall-clock time (epoch seconds) of the first log line whose message starts with ``message_start``."""
        for entry in self.logs():
            if entry["message"].startswith(message_start):
                return datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
        return None

    async def wait_log(self, message_start: str, within_s: float = 10.0) -> float:
        deadline = time.monotonic() + within_s
        while (when := self.log_time(message_start)) is None:
            assert time.monotonic() < deadline, f"no log line {message_start!r}"
            await asyncio.sleep(0.01)
        return when

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

    async def wait(self, within_s: float = 20.0) -> int:
        """The exit code, once the process exits by itself or on a signal sent elsewhere."""
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), within_s)

    async def settle(self, fds: int, tasks: int, within_s: float = 10.0) -> tuple[int, int]:
        """Wait for the FD and task counts to come back to (at most) the baseline; the last reading."""
        deadline = time.monotonic() + within_s
        while True:
            now_fds, now_tasks = self.fd_count(), await self.task_count()
            if (now_fds <= fds and now_tasks <= tasks) or time.monotonic() > deadline:
                return now_fds, now_tasks
            await asyncio.sleep(0.2)

    async def stop(self, within_s: float = 20.0) -> int:
        """SIGTERM (drain) and the exit code; SIGKILL (a negative code) if it does not exit in ``within_s``."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await self.wait(within_s)
        except TimeoutError:
            await self.kill()
            assert self.proc.returncode is not None
            return self.proc.returncode

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def _run_with_task_probe(argv: list[str]) -> int:
    """``outrigger run`` plus a SIGUSR1 handler that writes the asyncio task count to a file."""
    from proxy.__main__ import main
    from proxy.lifecycle import sidecar as lifecycle

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
