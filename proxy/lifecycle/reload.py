"""Hot reload: the config file watcher, SIGHUP and ``apply``.

``Reloader`` loads the file when it changes (polled every ``watch_interval_s``) or on
SIGHUP, builds the new ``Runtime`` with the old one's state carried over, binds new and
moved listeners (``proxy.lifecycle.plan`` decides which) and swaps the runtime in.  A
reload binds before it closes anything, so one listener that cannot bind rejects it and
the active config keeps serving.  Admin, telemetry and the parser limits are fixed at
start: a reload keeps them as they are (``effective``), and ``/config`` shows the
settings in effect.

It sees the sidecar through ``ReloadHost``; what the reload replaced goes to ``Retiring``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from typing import Any, Protocol

import msgspec

from proxy.app import Runtime
from proxy.config import Config, ConfigError, LimitsConfig, load_config_file
from proxy.lifecycle.listeners import Listener
from proxy.lifecycle.plan import plan_listeners
from proxy.lifecycle.retiring import Retiring, close_quietly
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.operator_log import config_changes, describe_changes

__all__ = ["ConfigFile", "ReloadHost", "Reloader", "effective", "file_state"]

log = logging.getLogger("outrigger")

FileState = tuple[Any, ...]  # mtime, inode, size and the digest of the content, last


class ReloadHost(Protocol):
    """The sidecar as a reload sees it (``proxy.lifecycle.sidecar.Sidecar``)."""

    listeners: dict[str, Listener]  # the bound ones, by name

    @property
    def runtime(self) -> Runtime: ...

    @property
    def draining(self) -> bool: ...

    def runtime_for(self, config: Config, previous: Runtime) -> Runtime: ...

    def put_in_service(self, runtime: Runtime) -> None:
        """Make ``runtime`` the one that serves."""

    async def open_listener(self, name: str, address: str, limits: LimitsConfig, runtime: Runtime) -> Listener: ...


def file_state(path: str) -> FileState | None:
    """What tells one version of the file from another; None when it cannot be read."""
    try:
        st = os.stat(path)  # follows the ConfigMap ..data symlink swap
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size, digest)


class ConfigFile:
    """Which version of the file the reloads have seen and attempted, and how that went.

    The count follows the file's content, never the race between the two triggers:

    * one version of the file (its content) is attempted once: one edit counts exactly
      one success or one failure, whichever trigger reads it first; the other trigger,
      and a SIGHUP on the version last attempted, is no new attempt;
    * the exception: a version whose attempt failed for a cause outside the file (a
      busy port at bind, an upstream pool that would not start) is tried again on SIGHUP.
    """

    def __init__(self) -> None:
        self.seen: FileState | None = None  # the file as last read: the watcher reloads when it differs
        self.attempted: str | None = None  # the content last attempted (its digest)
        self.succeeded = True
        self.failed_outside = False  # the attempt failed for a cause outside the file: SIGHUP retries

    def started(self, state: FileState | None) -> None:
        """The version the sidecar started with: as good as attempted, and applied."""
        self.seen = state
        self.attempted = state[-1] if state is not None else None

    def changed(self, state: FileState | None) -> bool:
        """Whether the watcher should reload: the file is readable and not as last read."""
        return state is not None and state != self.seen

    def begin(self, state: FileState | None, trigger: str) -> bool:
        """Record the file as read for a reload; whether this is a new attempt."""
        self.seen = state  # the watcher does not try this version again
        content = state[-1] if state is not None else None
        retry = trigger != "watcher" and self.failed_outside  # SIGHUP or a direct call
        if content == self.attempted and not retry:
            return False
        self.attempted = content
        self.succeeded = self.failed_outside = False
        return True

    def finish(self, applied: bool, *, draining: bool) -> None:
        self.succeeded = applied
        self.failed_outside = not applied and not draining  # the file itself was valid


def _parser_limits(config: Config) -> tuple[float, ...]:
    """The limits fixed into a listener's HTTP parser when it binds."""
    limits = config.limits
    return (limits.max_header_bytes, limits.max_headers, limits.header_read_timeout)


def effective(new: Config, active: Config) -> Config:
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


async def _discard(runtime: Runtime, active: Runtime) -> None:
    """What a rejected reload built for ``runtime`` and ``active`` does not use: closed, so no thread
    or heartbeat lingers."""
    spool = runtime.spool
    if spool is not None and spool is not active.spool:
        spool.stop()  # on the loop; nothing was ever submitted to it
        await asyncio.to_thread(spool.close)
    if runtime.redis is not None and runtime.redis is not active.redis:
        await runtime.redis.close()
    if active.redis is not None:  # a global limit built for the rejected config started a heartbeat here
        await active.redis.retain(active.global_limits())


