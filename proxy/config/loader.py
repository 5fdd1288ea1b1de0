"""Load ``outrigger.yaml``: YAML and env substitution (``source``), typed conversion, checks.

Every problem becomes a ``ConfigIssue`` carrying the exact path of the bad
value (``listeners[0].routes[1].retry.max_attempts``).  Sections are
converted one by one so that a single run reports every broken section, not
just the first.  Route policy blocks are resolved here, once: a route's
effective block is ``defaults`` < upstream block (breaker, concurrency) <
the route's own keys, merged key by key; ``null`` switches an inherited
optional block (``rate_limit``, ``fallback``) off for that route.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import ssl
import typing
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import yaml

from proxy.config.hints import block_expected, field_named, hint, unknown_key
from proxy.config.issues import ConfigError, ConfigIssue, join_path
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
from proxy.config.units import Duration, Size, decode_hook
from proxy.upstream.tls import client_context

__all__ = ["UNROUTED", "ConfigError", "ConfigIssue", "config_hash", "dead_letter_dir_problem", "load_config",
           "load_config_file", "parse_address", "same_socket"]

T = TypeVar("T")
_ROUTE_BLOCKS = ("timeout", "retry", "circuit_breaker", "rate_limit", "fallback")
_UPSTREAM_BLOCKS = ("circuit_breaker", "concurrency")
_SECTIONS: dict[str, type[Any]] = {
    "admin": AdminConfig, "drain": DrainConfig, "defaults": PolicyDefaults,
    "limits": LimitsConfig, "telemetry": TelemetryConfig,
}
_KNOWN_TOP = {"version", "listeners", "upstreams", "dead_letter", "redis", *_SECTIONS}
_ADMIN_ADDRESS_ENV = "OUTRIGGER_ADMIN_ADDRESS"
UNROUTED = "none"  # the route (and upstream) label of requests no route matched
_WILDCARDS = frozenset({"0.0.0.0", "::", "*"})
_LOOPBACK = frozenset({"127.0.0.1", "::1"})
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`")


_join = join_path


def _struct_in(tp: Any) -> type[msgspec.Struct] | None:
    """The config block type ``tp`` is (``Block`` or ``Block | None``), else None."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    structs = [arg for arg in typing.get_args(tp) if isinstance(arg, type) and issubclass(arg, msgspec.Struct)]
    return structs[0] if len(structs) == 1 and type(None) in typing.get_args(tp) else None


def _convert(raw: Any, tp: type[T], path: str, issues: list[ConfigIssue]) -> T | None:
    """msgspec.convert with the error path rewritten relative to ``path``.

    A block is checked key by key first, so that every bad key of it is
    reported, not only the first one msgspec meets; checks across keys
    (``attempt`` longer than ``total``) run once each key is valid.
    """
    struct = _struct_in(tp)
    if struct is not None and raw is not None and not isinstance(raw, dict):
        issues.append(ConfigIssue(path, block_expected(struct, raw)))  # `timeout: 5s`
        return None
    if struct is not None and isinstance(raw, dict):
        fields = {field.encode_name: field for field in msgspec.structs.fields(struct)}
        found = len(issues)
        for key, value in raw.items():
            field = fields.get(key)
            if field is None:
                issues.append(ConfigIssue(_join(path, str(key)), unknown_key(key, fields)))
            else:
                _convert(value, field.type, _join(path, str(key)), issues)
        if len(issues) > found:
            return None
    try:
        return msgspec.convert(raw, tp, dec_hook=decode_hook)
    except msgspec.ValidationError as exc:
        text = str(exc)
        message, _, where = text.rpartition(" - at `")
        if not message:  # the error is at the converted object itself
            message, where = text, "$"
        where = where.rstrip("`")
        sub = where[2:] if where.startswith("$.") else where.lstrip("$")
        unknown = _UNKNOWN.fullmatch(message)
        if unknown:
            sub, message = _join(sub, unknown[1]), "unknown key"
        elif not sub and struct is not None:
            sub = field_named(message, struct) or ""  # a block's own check about one of its keys
        issues.append(ConfigIssue(_join(path, sub), hint(message, tp)))
        return None


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError when malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"invalid address {address!r}; expected host:port")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"invalid port {port} in {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    return host, port


def _check_url(url: str) -> str | None:
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        return f"the upstream url must not contain whitespace or control characters: {url!r}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"unsupported scheme in {url!r}; use http:// or https://"
    if not parts.hostname:
        return f"missing host in {url!r}"
    if "@" in parts.netloc:
        return ("credentials in the upstream url are not supported (they would not be sent); "
                "let the app send its Authorization header")
    if parts.query or parts.fragment:
        return f"the upstream url may carry a path prefix but no query or fragment: {url!r}"
    try:
        _ = parts.port
    except ValueError:
        return f"invalid port in {url!r}"
    return None


