"""Admin server: probes, metrics, the active config and runtime status.

Served on its own port (never a proxy port), by default on 127.0.0.1 only.
``/`` is the status page (``proxy.lifecycle.status_page``), fed by ``/status``.
``/healthz`` answers while the event loop runs; ``/readyz`` is 200 only while
every configured listener is bound and turns 503 the moment draining starts.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from proxy.config import to_builtins
from proxy.lifecycle.status_page import PAGE
from proxy.telemetry.breaker_events import iso_time

if TYPE_CHECKING:
    from proxy.lifecycle.sidecar import Sidecar

__all__ = ["build_admin_app", "redact"]

SIDECAR: web.AppKey[Sidecar] = web.AppKey("sidecar")
REDACTED = "[redacted]"


def redact(config: dict[str, Any]) -> dict[str, Any]:
    """Hide TLS file paths, matched header values and Redis credentials from /config."""
    for upstream in config.get("upstreams", {}).values():
        tls = upstream.get("tls") or {}
        for key in ("ca_file", "cert_file", "key_file"):
            if tls.get(key):
                tls[key] = REDACTED
    for listener in config.get("listeners", []):
        for route in listener.get("routes", []):
            headers = (route.get("match") or {}).get("headers")
            if headers:
                route["match"]["headers"] = {name: REDACTED for name in headers}
    redis = config.get("redis") or {}
    if "@" in (redis.get("url") or ""):  # redis://user:password@host: keep the host, drop the password
        scheme, _, rest = redis["url"].partition("://")
        redis["url"] = f"{scheme}://{REDACTED}@{rest.rpartition('@')[2]}"
    tracing = config.get("telemetry", {}).get("tracing", {})
    if tracing.get("endpoint"):
        parts = urlsplit(tracing["endpoint"])
        if "@" in parts.netloc:  # drop userinfo credentials, keep the scheme
            tracing["endpoint"] = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return config


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, indent=2, default=str), status=status,
                        content_type="application/json", headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    if sidecar.draining:
        return _json({"status": "draining"}, 503)
    if not sidecar.ready:
        return _json({"status": "starting"}, 503)
    unbound = sidecar.unbound_listeners()
    if unbound:  # a reload could not re-bind them: the app's calls to them would be refused
        return _json({"status": "listeners_down", "listeners": unbound}, 503)
    return _json({"status": "ready", "version": sidecar.runtime.version})


async def config_view(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    runtime = sidecar.runtime
    config = to_builtins(runtime.config)
    # The values in force, from the config, the OTEL_* variables or the defaults (not nulls).
    telemetry = config.setdefault("telemetry", {})
    settings = dict(sidecar.tracing.settings)
    telemetry["propagators"] = settings.pop("propagators")
    telemetry["service_name"] = sidecar.tracing.service_name
    telemetry["tracing"] = {**telemetry.get("tracing", {}), **settings}
    return _json({"version": runtime.version, "source": sidecar.config_path, "config": redact(config)})


async def status_view(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    data = sidecar.runtime.status(sidecar.clock)
    data["ready"] = sidecar.ready and not sidecar.draining and not sidecar.unbound_listeners()
    data["draining"] = sidecar.draining
    data["listeners"] = sidecar.listener_status()
    data["tasks"] = len(asyncio.all_tasks())
    data["time"] = iso_time(time.time())
    return _json(data)


async def status_page(request: web.Request) -> web.Response:
    """The self-contained status page; it refreshes itself from /status."""
    return web.Response(text=PAGE, content_type="text/html", headers={
        "Cache-Control": "no-store",
        # inline CSS and script only: nothing may load from elsewhere
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                                   "connect-src 'self'",
    })


async def metrics_view(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(sidecar.metrics.registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def build_admin_app(sidecar: Sidecar) -> web.Application:
    app = web.Application()
    app[SIDECAR] = sidecar
    app.router.add_get("/", status_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/config", config_view)
    app.router.add_get("/status", status_view)
    app.router.add_get("/metrics", metrics_view)
    return app