class Reloader:
    def __init__(self, host: ReloadHost, retiring: Retiring, metrics: Metrics, *, config_path: str | None,
                 watch_interval_s: float) -> None:
        self._host = host
        self._retiring = retiring
        self._metrics = metrics
        self.config_path = config_path
        self._watch_interval = watch_interval_s
        self._watch_task: asyncio.Task[None] | None = None
        self._file = ConfigFile()
        self._lock = asyncio.Lock()
        self._trigger = "api"  # what started the reload under way: sighup, watcher or api

    def start(self) -> None:
        """Take the file as it is now as attempted (it is what started) and watch it."""
        if self.config_path is None:
            return
        self._file.started(file_state(self.config_path))
        if self._watch_interval > 0:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        """No reload after this one: a reload under way finishes first; later ones see the host draining."""
        async with self._lock:
            if self._watch_task is not None:
                self._watch_task.cancel()

    async def _watch(self) -> None:
        assert self.config_path is not None
        while True:
            await asyncio.sleep(self._watch_interval)
            state = await asyncio.to_thread(file_state, self.config_path)
            if self._file.changed(state):
                await self.reload_from_file(trigger="watcher")

    async def reload_from_file(self, trigger: str = "api") -> bool:
        """Load the config file and apply it; never raises.

        ``trigger`` names who asked, in every line the reload logs: ``watcher`` (the file
        changed), ``sighup``, or ``api`` (a direct call).  Whether a version of the file is
        attempted again is ``ConfigFile``'s rule.
        """
        if self.config_path is None:
            return False
        if self._host.draining:
            log.info("config reload skipped: the sidecar is draining", extra={"config": self.config_path})
            return False
        async with self._lock:  # one reload at a time, the "already attempted" check included
            self._trigger = trigger  # named by every line this reload logs
            file = self._file
            if not file.begin(await asyncio.to_thread(file_state, self.config_path), trigger):
                outcome = "was applied" if file.succeeded else "failed"
                log.info(f"config file unchanged since its last reload attempt, which {outcome}; nothing to reload",
                         extra={"config": self.config_path})
                return file.succeeded
            try:
                config = await asyncio.to_thread(load_config_file, self.config_path)
            except ConfigError as exc:
                return self._failed(f"config reload rejected; keeping the active config: {exc}")
            try:
                applied = await self._apply_locked(config)
            except Exception as exc:  # a bug must not end the watcher: the next edit is still picked up
                log.exception("config reload failed", extra={"config": self.config_path})
                applied = self._failed(f"config reload failed; keeping the active config: {exc}")
            file.finish(applied, draining=self._host.draining)
            return applied

    async def apply(self, config: Config, trigger: str = "api") -> bool:
        """Swap in a validated config; unchanged state carries over.

        New and moved listeners are bound first: if one cannot bind, nothing has
        changed yet, the reload is rejected and the active config keeps serving.
        """
        async with self._lock:
            self._trigger = trigger
            return await self._apply_locked(config)

    def _failed(self, message: str) -> bool:
        self._metrics.config_reloads.labels(result="failure").inc()
        log.error(message, extra={"config": self.config_path, "trigger": self._trigger,
                                  "details": {"result": "failure"}})
        return False

    async def _apply_locked(self, config: Config) -> bool:
        host = self._host
        if host.draining:
            return self._failed("config reload skipped: the sidecar is draining")
        old = host.runtime
        config = effective(config, old.config)
        try:
            runtime = host.runtime_for(config, old)
        except Exception as exc:
            if old.redis is not None:  # a global limit built before the failure started a heartbeat here
                await old.redis.retain(old.global_limits())
            return self._failed(f"config reload failed while building the runtime: {exc}")
        try:
            for pool in runtime.new_pools:
                await pool.start()
        except Exception as exc:
            await close_quietly(runtime.new_pools)
            await _discard(runtime, old)
            return self._failed(f"config reload failed while starting upstream pools: {exc}")
        started, runtime.new_pools = runtime.new_pools, []
        plan = plan_listeners({name: lst.slot.address for name, lst in host.listeners.items()}, config.listeners)
        bound: dict[str, Listener] = {}
        for opening in plan.open_first:  # before anything closes: a failure here changes nothing
            try:
                bound[opening.name] = await host.open_listener(opening.name, opening.address, config.limits,
                                                               runtime)
            except OSError as exc:
                for listener in bound.values():
                    await listener.cleanup()
                await close_quietly(started)
                await _discard(runtime, old)
                return self._failed(
                    f"config reload rejected; keeping the active config: listeners[{opening.index}].address: "
                    f"cannot bind {opening.address}: {exc.strerror or exc}")
        for name in plan.close:
            current = host.listeners.pop(name)
            await current.stop_accepting()  # in-flight requests finish in the background
            self._retiring.listener(current)
        host.put_in_service(runtime)
        for name in plan.keep:
            slot = host.listeners[name].slot
            slot.router = runtime.routers[name]  # atomic swap; in-flight keep their route
            slot.limits = config.limits
        host.listeners.update(bound)
        failed = []
        for opening in plan.open_after:  # on a socket one of ours held until it stopped accepting, above
            try:
                host.listeners[opening.name] = await host.open_listener(opening.name, opening.address,
                                                                        config.limits, runtime)
            except OSError as exc:  # taken by someone else in between: not ready until a reload fixes it
                failed.append(f"listeners[{opening.index}].address: cannot bind {opening.address}: "
                              f"{exc.strerror or exc}")
        if runtime.retired_pools:
            self._retiring.retire_pools(runtime.retired_pools)
        if runtime.retired_redis is not None:  # `redis:` changed: the old client goes once in-flight finish
            self._retiring.client(runtime.retired_redis, config.drain.timeout)
        if runtime.redis is not None:  # a global limit the reload removed: its heartbeat stops
            await runtime.redis.retain(runtime.global_limits())
        if runtime.retired_spool is not None:  # `dead_letter:` changed or went: flushed, its thread ended
            self._retiring.spool(runtime.retired_spool, runtime.spool)
        if failed:
            return self._failed("config applied, but listeners are down (/readyz is 503): " + "; ".join(failed))
        self._metrics.config_reloads.labels(result="success").inc()
        changes = config_changes(old.config, config)
        log.info("config reloaded (%s): %s", self._trigger, describe_changes(changes),
                 extra={"config": runtime.version, "trigger": self._trigger,
                        "details": {"result": "success", **changes}})
        return True
