"""Build and start an in-process sidecar from a config dict (real sockets)."""

from __future__ import annotations

import copy
import random
from collections.abc import Awaitable, Callable
from typing import Any

import yaml

from proxy.clock import SystemClock
from proxy.config import Config, load_config
from proxy.lifecycle.sidecar import Sidecar
from proxy.telemetry.metrics import Metrics

# The `sidecar_factory` fixture (tests/conftest.py): a config dict (plus Sidecar keywords) -> a started Sidecar.
SidecarFactory = Callable[..., Awaitable[Sidecar]]


def base_config(upstream_url: str, **route_overrides: Any) -> dict[str, Any]:
    """One listener, one catch-all route to ``upstream_url``, ports chosen by the OS."""
    route: dict[str, Any] = {"name": "default", "match": {"path_prefix": "/"}, "upstream": "svc"}
    route.update(route_overrides)
    return {
        "version": 1,
        "admin": {"address": "127.0.0.1:0"},
        "drain": {"grace": "0s", "timeout": "2s"},
        "defaults": {
            "timeout": {"connect": "1s", "attempt": "2s", "total": "5s", "idle": "5s"},
            "retry": {"backoff": {"base": "1ms", "max": "5ms"}},
        },
        "upstreams": {"svc": {"url": upstream_url}},
        "listeners": [{"name": "main", "address": "127.0.0.1:0", "routes": [route]}],
        "telemetry": {"tracing": {"enabled": False}, "access_log": {"enabled": False}},
    }


def to_config(data: dict[str, Any]) -> Config:
    return load_config(yaml.safe_dump(copy.deepcopy(data)), env={})


async def start_sidecar(data: dict[str, Any], **kwargs: Any) -> Sidecar:
    kwargs.setdefault("metrics", Metrics(process_collectors=False))
    kwargs.setdefault("clock", SystemClock())
    kwargs.setdefault("rng", random.Random(7))
    sidecar = Sidecar(to_config(data), **kwargs)
    await sidecar.start()
    return sidecar
