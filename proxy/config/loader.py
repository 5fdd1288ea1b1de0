"""Load ``outrigger.yaml``: the steps of loading, in order, and the public entry points.

Every problem becomes a ``ConfigIssue`` carrying the exact path of the bad
value (``listeners[0].routes[1].retry.max_attempts``).  Sections are
converted one by one so that a single run reports every broken section, not
just the first.  The steps, each in its own module:

- ``source``: YAML text to plain data, ``${VAR}`` substituted;
- ``inherit``: each upstream's and route's effective policy blocks, merged raw;
- ``convert``: raw data to typed blocks (``types``), each error at its path;
- ``checks``: what spans fields or sections (using ``addresses`` and ``validators``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import msgspec
import yaml

from proxy.config.addresses import parse_address, redis_url_problem, same_socket
from proxy.config.checks import (
    UNROUTED,
    check_addresses,
    check_dead_letter,
    check_route,
    check_route_names,
    check_shared_state,
    check_upstream,
    dead_letter_dir_problem,
)
from proxy.config.convert import convert
from proxy.config.hints import unknown_key
from proxy.config.inherit import UPSTREAM_BLOCKS, route_blocks, upstream_blocks
from proxy.config.issues import ConfigError, ConfigIssue, path_key
from proxy.config.source import parse_document
from proxy.config.types import (
    AdminConfig,
    Config,
    DeadLetterConfig,
    DrainConfig,
    LimitsConfig,
    ListenerConfig,
    PolicyDefaults,
    RedisConfig,
    RouteConfig,
    TelemetryConfig,
    UpstreamConfig,
)
from proxy.config.units import Duration, Size
from proxy.config.validators import is_name

__all__ = ["UNROUTED", "ConfigError", "ConfigIssue", "config_hash", "dead_letter_dir_problem", "load_config",
           "load_config_file", "parse_address", "same_socket", "to_builtins"]

_SECTIONS: dict[str, type[Any]] = {
    "admin": AdminConfig, "drain": DrainConfig, "defaults": PolicyDefaults,
    "limits": LimitsConfig, "telemetry": TelemetryConfig,
}
_KNOWN_TOP = {"version", "listeners", "upstreams", "dead_letter", "redis", *_SECTIONS}
_ADMIN_ADDRESS_ENV = "OUTRIGGER_ADMIN_ADDRESS"
_BLOCK_TYPES = {field.name: field.type for field in msgspec.structs.fields(PolicyDefaults)}


def load_config(text: str, *, source: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    """Parse and validate a config document; raise ``ConfigError`` listing every issue."""
    issues: list[ConfigIssue] = []
    try:
        raw = parse_document(text, os.environ if env is None else env, issues)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([*issues, ConfigIssue(where, f"invalid YAML: {problem}")], source) from None
    if not isinstance(raw, dict):
        raise ConfigError([*issues, ConfigIssue("", "the config must be a YAML mapping")], source)
    if issues:  # an unset variable: what follows would only report its empty value again
        raise ConfigError(issues, source)
    admin_env = (os.environ if env is None else env).get(_ADMIN_ADDRESS_ENV)
    if admin_env and isinstance(raw.get("admin") or {}, dict) and "address" not in (raw.get("admin") or {}):
        # The container images and manifests set this to expose the probes to the kubelet
        # without every user config having to mention it; an explicit admin.address wins.
        raw["admin"] = {**(raw.get("admin") or {}), "address": admin_env}
    for key in raw:
        if key not in _KNOWN_TOP:
            issues.append(ConfigIssue(str(key), unknown_key(key, _KNOWN_TOP)))
    if "version" not in raw:
        issues.append(ConfigIssue("version", "missing; add `version: 1` at the top of the file"))
    elif raw.get("version") != 1 or isinstance(raw.get("version"), bool):
        issues.append(ConfigIssue("version", f"unsupported version {raw.get('version')!r}; expected 1"))
    sections: dict[str, Any] = {}
    for key, tp in _SECTIONS.items():
        value = convert(raw.get(key) or {}, tp, key, issues)
        if value is not None:
            sections[key] = value
    if raw.get("redis") is not None:  # optional, and its url has no default: not one of _SECTIONS
        redis = convert(raw["redis"], RedisConfig, "redis", issues)
        if redis is not None:
            problem = redis_url_problem(redis.url)
            if problem:
                issues.append(ConfigIssue("redis.url", problem))
            else:
                sections["redis"] = redis
    defaults_raw: dict[str, Any] = raw["defaults"] if isinstance(raw.get("defaults"), dict) else {}
    upstreams_raw: dict[str, Any] = raw["upstreams"] if isinstance(raw.get("upstreams"), dict) else {}
    upstreams = _upstreams(raw.get("upstreams"), defaults_raw, issues)
    # Routes inherit from defaults and upstreams: when those are broken, route errors would
    # only repeat them. Any other section's errors are reported alongside the routes'.
    if any(i.path.startswith(("line ", "defaults", "upstreams")) for i in issues):
        raise ConfigError(issues, source)
    listeners, shells = _listeners(raw.get("listeners"), defaults_raw, upstreams_raw, issues)
    spool = convert(raw["dead_letter"], DeadLetterConfig, "dead_letter", issues) \
        if raw.get("dead_letter") is not None else None
    check_dead_letter(spool, "dead_letter" in raw, listeners, issues)
    if spool is not None:
        sections["dead_letter"] = spool
    check_addresses(shells, sections.get("admin"), issues)
    check_route_names(raw.get("listeners"), issues)
    check_shared_state(listeners, raw.get("redis") is not None, issues)
    if issues:
        raise ConfigError(issues, source)
    return Config(version=1, listeners=tuple(listeners), upstreams=upstreams, **sections)


def _mapping(raw: Any, path: str, issues: list[ConfigIssue]) -> dict[str, Any] | None:
    """``raw`` when it is a mapping; else an issue at ``path``, and None."""
    if isinstance(raw, dict):
        return raw
    issues.append(ConfigIssue(path, f"expected a mapping, got {type(raw).__name__}"))
    return None


def _upstreams(raw: Any, defaults_raw: dict[str, Any], issues: list[ConfigIssue]) -> dict[str, UpstreamConfig]:
    result: dict[str, UpstreamConfig] = {}
    mapping = _mapping({} if raw is None else raw, "upstreams", issues)
    if mapping is None:
        return result
    if not mapping:
        issues.append(ConfigIssue("upstreams", "at least one upstream is required"))
    for name, body in mapping.items():
        path = f"upstreams.{path_key(name)}"
        if not is_name(name):
            issues.append(ConfigIssue(path, "upstream names may use letters, digits, '_', '.', '-' (1-64)"))
            continue
        upstream = convert(body, UpstreamConfig, path, issues)
        if upstream is None:
            continue
        check_upstream(upstream, path, issues)
        merged = upstream_blocks(defaults_raw, body)
        blocks = {block: convert(merged[block], _BLOCK_TYPES[block], f"{path}.{block}", issues)
                  for block in UPSTREAM_BLOCKS}
        if all(v is not None for v in blocks.values()):
            result[name] = msgspec.structs.replace(upstream, **blocks)
    return result


def _listeners(raw: Any, defaults_raw: dict[str, Any], upstreams_raw: dict[str, Any],
               issues: list[ConfigIssue]) -> tuple[list[ListenerConfig], list[tuple[int, ListenerConfig]]]:
    """The valid listeners, and every listener whose own keys are valid, with its index.

    The second list is for the address and name checks: a listener whose routes are
    broken still takes its port, and an error in it must name its own index.
    """
    listeners: list[ListenerConfig] = []
    shells: list[tuple[int, ListenerConfig]] = []
    if not isinstance(raw, list) or not raw:
        issues.append(ConfigIssue("listeners", "expected a non-empty list of listeners"))
        return listeners, shells
    for li, body in enumerate(raw):
        path = f"listeners[{li}]"
        body_map = _mapping({} if body is None else body, path, issues)
        if body_map is None:
            continue
        shell = convert({**body_map, "routes": []}, ListenerConfig, path, issues)
        if shell is not None:
            shells.append((li, shell))
        routes_raw = body_map.get("routes")
        if not isinstance(routes_raw, list) or not routes_raw:
            issues.append(ConfigIssue(f"{path}.routes", "expected a non-empty list of routes"))
            continue
        routes: list[RouteConfig] = []
        for ri, route_raw in enumerate(routes_raw):
            route = _route(route_raw, f"{path}.routes[{ri}]", defaults_raw, upstreams_raw, issues)
            if route is not None:
                routes.append(route)
        if shell is not None and len(routes) == len(routes_raw):
            listeners.append(msgspec.structs.replace(shell, routes=tuple(routes)))
    return listeners, shells


def _route(raw: Any, path: str, defaults_raw: dict[str, Any], upstreams_raw: dict[str, Any],
           issues: list[ConfigIssue]) -> RouteConfig | None:
    """Convert the route's effective (merged) form; its own keys keep their true paths."""
    written = _mapping(raw, path, issues)
    if written is None:
        return None
    upstream_name = written.get("upstream")
    upstream_raw = upstreams_raw.get(upstream_name) if isinstance(upstream_name, str) else None
    route = convert(route_blocks(written, defaults_raw, upstream_raw), RouteConfig, path, issues)
    if route is None:
        return None
    before = len(issues)
    check_route(route, written, path, upstream_raw is not None, issues)
    return route if len(issues) == before else None


def load_config_file(path: str, *, env: Mapping[str, str] | None = None) -> Config:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {path}: {exc.strerror or exc}")], path) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue("", f"{path} is not UTF-8 text")], path) from None
    return load_config(text, source=path, env=env)


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Duration):
        return float(obj)
    if isinstance(obj, Size):
        return int(obj)
    raise NotImplementedError(type(obj).__name__)


def to_builtins(config: Config) -> Any:
    return msgspec.to_builtins(config, enc_hook=_enc_hook)


def config_hash(config: Config) -> str:
    """Stable short hash of the effective config: the version shown by /config."""
    return hashlib.sha256(msgspec.json.encode(to_builtins(config), order="sorted")).hexdigest()[:16]
