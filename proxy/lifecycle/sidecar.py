"""Lifecycle of the sidecar process: start, drain, stop (hot reload is ``proxy.lifecycle.reload``).

``Sidecar`` binds the admin server and every listener, reports readiness,
reloads config (file watcher and SIGHUP, through its ``Reloader``) and drains on
SIGTERM/SIGINT: ``/readyz`` turns 503 at once, outbound calls are still served for
``drain.grace`` (the app may still be shutting down), then listeners close,
in-flight requests get up to ``drain.timeout`` (then are cancelled, within
``CANCEL_WAIT_S`` twice over), telemetry is flushed and the process exits 0.
Listeners and pools a reload replaced (``Retiring``) are waited for and closed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import signal
from collections.abc import Coroutine
from typing import Any

from aiohttp import web
from opentelemetry.sdk.trace.export import SpanExporter

from proxy import __version__
from proxy.app import Runtime, build_runtime
from proxy.clock import Clock, SystemClock
from proxy.config import UNROUTED, Config, LimitsConfig, parse_address
from proxy.edge.listener import EdgeContext, TunnelMetrics
from proxy.lifecycle.admin import build_admin_app
from proxy.lifecycle.listeners import Listener, bind_listener
from proxy.lifecycle.reload import Reloader
from proxy.lifecycle.retiring import Retiring, close_quietly
from proxy.telemetry.access_log import AccessLog
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.operator_log import startup_details
from proxy.telemetry.tracing import Tracing

__all__ = ["Sidecar"]

log = logging.getLogger("outrigger")


_FREEZE_AFTER_S = 0.5


def _collect_and_freeze() -> None:
    gc.collect()
    gc.freeze()


class Sidecar:
    def __init__(self, config: Config, *, config_path: str | None = None, clock: Clock | None = None,
                 rng: random.Random | None = None, metrics: Metrics | None = None,
                 env: dict[str, str] | None = None, watch_interval_s: float = 2.0,
                 span_exporter: SpanExporter | None = None) -> None:
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.metrics = metrics or Metrics(version=__version__)
        self.tracing = Tracing(config.telemetry, metrics=self.metrics, env=env, exporter=span_exporter)
        self.access_log = AccessLog() if config.telemetry.access_log.enabled else None
        self.runtime: Runtime = build_runtime(config, metrics=self.metrics, tracing=self.tracing,
                                              clock=self.clock, rng=self.rng)
        self._edge = EdgeContext(self.clock, self.tracing, self.access_log,
                                 self.metrics.for_route(UNROUTED, UNROUTED),
                                 TunnelMetrics(self.metrics.tunnels_active, self.metrics.tunnels))
        self.listeners: dict[str, Listener] = {}
        self.admin_port = 0
        self.ready = False
        self.draining = False
        self._admin_runner: web.AppRunner | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Listeners a reload moved or removed, and upstream pools it replaced, while their
        # in-flight requests finish under the config they started with; drain waits for them too.
        self._retiring = Retiring(self._spawn)
        self._reloader = Reloader(self, self._retiring, self.metrics, config_path=config_path,
                                  watch_interval_s=watch_interval_s)
        self._hurry = asyncio.Event()  # a second SIGTERM/SIGINT: end the drain now
        self._stopped = asyncio.Event()

    # --- start ---

    async def start(self) -> None:
        for pool in self.runtime.new_pools:
            await pool.start()
        self.runtime.new_pools.clear()
        self.put_in_service(self.runtime)
        host, port = parse_address(self.runtime.config.admin.address)
        self._admin_runner = web.AppRunner(build_admin_app(self), access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        admin_site = web.TCPSite(self._admin_runner, host, port, reuse_address=True)
        address = self.runtime.config.admin.address
        try:
            await admin_site.start()
        except OSError as exc:
            raise OSError(f"admin.address {address}: cannot bind: {exc.strerror or exc}") from exc
        addresses = self._admin_runner.addresses  # aiohttp's public API: the bound socket names
        self.admin_port = int(addresses[0][1]) if addresses else 0
        config = self.runtime.config
        for index, listener in enumerate(config.listeners):
            try:
                self.listeners[listener.name] = await self.open_listener(listener.name, listener.address,
                                                                         config.limits, self.runtime)
            except OSError as exc:
                raise OSError(f"listeners[{index}].address {listener.address}: cannot bind: "
                                  f"{exc.strerror or exc}") from exc
        if self.access_log is not None:
            self.access_log.start()
        self._reloader.start()
        self.ready = True
        log.info("outrigger ready", extra={"config": self.runtime.version, "details": startup_details(
            config, config_path=self.config_path, admin_port=self.admin_port,
            listener_ports={name: lst.port for name, lst in self.listeners.items()}, tracing=self.tracing.settings)})

    async def open_listener(self, name: str, address: str, limits: LimitsConfig, runtime: Runtime) -> Listener:
        """Bind one listener to serve ``runtime``'s router for it (OSError when it cannot bind)."""
        return await bind_listener(name, address, limits, runtime.routers[name], self._edge)

    def runtime_for(self, config: Config, previous: Runtime) -> Runtime:
        """The runtime of a reloaded ``config``, with ``previous``'s state carried over."""
        return build_runtime(config, metrics=self.metrics, tracing=self.tracing, clock=self.clock,
                             rng=self.rng, previous=previous)

    def put_in_service(self, runtime: Runtime) -> None:
        """``runtime`` now serves: its new breakers' state series show them, endpoint lists are diffed in."""
        self.runtime = runtime
        for breaker, breaker_metrics in runtime.new_breakers:
            breaker_metrics.show(breaker.state.value)
        runtime.new_breakers.clear()
        for pool, upstream_config in runtime.endpoint_updates:
            pool.reconfigure(upstream_config)
        runtime.endpoint_updates.clear()

    def port(self, listener: str) -> int:
        return self.listeners[listener].port

    def listener_status(self) -> dict[str, Any]:
        return {name: {"address": lst.slot.address, "port": lst.port, "inflight": lst.edge.inflight}
                for name, lst in self.listeners.items()}

    def unbound_listeners(self) -> list[str]:
        """Configured listeners that are not bound (a reload could not re-bind them): not ready."""
        return [lst.name for lst in self.runtime.config.listeners if lst.name not in self.listeners]

    # --- reload (proxy.lifecycle.reload) ---

    async def reload_from_file(self, trigger: str = "api") -> bool:
        """Load the config file and apply it; never raises (see ``Reloader.reload_from_file``)."""
        return await self._reloader.reload_from_file(trigger)

    async def apply(self, config: Config, trigger: str = "api") -> bool:
        """Swap in a validated config; unchanged state carries over (see ``Reloader.apply``)."""
        return await self._reloader.apply(config, trigger)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish_inflight(self, listeners: list[Listener], timeout_s: float) -> None:
        """Wait until no request is in flight on ``listeners`` (and no retired pool is in use),
        for at most ``timeout_s`` or until a second stop signal."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        # Polled (only while draining or closing a listener) so the request path pays for no event.
        while (any(lst.edge.inflight for lst in listeners) or self._retiring.pools_in_use()) \
                and loop.time() < deadline and not self._hurry.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    # --- drain and stop ---

    async def drain(self) -> None:
        """Graceful shutdown: not ready, grace, close listeners, finish in-flight, flush."""
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        self.ready = False
        # From now on every response says Connection: close, so by the time the listeners
        # close no idle keep-alive connection is left for a client to race a request into.
        self._edge.draining = True
        await self._reloader.stop()  # a reload under way finishes first; later ones see `draining`
        drain = self.runtime.config.drain  # read after any reload under way
        log.info("draining: readiness off, still serving for %.1fs", drain.grace)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), drain.grace)  # a second signal cuts the grace short
        log.info("closing listeners; waiting up to %.1fs for in-flight requests", drain.timeout)
        for lst in self.listeners.values():
            await lst.stop_accepting()  # connections already open (or queued) keep being served
        # Listeners a reload moved away are still finishing requests, and their pools too.
        listeners = [*self.listeners.values(), *self._retiring.listeners]
        if not self._hurry.is_set():
            await asyncio.sleep(0.05)
        await self._finish_inflight(listeners, drain.timeout)
        await asyncio.gather(*(lst.cleanup() for lst in listeners))
        await self.stop()

    async def stop(self) -> None:
        for lst in [*self.listeners.values(), *self._retiring.listeners]:
            await lst.cleanup()
        for task in list(self._background):
            task.cancel()
        for up in self.runtime.upstreams.values():
            await up.pool.close()
        await close_quietly(list(self._retiring.pools))
        await self._retiring.close_spools()  # spools a reload replaced, before the one they hand entries to
        if self.runtime.spool is not None:
            await asyncio.to_thread(self.runtime.spool.close)  # commits what is queued
        if self.runtime.redis is not None:
            await self.runtime.redis.close()
        if self.access_log is not None:
            await self.access_log.close()
        await asyncio.to_thread(self.tracing.shutdown)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        self.ready = False
        self._stopped.set()
        log.info("outrigger stopped")

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_stop_signal() -> None:
            self.ready = False  # /readyz answers 503 from this very moment
            if stop.is_set():  # the second one: stop waiting, cut what is still in flight
                log.warning("second stop signal: ending the drain now; requests still in flight are cut")
                self._hurry.set()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop_signal)
        with contextlib.suppress(NotImplementedError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload_from_file(trigger="sighup")))
        try:
            await self.start()
        except BaseException:
            await self.stop()  # close what did start (pools, sessions, the admin server) before exiting
            raise
        # The process is this sidecar: everything built so far lives until exit, so move
        # it out of the collector's view and collect the young generation less often
        # (measured: about 10% less CPU per request).  The full collection first takes
        # ~30 ms: it runs a moment after the sidecar is ready, not before /readyz answers.
        gc.set_threshold(50_000, 20, 100)
        asyncio.get_running_loop().call_later(_FREEZE_AFTER_S, _collect_and_freeze)
        await stop.wait()
        await self.drain()
