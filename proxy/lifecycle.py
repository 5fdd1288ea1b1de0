"""Lifecycle of the sidecar process: start, hot reload, drain, stop.

``Sidecar`` binds the admin server and every listener, reports readiness,
reloads config (file watcher and SIGHUP) and drains on SIGTERM/SIGINT:
``/readyz`` turns 503 at once, outbound calls are still served for
``drain.grace`` (the app may still be shutting down), then listeners close,
in-flight requests get up to ``drain.timeout`` (then are cancelled, within
``_CANCEL_WAIT_S`` twice over), telemetry is flushed and the process exits 0.

A reload binds new and moved listeners before it closes anything, so one
that cannot bind rejects the reload and the active config keeps serving.
Admin, telemetry and the parser limits are fixed at start: a reload keeps
them as they are, and ``/config`` shows the settings in effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import random
import signal
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from opentelemetry.sdk.trace.export import SpanExporter

from proxy import __version__
from proxy.admin import build_admin_app
from proxy.app import Runtime, build_runtime
from proxy.clock import Clock, SystemClock
from proxy.config import UNROUTED, Config, ConfigError, LimitsConfig, load_config_file, parse_address, same_socket
from proxy.server import EdgeContext, EdgeHandler, ListenerSlot, build_server
from proxy.telemetry.access_log import AccessLog
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.tracing import Tracing

__all__ = ["Sidecar"]

log = logging.getLogger("outrigger")
# After drain.timeout, requests still in flight are cancelled: aiohttp's shutdown waits this
# long for them to finish, then this long again after cancelling them.
_CANCEL_WAIT_S = 0.25


def _parser_limits(config: Config) -> tuple[float, ...]:
    """The limits fixed into a listener's HTTP parser when it binds."""
    limits = config.limits
    return (limits.max_header_bytes, limits.max_headers, limits.header_read_timeout)


@dataclass(slots=True)
class _Listener:
    slot: ListenerSlot
    handler: EdgeHandler
    runner: web.ServerRunner
    site: web.TCPSite
    port: int



def _accept_queued(listening: Iterable[Any]) -> list[socket.socket]:
    """Take, without blocking, every connection waiting in these listening sockets' accept queues.

    The kernel completes handshakes on its own, so connections (their requests often
    already sent) wait in the accept queue until the loop next polls the socket; on a
    busy machine one loop turn can take hundreds of milliseconds, and closing the
    socket resets everything queued.  Called just before the close, so those
    connections can be served like any other.
    """
    queued: list[socket.socket] = []
    for sock in listening:
        # A duplicate of the descriptor: uvloop hands out sockets that cannot accept.
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.setblocking(False)
            while True:
                try:
                    queued.append(dup.accept()[0])
                except OSError:  # BlockingIOError: the queue is empty
                    break
    return queued


