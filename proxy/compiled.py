"""The request path's compiled modules: which they are, and which this process runs compiled.

``setup.py`` compiles the modules in ``COMPILED`` with mypyc when a C compiler
is at hand (ARCHITECTURE.md, "Compiled modules"); without one they run as
the Python they are.  This file is their one list: ``setup.py`` reads it
without importing the package, so it imports nothing but the standard library.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

__all__ = ["COMPILED", "STAMP", "cannot_compile", "in_place_build", "running_compiled", "source_digests", "stale"]

# Paths from the repository root, in the form mypyc takes them.
COMPILED: tuple[str, ...] = (
    "proxy/chain.py",
    "proxy/streams.py",
    "proxy/timers.py",
    "proxy/edge/bodies.py",
    "proxy/edge/exchange.py",
    "proxy/edge/guard.py",
    "proxy/edge/headers.py",
    "proxy/edge/listener.py",
    "proxy/edge/protocol.py",
    "proxy/edge/request.py",
    "proxy/edge/responses.py",
    "proxy/edge/routing.py",
    "proxy/policies/breaker_state.py",
    "proxy/policies/budget.py",
    "proxy/policies/bulkhead.py",
    "proxy/policies/circuit_breaker.py",
    "proxy/policies/deadline.py",
    "proxy/policies/rate_limit.py",
    "proxy/policies/retry.py",
    "proxy/policies/stale_resend.py",
    "proxy/policies/timeout.py",
    "proxy/policies/token_bucket.py",
    "proxy/policies/window.py",
    "proxy/telemetry/access_log.py",
    "proxy/telemetry/attempts.py",
    "proxy/telemetry/client_span.py",
    "proxy/telemetry/labels.py",
    "proxy/telemetry/lean.py",
    "proxy/telemetry/live.py",
    "proxy/telemetry/otlp_wire.py",
    "proxy/telemetry/propagation.py",
    "proxy/telemetry/request_trace.py",
    "proxy/telemetry/server_span.py",
    "proxy/upstream/call.py",
    "proxy/upstream/connection.py",
    "proxy/upstream/pool.py",
    "proxy/upstream/response.py",
)


def cannot_compile() -> str | None:
    """Why ``setup.py`` would install plain Python here, or None when it compiles."""
    if os.environ.get("OUTRIGGER_PURE_PYTHON", "") not in ("", "0"):
        return "OUTRIGGER_PURE_PYTHON is set"
    if sys.implementation.name != "cpython":
        return f"mypyc needs CPython, not {sys.implementation.name}"
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}) on PATH"
    include = sysconfig.get_path("include")
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python headers ({include}/Python.h; on Debian: python3-dev)"
    return None


def _module(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def running_compiled() -> int:
    """How many of ``COMPILED`` this interpreter imports (or has imported) as extension modules."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    count = 0
    for path in COMPILED:
        name = _module(path)
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else _origin(name)
        count += str(origin or "").endswith(suffixes)
    return count


def _origin(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return spec.origin if spec is not None else None


STAMP = "proxy/compiled-sources.json"  # written by setup.py when it compiles: each source's sha256


def source_digests(root: Path) -> dict[str, str]:
    """The sha256 of each of ``COMPILED``'s sources under ``root``."""
    return {path: hashlib.sha256((root / path).read_bytes()).hexdigest() for path in COMPILED}


def in_place_build(root: Path, path: str) -> list[Path]:
    """The extension modules an in-place build left beside ``path``, one of ``COMPILED`` (under ``root``)."""
    source = root / path
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [built for built in source.parent.glob(source.stem + ".*") if built.name.endswith(suffixes)]


def stale(root: Path) -> list[str]:
    """Sources under ``root`` that differ from what its in-place build compiled (none when nothing is built).

    Python imports an extension module before a ``.py`` of the same name, so after
    an edit the old code would run: ``./dev test`` rebuilds.
    """
    built = [path for path in COMPILED if in_place_build(root, path)]
    if not built:
        return []
    try:
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return built  # built by something that left no record: assume the worst
    current = source_digests(root)
    return [path for path in built if stamp.get(path) != current[path]]