def _merge(base: Any, override: Any) -> Any:
    """Key-by-key merge of raw YAML mappings; ``override`` wins on leaves."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base.get(key), value) if key in base else value
        return merged
    return override


def _as_mapping(raw: Any, path: str, issues: list[ConfigIssue]) -> dict[str, Any] | None:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        issues.append(ConfigIssue(path, f"expected a mapping, got {type(raw).__name__}"))
        return None
    return raw


def _upstreams(raw: Any, defaults_raw: dict[str, Any], issues: list[ConfigIssue]) -> dict[str, UpstreamConfig]:
    result: dict[str, UpstreamConfig] = {}
    mapping = _as_mapping(raw, "upstreams", issues)
    if mapping is None:
        return result
    if not mapping:
        issues.append(ConfigIssue("upstreams", "at least one upstream is required"))
    for name, body in mapping.items():
        path = f"upstreams.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            issues.append(ConfigIssue(path, "upstream names may use letters, digits, '_', '.', '-' (1-64)"))
            continue
        upstream = _convert(body, UpstreamConfig, path, issues)
        if upstream is None:
            continue
        problem = _check_url(upstream.url)
        if problem:
            issues.append(ConfigIssue(f"{path}.url", problem))
        missing = False
        for key in ("ca_file", "cert_file", "key_file"):
            file = getattr(upstream.tls, key)
            if file is not None and not os.path.isfile(file):
                issues.append(ConfigIssue(f"{path}.tls.{key}", f"file not found: {file}"))
                missing = True
        if not missing:
            _check_tls_files(upstream, path, issues)
        _check_endpoints(upstream, path, issues)
        # Effective per-upstream blocks: defaults < upstream.
        blocks: dict[str, Any] = {}
        for block in _UPSTREAM_BLOCKS:
            merged = _merge(defaults_raw.get(block, {}), body.get(block) or {})
            blocks[block] = _convert(merged, _block_type(block), path + "." + block, issues)
        if all(v is not None for v in blocks.values()):
            result[name] = msgspec.structs.replace(upstream, **blocks)
    return result


def _check_endpoints(upstream: UpstreamConfig, path: str, issues: list[ConfigIssue]) -> None:
    """Static endpoint addresses, discovery nameservers and preconnect, each error at its own key."""
    if upstream.endpoints is not None:
        if not upstream.endpoints:
            issues.append(ConfigIssue(f"{path}.endpoints", "empty list; list at least one host:port or leave "
                                                            "endpoints out to use the url's host"))
        if upstream.discovery is not None:
            issues.append(ConfigIssue(f"{path}.discovery", "endpoints and discovery exclude each other: a static "
                                                            "list is never re-resolved"))
        for index, address in enumerate(upstream.endpoints):
            try:
                if parse_address(address)[1] == 0:
                    raise ValueError(f"port 0 in {address!r}: an endpoint needs the port it listens on")
            except ValueError as exc:
                issues.append(ConfigIssue(f"{path}.endpoints[{index}]", str(exc)))
        if len(set(upstream.endpoints)) != len(upstream.endpoints):
            issues.append(ConfigIssue(f"{path}.endpoints", "lists the same address twice"))
    if upstream.discovery is not None:
        for index, address in enumerate(upstream.discovery.nameservers or ()):
            try:
                parse_address(address)
            except ValueError as exc:
                issues.append(ConfigIssue(f"{path}.discovery.nameservers[{index}]", str(exc)))
    if upstream.preconnect > upstream.max_connections:
        issues.append(ConfigIssue(f"{path}.preconnect", f"{upstream.preconnect} is larger than max_connections "
                                                         f"({upstream.max_connections})"))


def _check_tls_files(upstream: UpstreamConfig, path: str, issues: list[ConfigIssue]) -> None:
    """Build the upstream's TLS context as its pool will, so that a bad file is an error here, with its path."""
    tls = upstream.tls
    if tls.ca_file is None and tls.cert_file is None:
        return  # nothing of the user's to load (building a context costs ~15 ms of system roots)
    if tls.ca_file is not None and tls.verify:
        try:
            client_context(msgspec.structs.replace(tls, cert_file=None, key_file=None))
        except (ssl.SSLError, OSError, ValueError) as exc:
            issues.append(ConfigIssue(f"{path}.tls.ca_file", f"not a PEM CA certificate file ({exc})"))
            return
    if tls.cert_file is None:
        return
    try:
        client_context(tls)
    except (ssl.SSLError, OSError, ValueError) as exc:
        issues.append(ConfigIssue(f"{path}.tls.cert_file",
                                  f"cert_file and key_file are not a matching PEM certificate and key ({exc})"))


