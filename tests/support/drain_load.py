"""Open-loop POST load across a listener close, and the rule for which failures count as lost.

Used by the drain tests (``tests/e2e/test_drain.py``, ``tests/e2e/test_reliability_drain.py``).
Whether a request "reached the listener before it closed" is judged from what the client saw
of its connection (aiohttp trace hooks), not from when the request's coroutine started: on a
busy machine the client's own loop can sit tens of milliseconds between the two, so a stamp
taken at the start says little about when the SYN went out.

- A request whose connection was established (or taken from the pool) before the close was
  taken by the open listener: any failure of it is a lost request.
- A refused connection is lost only when the client began connecting more than ``slack_s``
  before the close; ``slack_s`` is 20 ms plus the worst lag of the client's event loop seen
  around the close (``LoopLag``), so the allowance is calibrated in the same run.
- No request, before or after the close, is ever answered with an error status.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp

CONNECT_SLACK_S = 0.02  # the client's SYN leaves a little after it starts connecting


@dataclass
class Sent:
    """One request: when it was due and started, what happened to its connection, its outcome."""

    started: float  # wall clock, when its coroutine started
    label: str = ""  # the caller's tag (e.g. a trace id)
    outcome: str = ""  # "ok", "refused", "status 503 overflow" or "<exception>: <message>"
    connecting: float | None = None  # wall clock: a new connection was being opened
    connected: float | None = None  # wall clock: the connection was up (new or from the pool)
    marks: dict[str, float] = field(default_factory=dict)


def _trace_config() -> aiohttp.TraceConfig:
    async def create_start(_s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: Any) -> None:
        ctx.trace_request_ctx.connecting = time.time()

    async def create_end(_s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: Any) -> None:
        ctx.trace_request_ctx.connected = time.time()

    async def reuse(_s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: Any) -> None:
        ctx.trace_request_ctx.connected = time.time()

    config = aiohttp.TraceConfig()
    config.on_connection_create_start.append(create_start)
    config.on_connection_create_end.append(create_end)
    config.on_connection_reuseconn.append(reuse)
    return config


class LoopLag:
    """Samples how late this event loop wakes a 5 ms sleeper: the client's own scheduling delay."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (wall clock, lateness in seconds)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.005)
            self.samples.append((time.time(), max(0.0, loop.time() - before - 0.005)))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LoopLag]:
        task = asyncio.ensure_future(self._run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def worst_near(self, when: float, before_s: float = 0.5, after_s: float = 0.1) -> float:
        return max((lag for at, lag in self.samples if when - before_s <= at <= when + after_s), default=0.0)


async def post_load(url: str, rate: float, seconds: float, *, keep_alive: bool = True,
                    at_index: Callable[[int], None] | None = None,
                    headers: Callable[[int], dict[str, str]] | None = None,
                    label: Callable[[int], str] | None = None) -> tuple[list[Sent], float, LoopLag]:
    """POST ``rate`` requests a second for ``seconds``, open loop (request *i* is due at ``i / rate``).

    POST, because clients never silently resend it: every lost request shows.  ``at_index(i)`` runs
    just before request *i* is issued (e.g. to send SIGTERM).  Returns every request, the rate the
    generator achieved, and the client loop's lag samples.
    """
    results: list[Sent] = []

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        sent = Sent(time.time(), label(index) if label else "")
        try:
            async with session.post(url, data=b"payload", headers=headers(index) if headers else None,
                                    trace_request_ctx=sent) as resp:
                await resp.read()
                error = resp.headers.get("x-outrigger-error")
                sent.outcome = "ok" if resp.status == 200 else f"status {resp.status} {error}"
        except aiohttp.ClientConnectorError:
            sent.outcome = "refused"
        except (aiohttp.ClientError, TimeoutError) as exc:
            sent.outcome = f"{type(exc).__name__}: {exc}"
            sent.marks["failed"] = time.time()
        results.append(sent)

    connector = aiohttp.TCPConnector(limit=0, force_close=not keep_alive)
    lag = LoopLag()
    async with lag.running(), aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10), connector=connector, trace_configs=[_trace_config()]) as session:
        loop = asyncio.get_running_loop()
        begin = loop.time()
        tasks = []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, begin + i / rate - loop.time()))
            if at_index is not None:
                at_index(i)
            tasks.append(asyncio.ensure_future(one(session, i)))
        achieved = len(tasks) / (loop.time() - begin)
        await asyncio.gather(*tasks)  # nothing hangs, before or after the close
    return results, achieved, lag


def lost_at_close(results: list[Sent], closed: float, lag: LoopLag) -> tuple[list[str], float]:
    """The requests the open listener took and did not serve (see the module docstring), and the slack used."""
    slack_s = CONNECT_SLACK_S + lag.worst_near(closed)
    lost = []
    for sent in results:
        if sent.outcome == "ok":
            continue
        if sent.outcome.startswith("status"):
            lost.append(f"{sent.outcome} (started {sent.started - closed:+.3f}s from the close)")
        elif sent.outcome == "refused":
            if sent.connecting is not None and sent.connecting < closed - slack_s:
                lost.append(f"refused, connecting {sent.connecting - closed:+.3f}s from the close")
        elif sent.connected is not None and sent.connected < closed:
            how = "new" if sent.connecting is not None else "pooled"
            lost.append(f"{sent.outcome} on a {how} connection up {sent.connected - closed:+.3f}s from the close "
                        f"(started {sent.started - closed:+.3f}s, failed {sent.marks['failed'] - closed:+.3f}s)")
    return lost, slack_s
