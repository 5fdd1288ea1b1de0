"""A real ``redis-server`` on a free loopback port, with the faults the shared-state tests need.

``RedisServer`` runs Debian's ``redis-server`` (``.ci/run`` installs it) with
no persistence, so ``restart()`` brings it back on the same port *empty*.
``pause()``/``resume()`` SIGSTOP/SIGCONT it (connections stay open, nothing
answers), ``kill()`` SIGKILLs it, and ``slow(seconds)`` makes it sleep in
``DEBUG SLEEP`` (which the server is started to allow from loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator

import pytest

from tests.support.ports import free_port

__all__ = ["RedisServer", "redis_server"]


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="outrigger-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self._sleepers: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, within_s: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (.ci/run installs Debian's redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir.name, "--enable-debug-command", "local", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            if self.command("PING") == "+PONG":
                return self
            time.sleep(0.02)
        self.kill()
        raise AssertionError("redis-server never answered PING")

    def command(self, *parts: str, timeout_s: float = 1.0) -> str | None:
        """One command over a raw socket (RESP inline); the first reply line, None if nothing answered."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as sock:
                sock.sendall((" ".join(parts) + "\r\n").encode())
                return sock.recv(65536).split(b"\r\n")[0].decode()
        except OSError:
            return None

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def slow(self, seconds: float) -> None:
        """Make the server busy for ``seconds`` (DEBUG SLEEP), without waiting for it."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=1.0)
        sock.sendall(f"DEBUG SLEEP {seconds}\r\n".encode())
        self._sleepers.append(sock)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> RedisServer:
        """Kill and start again on the same port, empty (no persistence)."""
        self.kill()
        return self.start()

    def close(self) -> None:
        self.kill()
        for sock in self._sleepers:
            sock.close()
        self._dir.cleanup()


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = await asyncio.to_thread(RedisServer().start)
    yield server
    server.close()