def _block_type(block: str) -> Any:
    return {f.name: f.type for f in msgspec.structs.fields(PolicyDefaults)}[block]


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
        body_map = _as_mapping(body, path, issues)
        if body_map is None:
            continue
        shell = _convert({**body_map, "routes": []}, ListenerConfig, path, issues)
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
    if not isinstance(raw, dict):
        issues.append(ConfigIssue(path, f"expected a mapping, got {type(raw).__name__}"))
        return None
    upstream_name = raw.get("upstream")
    upstream_raw = upstreams_raw.get(upstream_name) if isinstance(upstream_name, str) else None
    merged = dict(raw)
    for block in _ROUTE_BLOCKS:
        inherited = defaults_raw.get(block)
        if block == "circuit_breaker" and isinstance(upstream_raw, dict):
            inherited = _merge(inherited, upstream_raw.get(block))
        if block in raw:
            merged[block] = None if raw[block] is None else _merge(inherited or {}, raw[block])
        elif inherited is not None:
            merged[block] = inherited
    route = _convert(merged, RouteConfig, path, issues)
    if route is None:
        return None
    before = len(issues)
    if upstream_raw is None:
        issues.append(ConfigIssue(f"{path}.upstream", f"unknown upstream '{route.upstream}'"))
    breaker_raw = raw.get("circuit_breaker")
    if isinstance(breaker_raw, dict) and breaker_raw and breaker_raw.get("scope") != "route":
        issues.append(ConfigIssue(
            f"{path}.circuit_breaker",
            "per-route breaker settings need 'scope: route'; the upstream-scoped breaker is configured "
            "under defaults or upstreams.<name>.circuit_breaker"))
    if route.rewrite_prefix is not None and any(seg in ("..", ".") for seg in route.rewrite_prefix.split("/")):
        issues.append(ConfigIssue(f"{path}.rewrite_prefix", "must not contain '.' or '..' segments"))
    for name in (route.match.headers or {}):
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            issues.append(ConfigIssue(f"{path}.match.headers.{name}", "invalid header name"))
    return route if len(issues) == before else None


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
        value = _convert(raw.get(key) or {}, tp, key, issues)
        if value is not None:
            sections[key] = value
    if raw.get("redis") is not None:  # optional, and its url has no default: not one of _SECTIONS
        redis = _convert(raw["redis"], RedisConfig, "redis", issues)
        if redis is not None and (problem := _check_redis_url(redis.url)) is None:
            sections["redis"] = redis
        elif redis is not None:
            issues.append(ConfigIssue("redis.url", problem or ""))
    defaults_raw: dict[str, Any] = raw["defaults"] if isinstance(raw.get("defaults"), dict) else {}
    upstreams_raw: dict[str, Any] = raw["upstreams"] if isinstance(raw.get("upstreams"), dict) else {}
    upstreams = _upstreams(raw.get("upstreams"), defaults_raw, issues)
    # Routes inherit from defaults and upstreams: when those are broken, route errors would
    # only repeat them. Any other section's errors are reported alongside the routes'.
    if any(i.path.startswith(("line ", "defaults", "upstreams")) for i in issues):
        raise ConfigError(issues, source)
    listeners, shells = _listeners(raw.get("listeners"), defaults_raw, upstreams_raw, issues)
    dead_letter = _dead_letter(raw, listeners, issues)
    if dead_letter is not None:
        sections["dead_letter"] = dead_letter
    _check_addresses(shells, sections.get("admin"), issues)
    _check_route_names(raw.get("listeners"), issues)
    _check_shared_state(listeners, raw.get("redis") is not None, issues)
    if issues:
        raise ConfigError(issues, source)
    return Config(version=1, listeners=tuple(listeners), upstreams=upstreams, **sections)


def _dead_letter(raw: dict[str, Any], listeners: list[ListenerConfig],
                 issues: list[ConfigIssue]) -> DeadLetterConfig | None:
    """The spool block, its directory checked by really writing there; routes that spool need it."""
    spool = _convert(raw["dead_letter"], DeadLetterConfig, "dead_letter", issues) \
        if raw.get("dead_letter") is not None else None
    if spool is not None:
        problem = dead_letter_dir_problem(spool.dir)
        if problem:
            issues.append(ConfigIssue("dead_letter.dir", problem))
    elif "dead_letter" not in raw:
        for li, listener in enumerate(listeners):
            for ri, route in enumerate(listener.routes):
                if route.dead_letter is not None:
                    issues.append(ConfigIssue(f"listeners[{li}].routes[{ri}].dead_letter",
                                              "needs the top-level dead_letter.dir (the spool) to be configured"))
    return spool


