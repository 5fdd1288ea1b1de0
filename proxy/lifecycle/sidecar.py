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
from proxy.app import Runtime, build_runtime
from proxy.clock import Clock, SystemClock
from proxy.config import UNROUTED, Config, ConfigError, LimitsConfig, load_config_file, parse_address
from proxy.edge.listener import EdgeContext, ListenerEdge, ListenerSlot, TunnelMetrics
from proxy.lifecycle.admin import build_admin_app
from proxy.lifecycle.plan import plan_listeners
from proxy.telemetry.access_log import AccessLog
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.operator_log import config_changes, describe_changes, startup_details
from proxy.telemetry.tracing import Tracing

__all__ = ["Sidecar"]

log = logging.getLogger("outrigger")
# After drain.timeout, requests still in flight are cancelled and get this long to finish.
_CANCEL_WAIT_S = 0.25


def _parser_limits(config: Config) -> tuple[float, ...]:
    """The limits fixed into a listener's HTTP parser when it binds."""
    limits = config.limits
    return (limits.max_header_bytes, limits.max_headers, limits.header_read_timeout)


@dataclass(slots=True, eq=False)  # compared by identity: kept in a set while a reload retires it
class _Listener:
    slot: ListenerSlot
    edge: ListenerEdge  # the protocol factory and what its connections share
    server: asyncio.Server
    port: int

    async def stop_accepting(self) -> None:
        """Close the listening socket without resetting the connections already queued on it."""
        queued = _accept_queued(self.server.sockets)
        self.server.close()  # connections already open keep being served
        loop = asyncio.get_running_loop()
        for conn in queued:
            conn.setblocking(False)
            try:
                await loop.connect_accepted_socket(self.edge, conn)
            except OSError:  # the client already went away
                conn.close()

    async def cleanup(self) -> None:
        """Cancel what is still in flight (``_CANCEL_WAIT_S`` to finish) and close every connection."""
        self.server.close()
        await self.edge.shutdown(_CANCEL_WAIT_S)



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
        self.listeners: dict[str, _Listener] = {}
        self.admin_port = 0
        self.ready = False
        self.draining = False
        self._admin_runner: web.AppRunner | None = None
        self._watch_interval = watch_interval_s
        self._watch_task: asyncio.Task[None] | None = None
        self._file_state: tuple[Any, ...] | None = None  # the file as last read by a reload
        self._attempted_content: str | None = None  # digest of the file's content last attempted
        self._attempt_succeeded = True
        self._attempt_failed_outside = False  # it failed for a cause outside the file: SIGHUP retries
        self._background: set[asyncio.Task[Any]] = set()
        # Listeners a reload moved or removed, and upstream pools it replaced, while their
        # in-flight requests finish under the config they started with; drain waits for them too.
        self._leaving: set[_Listener] = set()
        self._retiring: set[Any] = set()
        self._hurry = asyncio.Event()  # a second SIGTERM/SIGINT: end the drain now
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._trigger = "api"  # what started the reload under way: sighup, watcher or api

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
        addresses = self._admin_runner.addresses  # aiohttp's public API: the bound socket names
        self.admin_port = int(addresses[0][1]) if addresses else 0
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
            self._file_state = self._stat_config()
            self._attempted_content = self._file_state[-1] if self._file_state is not None else None
        if self.config_path is not None and self._watch_interval > 0:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())
        self.ready = True
        log.info("outrigger ready", extra={"config": self.runtime.version, "details": startup_details(
            config, config_path=self.config_path, admin_port=self.admin_port,
            listener_ports={name: lst.port for name, lst in self.listeners.items()}, tracing=self.tracing.settings)})

    @staticmethod
    def _bound_port(server: Any) -> int:
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else 0

    async def _open_listener(self, name: str, address: str, limits: LimitsConfig, runtime: Runtime) -> _Listener:
        """Bind one listener (OSError when the address cannot be bound; nothing is left open then)."""
        host, port = parse_address(address)
        slot = ListenerSlot(name, address, runtime.routers[name], limits)
        edge = ListenerEdge(slot, self._edge)
        server = await asyncio.get_running_loop().create_server(edge, host, port, reuse_address=True, backlog=1024)
        return _Listener(slot, edge, server, self._bound_port(server))

    def port(self, listener: str) -> int:
        return self.listeners[listener].port

    def listener_status(self) -> dict[str, Any]:
        return {name: {"address": lst.slot.address, "port": lst.port, "inflight": lst.edge.inflight}
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
                await self.reload_from_file(trigger="watcher")

    async def reload_from_file(self, trigger: str = "api") -> bool:
        """Load the config file and apply it; never raises.

        ``trigger`` names who asked, in every line the reload logs: ``watcher`` (the file
        changed), ``sighup``, or ``api`` (a direct call).

        The count follows the file's content, never the race between the two triggers:

        * one version of the file (its content) is attempted once: one edit counts exactly
          one success or one failure, whichever trigger reads it first; the other trigger,
          and a SIGHUP on the version last attempted, is no new attempt and is logged so;
        * the exception: a version whose attempt failed for a cause outside the file (a
          busy port at bind, an upstream pool that would not start) is tried again on SIGHUP.
        """
        if self.config_path is None:
            return False
        if self.draining:
            log.info("config reload skipped: the sidecar is draining", extra={"config": self.config_path})
            return False
        async with self._reload_lock:  # one reload at a time, the "already attempted" check included
            self._trigger = trigger  # named by every line this reload logs
            state = await asyncio.to_thread(self._stat_config)
            self._file_state = state  # the watcher does not try this version again
            content = state[-1] if state is not None else None
            retry = trigger != "watcher" and self._attempt_failed_outside  # SIGHUP or a direct call
            if content == self._attempted_content and not retry:
                outcome = "was applied" if self._attempt_succeeded else "failed"
                log.info(f"config file unchanged since its last reload attempt, which {outcome}; nothing to reload",
                         extra={"config": self.config_path})
                return self._attempt_succeeded
            self._attempted_content = content
            self._attempt_succeeded = self._attempt_failed_outside = False
            try:
                config = await asyncio.to_thread(load_config_file, self.config_path)
            except ConfigError as exc:
                return self._reload_failed(f"config reload rejected; keeping the active config: {exc}")
            try:
                applied = await self._apply_locked(config)
            except Exception as exc:  # a bug must not end the watcher: the next edit is still picked up
                log.exception("config reload failed", extra={"config": self.config_path})
                applied = self._reload_failed(f"config reload failed; keeping the active config: {exc}")
            self._attempt_succeeded = applied
            self._attempt_failed_outside = not applied and not self.draining  # the file itself was valid
            return applied

    def _reload_failed(self, message: str) -> bool:
        self.metrics.config_reloads.labels(result="failure").inc()
        log.error(message, extra={"config": self.config_path, "trigger": self._trigger,
                                  "details": {"result": "failure"}})
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

    async def apply(self, config: Config, trigger: str = "api") -> bool:
        """Swap in a validated config; unchanged state carries over.

        New and moved listeners are bound first: if one cannot bind, nothing has
        changed yet, the reload is rejected and the active config keeps serving.
        """
        async with self._reload_lock:
            self._trigger = trigger
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
        plan = plan_listeners({name: lst.slot.address for name, lst in self.listeners.items()}, config.listeners)
        bound: dict[str, _Listener] = {}
        for opening in plan.open_first:  # before anything closes: a failure here changes nothing
            try:
                bound[opening.name] = await self._open_listener(opening.name, opening.address, config.limits,
                                                                runtime)
            except OSError as exc:
                for listener in bound.values():
                    await listener.cleanup()
                await self._close_pools(started)
                return self._reload_failed(
                    f"config reload rejected; keeping the active config: listeners[{opening.index}].address: "
                    f"cannot bind {opening.address}: {exc.strerror or exc}")
        for name in plan.close:
            current = self.listeners.pop(name)
            await current.stop_accepting()  # in-flight requests finish in the background
            self._leaving.add(current)
            self._spawn(self._close_listener(current))
        self.runtime = runtime
        self._in_service(runtime)
        for name in plan.keep:
            slot = self.listeners[name].slot
            slot.router = runtime.routers[name]  # atomic swap; in-flight keep their route
            slot.limits = config.limits
        self.listeners.update(bound)
        failed = []
        for opening in plan.open_after:  # on a socket one of ours held until it stopped accepting, above
            try:
                self.listeners[opening.name] = await self._open_listener(opening.name, opening.address,
                                                                         config.limits, runtime)
            except OSError as exc:  # taken by someone else in between: not ready until a reload fixes it
                failed.append(f"listeners[{opening.index}].address: cannot bind {opening.address}: "
                              f"{exc.strerror or exc}")
        if runtime.retired_pools:
            self._retiring.update(runtime.retired_pools)
            self._spawn(self._retire(list(runtime.retired_pools)))
        if runtime.retired_redis is not None:  # `redis:` changed: the old client goes once in-flight finish
            self._spawn(self._close_later(runtime.retired_redis, config.drain.timeout))
        if failed:
            return self._reload_failed("config applied, but listeners are down (/readyz is 503): "
                                       + "; ".join(failed))
        self.metrics.config_reloads.labels(result="success").inc()
        changes = config_changes(old.config, config)
        log.info("config reloaded (%s): %s", self._trigger, describe_changes(changes),
                 extra={"config": runtime.version, "trigger": self._trigger,
                        "details": {"result": "success", **changes}})
        return True

    @staticmethod
    def _in_service(runtime: Runtime) -> None:
        """The runtime now serves: its new breakers' state series show them, endpoint lists are diffed in."""
        for breaker, breaker_metrics in runtime.new_breakers:
            breaker_metrics.show(breaker.state.value)
        runtime.new_breakers.clear()
        for pool, upstream_config in runtime.endpoint_updates:
            pool.reconfigure(upstream_config)
        runtime.endpoint_updates.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish_inflight(self, listeners: list[_Listener], timeout_s: float) -> None:
        """Wait until no request is in flight on ``listeners`` (and no retired pool is in use),
        for at most ``timeout_s`` or until a second stop signal."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        # Polled (only while draining or closing a listener) so the request path pays for no event.
        while (any(lst.edge.inflight for lst in listeners) or any(pool.users for pool in self._retiring)) \
                and loop.time() < deadline and not self._hurry.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def _close_listener(self, listener: _Listener) -> None:
        """A listener a reload moved or removed: closed once its last request (or tunnel) has ended.

        Unbounded on purpose: in-flight requests finish under the config they started with;
        only shutdown (drain) bounds them by ``drain.timeout``.
        """
        while listener.edge.inflight:  # noqa: ASYNC110 - polled only while a listener is leaving
            await asyncio.sleep(0.05)
        self._leaving.discard(listener)
        await listener.cleanup()

    @staticmethod
    async def _close_pools(pools: list[Any]) -> None:
        for pool in pools:
            with contextlib.suppress(Exception):
                await pool.close()

    @staticmethod
    async def _close_later(resource: Any, after_s: float) -> None:
        """A shared-state client a reload replaced: closed after the requests that may use it had their time."""
        await asyncio.sleep(after_s)
        with contextlib.suppress(Exception):
            await resource.close()

    async def _retire(self, pools: list[Any]) -> None:
        """Pools a reload replaced: each closes when the last request that uses it has ended."""
        waiting = list(pools)
        while waiting:
            for pool in [pool for pool in waiting if not pool.users]:
                waiting.remove(pool)
                self._retiring.discard(pool)
                with contextlib.suppress(Exception):
                    await pool.close()
            if waiting:
                await asyncio.sleep(0.05)

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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), drain.grace)  # a second signal cuts the grace short
        log.info("closing listeners; waiting up to %.1fs for in-flight requests", drain.timeout)
        for lst in self.listeners.values():
            await lst.stop_accepting()  # connections already open (or queued) keep being served
        # Listeners a reload moved away are still finishing requests, and their pools too.
        listeners = [*self.listeners.values(), *self._leaving]
        if not self._hurry.is_set():
            await asyncio.sleep(0.05)
        await self._finish_inflight(listeners, drain.timeout)
        await asyncio.gather(*(lst.cleanup() for lst in listeners))
        await self.stop()

    async def stop(self) -> None:
        for lst in [*self.listeners.values(), *self._leaving]:
            await lst.cleanup()
        for task in list(self._background):
            task.cancel()
        for up in self.runtime.upstreams.values():
            await up.pool.close()
        await self._close_pools(list(self._retiring))
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
        # (measured: about 10% less CPU per request).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        await stop.wait()
        await self.drain()
