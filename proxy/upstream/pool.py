"""Keep-alive pools of ``proxy.upstream.connection`` connections, one per upstream.

At most ``max_connections`` connections are open (callers beyond that wait
for one to come back), idle ones are reused last-in first-out and closed
after ``idle_timeout``.  Connect failures become typed ``ProxyError``s here,
with clear messages naming the upstream.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl

from proxy import errors
from proxy.upstream.connection import H1Connection

__all__ = ["ConnectTimeout", "H1Pool"]


class ConnectTimeout(errors.UpstreamConnectFailure):
    """TCP/TLS connect did not finish within ``timeout.connect``."""


class H1Pool:
    """Keep-alive connections to one upstream: at most ``max_connections``, idle ones closed after ``idle_timeout``."""

    def __init__(self, name: str, host: str, port: int, *, ssl_context: ssl.SSLContext | None,
                 server_hostname: str | None, max_connections: int, idle_timeout_s: float) -> None:
        self.name = name
        self.loop = asyncio.get_running_loop()
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._limit = max_connections
        self._idle_timeout = idle_timeout_s
        self._idle: list[H1Connection] = []
        self._open: set[H1Connection] = set()
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def spare(self) -> int:
        """Connections a request could get now without waiting: idle ones plus room under the limit."""
        room = self._limit - len(self._open) - self._connecting if self._limit > 0 else 1
        return len(self._idle) + max(0, room)

    async def acquire(self, connect_timeout_s: float | None, *, fresh: bool = False) -> H1Connection:
        """A connection for one request: the most recently idle one, or a new one.

        ``fresh`` skips the idle ones (a stale one just failed); at the limit the
        oldest idle connection is closed to make room.
        """
        idle = self._idle
        while True:
            while idle and not fresh:
                conn = idle.pop()
                if conn.alive:
                    return conn
            at_limit = self._limit > 0 and len(self._open) + self._connecting >= self._limit
            if fresh and at_limit and idle:
                idle.pop(0).close()  # the oldest idle one makes room (closing leaves `_open` at once)
                continue
            if not at_limit:
                return await self._connect(connect_timeout_s)
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._wake_one()  # pass the wake-up on: this caller no longer wants it
                raise

    async def _connect(self, timeout_s: float | None) -> H1Connection:
        self._connecting += 1
        try:
            conn = await self.open_dedicated(timeout_s)
        finally:
            self._connecting -= 1
            self._wake_one()
        where = f"upstream {self.name}"
        if self._closed:
            conn.close()
            raise errors.UpstreamConnectFailure(f"{where} is being shut down")
        self._open.add(conn)
        return conn

    async def open_dedicated(self, timeout_s: float | None) -> H1Connection:
        """A new connection outside the pool's count (an upgrade's own connection; never released to the pool)."""
        where = f"upstream {self.name}"
        # The host and port tried, so that a 503 says what to check (DNS, the port, a typo in the URL).
        address = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await self.loop.create_connection(
                    lambda: H1Connection(self), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._server_hostname if self._ssl is not None else None)
        except TimeoutError:
            raise ConnectTimeout(f"connecting to {where} at {address} timed out") from None
        except ssl.SSLError as exc:
            raise errors.UpstreamTlsError(f"TLS handshake with {where} failed: {exc}") from exc
        except socket.gaierror as exc:
            raise errors.UpstreamConnectFailure(
                f"DNS lookup for {where} failed: cannot resolve host {self._host!r} ({exc.strerror or exc})") from exc
        except OSError as exc:
            raise errors.UpstreamConnectFailure(
                f"could not connect to {where} at {address}: {exc.strerror or exc}") from exc
        return conn

    @property
    def idle_count(self) -> int:
        return sum(1 for conn in self._idle if conn.alive)

    async def preconnect(self, wanted: int, connect_timeout_s: float | None) -> None:
        """Open connections until ``wanted`` are idle (or connecting), within ``max_connections``.

        They join the idle list like any released connection, so the idle sweep
        retires them at ``idle_timeout`` and the next top-up replaces them: a warm
        connection is never older than the upstream's own keep-alive is likely to allow.
        """
        while not self._closed and self.idle_count + self._connecting < wanted:
            if self._limit > 0 and len(self._open) + self._connecting >= self._limit:
                return
            self.release(await self._connect(connect_timeout_s))

    def release(self, conn: H1Connection) -> None:
        if self._closed or not conn.alive:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_at(conn.idle_since + self._idle_timeout, self._sweep)
        self._wake_one()

    def connection_closed(self, conn: H1Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.loop.time() - self._idle_timeout
        keep = []
        for conn in self._idle:
            if conn.idle_since <= deadline or not conn.alive:
                conn.close()
            else:
                keep.append(conn)
        self._idle[:] = keep
        if keep:
            self._sweeper = self.loop.call_at(min(c.idle_since for c in keep) + self._idle_timeout, self._sweep)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(errors.UpstreamConnectFailure(f"upstream {self.name} is being shut down"))
        self._waiters.clear()