def dead_letter_dir_problem(directory: str) -> str | None:
    """Why the spool cannot live in ``directory`` (missing, not a directory, not writable), or None."""
    if not os.path.isdir(directory):
        return f"directory not found: {directory}" if not os.path.exists(directory) else \
            f"not a directory: {directory}"
    probe = os.path.join(directory, f".outrigger-probe-{os.getpid()}")
    try:  # os.access would say yes to root on a read-only mount: write for real
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"not writable: {directory} ({exc.strerror or exc})"
    return None


def _check_addresses(listeners: list[tuple[int, ListenerConfig]], admin: AdminConfig | None,
                     issues: list[ConfigIssue]) -> None:
    seen: dict[str, str] = {}
    entries = [("admin.address", admin.address)] if admin else []
    entries += [(f"listeners[{i}].address", lst.address) for i, lst in listeners]
    names: set[str] = set()
    for i, lst in listeners:
        if lst.name in names:
            issues.append(ConfigIssue(f"listeners[{i}].name", f"duplicate listener name '{lst.name}'"))
        names.add(lst.name)
    for path, address in entries:
        try:
            parse_address(address)
        except ValueError as exc:
            issues.append(ConfigIssue(path, str(exc)))
            continue
        clash = next((other for other_address, other in seen.items() if same_socket(address, other_address)), None)
        if clash is not None:
            issues.append(ConfigIssue(path, f"address {address} is already used by {clash}"))
        seen.setdefault(address, path)


def _check_redis_url(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return f"unsupported scheme in {url!r}; use redis:// or rediss:// (TLS)"
    if not parts.hostname:
        return f"missing host in {url!r}"
    try:
        _ = parts.port
    except ValueError:
        return f"invalid port in {url!r}"
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return f"the path of {url!r} must be a database number, like /0"
    return None


def _check_shared_state(listeners: list[ListenerConfig], has_redis: bool, issues: list[ConfigIssue]) -> None:
    """What needs the shared store must have one; global limits use what they support."""
    for li, listener in enumerate(listeners):
        for ri, route in enumerate(listener.routes):
            path = f"listeners[{li}].routes[{ri}]"
            limit = route.rate_limit
            if limit is not None and limit.scope == "global":
                if not has_redis:
                    issues.append(ConfigIssue(f"{path}.rate_limit.scope",
                                              "scope: global needs a top-level redis.url"))
                if limit.mode == "queue":
                    issues.append(ConfigIssue(f"{path}.rate_limit.mode",
                                              "mode: queue is not supported with scope: global; use reject"))
            if route.idempotency is not None and route.idempotency.store == "redis" and not has_redis:
                issues.append(ConfigIssue(f"{path}.idempotency.store", "store: redis needs a top-level redis.url"))


def _check_route_names(raw_listeners: Any, issues: list[ConfigIssue]) -> None:
    """Route names are the `route` label of every metric and span: unique across listeners, and
    never "none", the label of requests no route matched.  Checked on the names as written, so a
    route with other errors still takes part."""
    seen: dict[str, str] = {}
    for li, listener in enumerate(raw_listeners if isinstance(raw_listeners, list) else []):
        routes = listener.get("routes") if isinstance(listener, dict) else None
        for ri, route in enumerate(routes if isinstance(routes, list) else []):
            name = route.get("name") if isinstance(route, dict) else None
            if not isinstance(name, str):
                continue
            path = f"listeners[{li}].routes[{ri}]"
            if name == UNROUTED:
                issues.append(ConfigIssue(f"{path}.name", f"route name '{UNROUTED}' is reserved for requests "
                                                          "no route matched"))
            elif name in seen:
                where = seen[name]
                issues.append(ConfigIssue(f"{path}.name", f"duplicate route name '{name}'" + (
                    "" if where.startswith(f"listeners[{li}].") else
                    f" (also {where}; route names label metrics, so they are unique across listeners)")))
            seen.setdefault(name, path)


def same_socket(a: str, b: str) -> bool:
    """Whether listening on ``a`` and on ``b`` would take the same port (port 0 never clashes)."""
    host_a, port_a = parse_address(a)
    host_b, port_b = parse_address(b)
    if port_a != port_b or port_a == 0:
        return False
    if host_a == host_b or host_a in _WILDCARDS or host_b in _WILDCARDS:
        return True
    # `localhost` binds every loopback address it resolves to (127.0.0.1 and often ::1).
    return (host_a == "localhost" and host_b in _LOOPBACK) or (host_b == "localhost" and host_a in _LOOPBACK)


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