async def _stop_accepting(site: web.TCPSite, runner: web.BaseRunner) -> None:
    """Close a listening socket without resetting the connections already queued on it."""
    queued = _accept_queued(getattr(site._server, "sockets", None) or [])
    await site.stop()
    factory = runner.server
    if factory is None:  # pragma: no cover - the runner is set up before its site starts
        for conn in queued:
            conn.close()
        return
    loop = asyncio.get_running_loop()
    for conn in queued:
        conn.setblocking(False)
        try:
            await loop.connect_accepted_socket(factory, conn)
        except OSError:  # the client already went away
            conn.close()


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
                                 self.metrics.for_route(UNROUTED, UNROUTED))
        self.listeners: dict[str, _Listener] = {}
        self.admin_port = 0
        self.ready = False
        self.draining = False
        self._admin_runner: web.AppRunner | None = None
        self._watch_interval = watch_interval_s
        self._watch_task: asyncio.Task[None] | None = None
        self._file_state: tuple[Any, ...] | None = None  # the file as last read by a reload
        self._applied_state: tuple[Any, ...] | None = None  # the file as last applied
        self._background: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()

    # --- start ---

    async def start(self) -> None:
        for pool in self.runtime.new_pools:
            await pool.start()
        self.runtime.new_pools.clear()
        self._in_service(self.runtime)
        host, port = parse_address(self.runtime.config.admin.address)
        self._admin_runner = web.AppRunner(build_admin_app(self), access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        admin_site = web.TCPSite(self._admin_runner, host, port, reuse_address=True)
        address = self.runtime.config.admin.address
        try:
            await admin_site.start()
        except OSError as exc:
            raise OSError(f"admin.address {address}: cannot bind: {exc.strerror or exc}") from exc
        self.admin_port = self._bound_port(admin_site)
        config = self.runtime.config
        for index, listener in enumerate(config.listeners):
            try:
                self.listeners[listener.name] = await self._open_listener(listener.name, listener.address,
                                                                          config.limits, self.runtime)
            except OSError as exc:
                raise OSError(f"listeners[{index}].address {listener.address}: cannot bind: "
                                  f"{exc.strerror or exc}") from exc
        if self.access_log is not None:
            self.access_log.start()
        if self.config_path is not None:
            self._file_state = self._applied_state = self._stat_config()
        if self.config_path is not None and self._watch_interval > 0:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())
        self.ready = True
        log.info("outrigger ready", extra={"config": self.runtime.version})

    @staticmethod
    def _bound_port(site: web.TCPSite) -> int:
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else 0

    async def _open_listener(self, name: str, address: str, limits: LimitsConfig, runtime: Runtime) -> _Listener:
        """Bind one listener (OSError when the address cannot be bound; nothing is left open then)."""
        host, port = parse_address(address)
        slot = ListenerSlot(name, address, runtime.routers[name], limits)
        handler = EdgeHandler(slot, self._edge)
        runner = web.ServerRunner(build_server(handler, limits), handle_signals=False,
                                  shutdown_timeout=_CANCEL_WAIT_S)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        return _Listener(slot, handler, runner, site, self._bound_port(site))

    def port(self, listener: str) -> int:
        return self.listeners[listener].port

    def listener_status(self) -> dict[str, Any]:
        return {name: {"address": lst.slot.address, "port": lst.port, "inflight": lst.handler.inflight}
                for name, lst in self.listeners.items()}

    def unbound_listeners(self) -> list[str]:
        """Configured listeners that are not bound (a reload could not re-bind them): not ready."""
        return [lst.name for lst in self.runtime.config.listeners if lst.name not in self.listeners]

    # --- reload ---

    def _stat_config(self) -> tuple[Any, ...] | None:
        assert self.config_path is not None
        try:
            st = os.stat(self.config_path)  # follows the ConfigMap ..data symlink swap
            with open(self.config_path, "rb") as handle:
                digest = hashlib.sha256(handle.read()).hexdigest()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size, digest)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._watch_interval)
            state = await asyncio.to_thread(self._stat_config)
            if state is not None and state != self._file_state:
                await self.reload_from_file()

    async def reload_from_file(self) -> bool:
        """Load the config file and apply it (the file watcher and SIGHUP); never raises.

        A file already applied as it stands is not applied again, so an edit
        followed by SIGHUP reloads once, whichever of the two sees it first; a
        file whose reload failed is tried again on SIGHUP.
        """
        if self.config_path is None:
            return False
        if self.draining:
            log.info("config reload skipped: the sidecar is draining", extra={"config": self.config_path})
            return False
        async with self._reload_lock:  # one reload at a time, the "already applied" check included
            state = await asyncio.to_thread(self._stat_config)
            if state is not None and state == self._applied_state:
                log.info("config file unchanged since it was applied; nothing to reload",
                         extra={"config": self.config_path})
                return True
            self._file_state = state  # the watcher does not try this version again
            try:
                config = await asyncio.to_thread(load_config_file, self.config_path)
            except ConfigError as exc:
                return self._reload_failed(f"config reload rejected; keeping the active config: {exc}")
            try:
                applied = await self._apply_locked(config)
            except Exception as exc:  # a bug must not end the watcher: the next edit is still picked up
                log.exception("config reload failed", extra={"config": self.config_path})
                return self._reload_failed(f"config reload failed; keeping the active config: {exc}")
            if applied:
                self._applied_state = state
            return applied

    def _reload_failed(self, message: str) -> bool:
        self.metrics.config_reloads.labels(result="failure").inc()
        log.error(message, extra={"config": self.config_path})
        return False

    @staticmethod
    def _effective(new: Config, active: Config) -> Config:
        """What a reload applies: all of ``new`` but admin, telemetry and the parser limits, fixed at start."""
        fixed = [name for name, changed in (
            ("admin", new.admin != active.admin),
            ("telemetry", new.telemetry != active.telemetry),
            ("limits.max_header_bytes, max_headers and header_read_timeout",
             _parser_limits(new) != _parser_limits(active)),
        ) if changed]
        if fixed:
            log.warning("changes to %s take effect on restart only; the running values stay (see /config)",
                        ", ".join(fixed))
        limits = msgspec.structs.replace(new.limits, max_header_bytes=active.limits.max_header_bytes,
                                         max_headers=active.limits.max_headers,
                                         header_read_timeout=active.limits.header_read_timeout)
        return msgspec.structs.replace(new, admin=active.admin, telemetry=active.telemetry, limits=limits)

    async def apply(self, config: Config) -> bool:
        """Swap in a validated config; unchanged state carries over.

        New and moved listeners are bound first: if one cannot bind, nothing has
        changed yet, the reload is rejected and the active config keeps serving.
        """
        async with self._reload_lock:
            return await self._apply_locked(config)

    async def _apply_locked(self, config: Config) -> bool:
        if self.draining:
            return self._reload_failed("config reload skipped: the sidecar is draining")
        old = self.runtime
        config = self._effective(config, old.config)
        try:
            runtime = build_runtime(config, metrics=self.metrics, tracing=self.tracing, clock=self.clock,
                                    rng=self.rng, previous=old)
        except Exception as exc:
            return self._reload_failed(f"config reload failed while building the runtime: {exc}")
        try:
            for pool in runtime.new_pools:
                await pool.start()
        except Exception as exc:
            await self._close_pools(runtime.new_pools)
            return self._reload_failed(f"config reload failed while starting upstream pools: {exc}")
        started, runtime.new_pools = runtime.new_pools, []
        wanted = {lst.name: (index, lst) for index, lst in enumerate(config.listeners)}
        leaving = {name: current for name, current in self.listeners.items()
                   if name not in wanted or wanted[name][1].address != current.slot.address}
        freed = [current.slot.address for current in leaving.values()]
        to_bind = [(index, lst) for name, (index, lst) in wanted.items()
                   if name not in self.listeners or name in leaving]
        bound: dict[str, _Listener] = {}
        for index, lst in to_bind:
            if any(same_socket(lst.address, address) for address in freed):
                continue  # one of ours holds it: bound once that one has stopped accepting, below
            try:
                bound[lst.name] = await self._open_listener(lst.name, lst.address, config.limits, runtime)
            except OSError as exc:
                for listener in bound.values():
                    await listener.runner.cleanup()
                await self._close_pools(started)
                return self._reload_failed(
                    f"config reload rejected; keeping the active config: listeners[{index}].address: "
                    f"cannot bind {lst.address}: {exc.strerror or exc}")
        for name, current in leaving.items():
            del self.listeners[name]
            await _stop_accepting(current.site, current.runner)  # in-flight requests finish in the background
            self._spawn(self._close_listener(current, config.drain.timeout))
        self.runtime = runtime
        self._in_service(runtime)
        for name in wanted:
            if name in self.listeners:
                slot = self.listeners[name].slot
                slot.router = runtime.routers[name]  # atomic swap; in-flight keep their route
                slot.limits = config.limits
        self.listeners.update(bound)
        failed = []
        for index, lst in to_bind:
            if lst.name in self.listeners:
                continue
            try:
                self.listeners[lst.name] = await self._open_listener(lst.name, lst.address, config.limits,
                                                                     runtime)
            except OSError as exc:  # taken by someone else in between: not ready until a reload fixes it
                failed.append(f"listeners[{index}].address: cannot bind {lst.address}: {exc.strerror or exc}")
        if runtime.retired_pools:
            self._spawn(self._retire(runtime.retired_pools, config.drain.timeout))
        if failed:
            return self._reload_failed("config applied, but listeners are down (/readyz is 503): "
                                       + "; ".join(failed))
        self.metrics.config_reloads.labels(result="success").inc()
        log.info("config reloaded", extra={"config": runtime.version})
        return True

    @staticmethod
    def _in_service(runtime: Runtime) -> None:
        """The runtime now serves: its new breakers' state series show them."""
        for breaker, breaker_metrics in runtime.new_breakers:
            breaker_metrics.show(breaker.state.value)
        runtime.new_breakers.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _finish_inflight(listeners: list[_Listener], timeout_s: float) -> None:
        """Wait until no request is in flight on ``listeners``, for at most ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        # Polled (only while draining or closing a listener) so the request path pays for no event.
        while any(lst.handler.inflight for lst in listeners) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def _close_listener(self, listener: _Listener, timeout_s: float) -> None:
        await self._finish_inflight([listener], timeout_s)
        await listener.runner.cleanup()

    @staticmethod
    async def _close_pools(pools: list[Any]) -> None:
        for pool in pools:
            with contextlib.suppress(Exception):
                await pool.close()

    @staticmethod
    async def _retire(pools: list[Any], after_s: float) -> None:
        await asyncio.sleep(after_s)
        for pool in pools:
            await pool.close()

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
        async with self._reload_lock:  # a reload under way finishes first; later ones see `draining`
            if self._watch_task is not None:
                self._watch_task.cancel()
        drain = self.runtime.config.drain  # read after any reload under way
        log.info("draining: readiness off, still serving for %.1fs", drain.grace)
        await asyncio.sleep(drain.grace)
        log.info("closing listeners; waiting up to %.1fs for in-flight requests", drain.timeout)
        for lst in self.listeners.values():
            await _stop_accepting(lst.site, lst.runner)  # connections already open keep being served
        await asyncio.sleep(0.05)
        await self._finish_inflight(list(self.listeners.values()), drain.timeout)
        await asyncio.gather(*(lst.runner.cleanup() for lst in self.listeners.values()))
        await self.stop()

    async def stop(self) -> None:
        for lst in self.listeners.values():
            await lst.runner.cleanup()
        for task in list(self._background):
            task.cancel()
        for up in self.runtime.upstreams.values():
            await up.pool.close()
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
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop_signal)
        with contextlib.suppress(NotImplementedError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload_from_file()))
        try:
            await self.start()
        except BaseException:
            await self.stop()  # close what did start (pools, sessions, the admin server) before exiting
            raise
        # The process is this sidecar: everything built so far lives until exit, so move
        # it out of the collector's view and collect the young generation less often
        # (measured: about 10% less CPU per request).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        await stop.wait()
        await self.drain()
