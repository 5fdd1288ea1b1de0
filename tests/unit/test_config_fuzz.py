"""Fuzzing the config loader: any document loads or fails with a ConfigError that has a path."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.__main__ import main
from proxy.config import Config, ConfigError, load_config

KEYS = [
    "version", "admin", "address", "drain", "grace", "timeout", "defaults", "upstreams", "listeners", "routes",
    "name", "match", "path_prefix", "methods", "headers", "upstream", "rewrite_prefix", "retry", "max_attempts",
    "retry_on", "backoff", "base", "max", "jitter", "budget", "ratio", "circuit_breaker", "scope", "rate_limit",
    "requests_per_second", "burst", "key", "header", "concurrency", "max_active", "fallback", "status", "url",
    "tls", "verify", "limits", "telemetry", "tracing", "connect", "attempt", "total", "idle", "min", "open_duration",
    "buffer_limit", "svc", "bogus",
]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["250ms", "2s", "1m", "-1s", "64KiB", "http://127.0.0.1:8080", "/", "GET", "full", "route",
                     "127.0.0.1:0", "nan", "", "${NOPE}", "x" * 70]),
    st.text(max_size=12),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(KEYS), children, max_size=6),
    ),
    max_leaves=40,
)


def _valid_base() -> dict[str, Any]:
    return {
        "version": 1,
        "upstreams": {"svc": {"url": "http://127.0.0.1:8080"}},
        "listeners": [{"name": "l", "address": "127.0.0.1:0", "routes": [{"name": "r", "upstream": "svc"}]}],
    }


def _check(text: str) -> None:
    try:
        config = load_config(text, env={})
    except ConfigError as exc:
        assert exc.issues, "a ConfigError must list at least one issue"
        for issue in exc.issues:
            assert issue.message
            assert isinstance(issue.path, str)
        return
    assert isinstance(config, Config)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_yaml_document_loads_or_raises_config_error(doc: Any) -> None:
    _check(yaml.safe_dump(doc))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["defaults", "upstreams", "listeners", "limits", "telemetry", "drain", "admin"]), documents)
def test_mutating_one_section_of_a_valid_config_never_escapes_config_error(section: str, value: Any) -> None:
    doc = _valid_base()
    doc[section] = value
    _check(yaml.safe_dump(doc))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_escapes_config_error(text: str) -> None:
    _check(text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents)
def test_validate_command_never_tracebacks(tmp_path: Path, doc: Any) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["validate", str(path)])
    assert code in (0, 1)
    assert "Traceback" not in stderr.getvalue()
    if code == 1:
        assert stderr.getvalue().startswith("outrigger: ")


def test_whitespace_in_prefixes_and_upstream_urls_is_refused_so_no_request_line_can_be_injected() -> None:
    """These values are written into the upstream request line verbatim."""
    import pytest

    base = _valid_base()
    bad_route = yaml.safe_dump({**base, "listeners": [{**base["listeners"][0], "routes": [
        {"name": "r", "upstream": "svc", "rewrite_prefix": "/a\r\nX-Evil: 1"}]}]})
    with pytest.raises(ConfigError) as route_error:
        load_config(bad_route, env={})
    assert [i.path for i in route_error.value.issues] == ["listeners[0].routes[0].rewrite_prefix"]
    bad_url = yaml.safe_dump({**base, "upstreams": {"svc": {"url": "http://127.0.0.1:8080/a b"}}})
    with pytest.raises(ConfigError) as url_error:
        load_config(bad_url, env={})
    assert [i.path for i in url_error.value.issues] == ["upstreams.svc.url"]
