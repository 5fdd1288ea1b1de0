"""Config loader: every error carries its exact path; units, env, merging, shipped files, `validate`."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Config, ConfigError, load_config, load_config_file

REPO = Path(__file__).resolve().parents[3]


def _base() -> dict[str, Any]:
    return {
        "version": 1,
        "admin": {"address": "127.0.0.1:9901"},
        "drain": {"grace": "1s", "timeout": "2s"},
        "defaults": {"timeout": {"connect": "1s", "attempt": "2s", "total": "5s", "idle": "30s"}},
        "upstreams": {"payments": {"url": "http://payments:8080"}},
        "listeners": [{
            "name": "payments",
            "address": "127.0.0.1:15001",
            "routes": [
                {"name": "charges", "match": {"path_prefix": "/v1/charges"}, "upstream": "payments"},
                {"name": "default", "match": {"path_prefix": "/"}, "upstream": "payments"},
            ],
        }],
    }


def _load(edit: Callable[[dict[str, Any]], Any] | None = None, env: dict[str, str] | None = None) -> Config:
    data = copy.deepcopy(_base())
    if edit is not None:
        edit(data)
    return load_config(yaml.safe_dump(data), env=env or {})


def _issues(edit: Callable[[dict[str, Any]], Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(edit)
    return [str(issue) for issue in info.value.issues]


def _route(data: dict[str, Any], index: int = 0) -> dict[str, Any]:
    route: dict[str, Any] = data["listeners"][0]["routes"][index]
    return route


def test_base_document_loads() -> None:
    config = _load()
    assert [r.name for r in config.listeners[0].routes] == ["charges", "default"]


# --- errors, each with its exact path ---




def test_unknown_top_level_key_is_reported_at_its_name() -> None:
    assert _issues(lambda d: d.update(listner=[])) == ["listner: unknown key; did you mean `listeners`?"]


def test_unknown_key_nested_in_a_block_is_reported_with_its_full_path() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["defaults"]["timeout"]["conect"] = "1s"
    assert _issues(edit) == ["defaults.timeout.conect: unknown key; did you mean `connect`?"]


def test_unknown_key_directly_in_a_section_is_reported_with_its_full_path() -> None:
    assert _issues(lambda d: d["drain"].update(grase="1s")) == ["drain.grase: unknown key; did you mean `grace`?"]


def test_unknown_key_in_a_route_is_reported_with_its_full_path() -> None:
    issues = _issues(lambda d: _route(d, 1).update(upstrem="x"))
    assert issues == ["listeners[0].routes[1].upstrem: unknown key; did you mean `upstream`?"]


def test_unknown_key_in_a_route_block_is_reported_with_its_full_path() -> None:
    issues = _issues(lambda d: _route(d, 1).update(retry={"max_attempt": 2}))
    assert issues == ["listeners[0].routes[1].retry.max_attempt: unknown key; did you mean `max_attempts`?"]


def test_wrong_type_is_reported_at_its_path() -> None:
    issues = _issues(lambda d: _route(d, 0).update(retry={"max_attempts": "three"}))
    assert issues == ["listeners[0].routes[0].retry.max_attempts: Expected `int`, got `str`"]


def test_wrong_type_of_upstream_field_is_reported_at_its_path() -> None:
    issues = _issues(lambda d: d["upstreams"]["payments"].update(max_connections="lots"))
    assert issues == ["upstreams.payments.max_connections: Expected `int`, got `str`"]


def test_route_naming_a_missing_upstream_is_an_error_naming_it() -> None:
    issues = _issues(lambda d: _route(d, 1).update(upstream="paymnts"))
    assert issues == ["listeners[0].routes[1].upstream: unknown upstream 'paymnts'"]


def test_two_listeners_on_one_address_is_an_error_at_the_second() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["listeners"].append({"name": "other", "address": "127.0.0.1:15001",
                               "routes": [{"name": "r", "upstream": "payments"}]})
    issues = _issues(edit)
    assert issues == ["listeners[1].address: address 127.0.0.1:15001 is already used by listeners[0].address"]


@pytest.mark.parametrize(("first", "second"), [
    ("127.0.0.1:15001", "0.0.0.0:15001"), ("0.0.0.0:15001", "127.0.0.1:15001"), ("127.0.0.1:15001", "localhost:15001"),
    ("[::]:15001", "127.0.0.1:15001"),
])
def test_a_wildcard_or_loopback_alias_on_the_same_port_is_an_address_clash(first: str, second: str) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["listeners"][0]["address"] = first
        d["listeners"].append({"name": "other", "address": second, "routes": [{"name": "r", "upstream": "payments"}]})
    assert _issues(edit) == [f"listeners[1].address: address {second} is already used by listeners[0].address"]


def test_same_port_on_two_different_specific_hosts_is_allowed() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["listeners"].append({"name": "other", "address": "127.0.0.2:15001",
                               "routes": [{"name": "r", "upstream": "payments"}]})
    assert len(_load(edit).listeners) == 2


def test_credentials_in_an_upstream_url_are_an_error_not_silently_dropped() -> None:
    issues = _issues(lambda d: d["upstreams"]["payments"].update(url="https://svc:s3cr3t@payments:8443/base"))
    assert len(issues) == 1 and issues[0].startswith("upstreams.payments.url: credentials in the upstream url")
    assert "s3cr3t" not in issues[0]


@pytest.mark.parametrize("size", [0, 100, "1000"])
def test_max_header_bytes_below_1kib_is_an_error(size: Any) -> None:
    issues = _issues(lambda d: d.update(limits={"max_header_bytes": size}))
    assert len(issues) == 1 and issues[0].startswith("limits.max_header_bytes: ") and "at least 1KiB" in issues[0]


@pytest.mark.parametrize(("limits", "expected"), [
    ({"keepalive_timeout": "0s"}, "limits.keepalive_timeout: keepalive_timeout must be greater than 0"),
    ({"client_idle_timeout": "0s"}, "limits.client_idle_timeout: client_idle_timeout must be greater than 0"),
    ({"max_connections": 0}, "limits.max_connections"),
    ({"max_pipelined": 0}, "limits.max_pipelined"),
])
def test_edge_limits_out_of_range_are_errors_naming_their_path(limits: dict[str, Any], expected: str) -> None:
    issues = _issues(lambda d: d.update(limits=limits))
    assert len(issues) == 1 and issues[0].startswith(expected), issues


def test_edge_limits_have_bounded_defaults() -> None:
    limits = _load().limits
    assert 0 < limits.keepalive_timeout <= 75 and 0 < limits.client_idle_timeout <= 60
    assert limits.max_connections >= 1 and limits.max_pipelined >= 1


def test_listener_on_the_admin_address_is_an_error() -> None:
    issues = _issues(lambda d: d["listeners"][0].update(address="127.0.0.1:9901"))
    assert issues == ["listeners[0].address: address 127.0.0.1:9901 is already used by admin.address"]


def test_route_timeout_attempt_longer_than_total_is_an_error_at_the_route() -> None:
    issues = _issues(lambda d: _route(d, 0).update(timeout={"attempt": "6s"}))
    assert issues == ["listeners[0].routes[0].timeout: attempt (6s) is longer than total (5s)"]


def test_defaults_timeout_attempt_longer_than_total_is_an_error_at_defaults() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["defaults"]["timeout"].update(attempt="10s", total="5s")
    assert _issues(edit) == ["defaults.timeout: attempt (10s) is longer than total (5s)"]


def test_route_total_below_inherited_attempt_is_an_error_at_the_route() -> None:
    """attempt 2s comes from defaults; the route's own total of 1s makes the merged block invalid."""
    issues = _issues(lambda d: _route(d, 1).update(timeout={"total": "1s"}))
    assert issues == ["listeners[0].routes[1].timeout: attempt (2s) is longer than total (1s)"]


def test_bad_duration_is_reported_at_its_path() -> None:
    issues = _issues(lambda d: d["drain"].update(grace="5 parsecs"))
    assert issues == ["drain.grace: invalid duration '5 parsecs'; use a number of seconds or e.g. '250ms', '2s', '1m'"]


def test_negative_duration_is_an_error() -> None:
    issues = _issues(lambda d: d["drain"].update(timeout=-1))
    assert len(issues) == 1 and issues[0].startswith("drain.timeout: invalid duration -1")


def test_bad_size_is_reported_at_its_path() -> None:
    issues = _issues(lambda d: d.update(limits={"max_body_bytes": "12XB"}))
    assert issues == ["limits.max_body_bytes: invalid size '12XB'; use bytes or e.g. '64KiB', '10MB'"]


@pytest.mark.parametrize("url", ["ftp://payments:21", "payments:8080", "unix:///tmp/sock"])
def test_upstream_url_with_unsupported_scheme_is_an_error(url: str) -> None:
    issues = _issues(lambda d: d["upstreams"]["payments"].update(url=url))
    assert len(issues) == 1
    assert issues[0].startswith("upstreams.payments.url: unsupported scheme")


def test_upstream_url_with_query_is_an_error() -> None:
    issues = _issues(lambda d: d["upstreams"]["payments"].update(url="http://payments/?a=1"))
    assert len(issues) == 1 and issues[0].startswith("upstreams.payments.url: ")


def test_unsupported_version_is_an_error() -> None:
    assert _issues(lambda d: d.update(version=2)) == ["version: unsupported version 2; expected 1"]


def test_per_route_breaker_without_route_scope_is_an_error() -> None:
    issues = _issues(lambda d: _route(d, 0).update(circuit_breaker={"consecutive_failures": 3}))
    assert len(issues) == 1
    assert issues[0].startswith("listeners[0].routes[0].circuit_breaker: per-route breaker settings need "
                                "'scope: route'")


def test_every_error_in_independent_routes_is_reported_together() -> None:
    def edit(d: dict[str, Any]) -> None:
        _route(d, 0).update(upstream="nope")
        _route(d, 1).update(timeout={"attempt": "9s"})
    assert _issues(edit) == [
        "listeners[0].routes[0].upstream: unknown upstream 'nope'",
        "listeners[0].routes[1].timeout: attempt (9s) is longer than total (5s)",
    ]


def test_errors_in_unrelated_sections_are_all_reported_in_one_run() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["drain"]["grace"] = "soon"
        _route(d, 1).update(upstream="paymnts")
    issues = _issues(edit)
    assert [i.partition(":")[0] for i in issues] == ["drain.grace", "listeners[0].routes[1].upstream"]


# --- env substitution ---


_ENV_DOC = """\
version: 1
# ${IN_A_COMMENT} is never substituted
admin: {address: "127.0.0.1:9901"}
upstreams:
  svc: {url: "${SVC_URL:-http://fallback:8080}"}   # ${ALSO_IN_A_COMMENT}
listeners:
  - name: main
    address: "${LISTEN}"
    routes: [{name: d, upstream: svc}]
"""


def test_env_var_that_is_unset_is_an_error_naming_it_and_the_value_it_is_in() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_ENV_DOC, env={})
    assert [str(i) for i in info.value.issues] == [
        "listeners[0].address: environment variable LISTEN is not set (use ${LISTEN:-default})"]


def test_env_value_with_a_newline_cannot_add_keys_to_the_config() -> None:
    hostile = "http://a:8080\n    max_connections: 1"
    with pytest.raises(ConfigError) as info:
        load_config(_ENV_DOC, env={"LISTEN": "127.0.0.1:1", "SVC_URL": hostile})
    assert [i.path for i in info.value.issues] == ["upstreams.svc.url"]  # one odd url, not a new key
    unquoted = "  svc:\n    url: ${SVC_URL}"
    doc = _ENV_DOC.replace('  svc: {url: "${SVC_URL:-http://fallback:8080}"}', unquoted)
    with pytest.raises(ConfigError) as info:
        load_config(doc, env={"LISTEN": "127.0.0.1:1", "SVC_URL": hostile})
    assert [i.path for i in info.value.issues] == ["upstreams.svc.url"]


def test_env_value_with_a_hash_is_kept_whole_not_cut_as_a_comment() -> None:
    doc = _ENV_DOC.replace("    routes: [{name: d, upstream: svc}]",
                           "    routes:\n      - name: d\n        upstream: svc\n        fallback:\n"
                           "          body: ${BODY}")
    config = load_config(doc, env={"LISTEN": "127.0.0.1:1", "BODY": "price # 5 {not: yaml}"})
    fallback = config.listeners[0].routes[0].fallback
    assert fallback is not None and fallback.body == "price # 5 {not: yaml}"


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


@pytest.mark.parametrize(("path", "value", "where"), [
    (("listeners", 0, "name"), "payments\n", "listeners[0].name"),
    (("listeners", 0, "routes", 0, "name"), "charges\n", "listeners[0].routes[0].name"),
    (("listeners", 0, "routes", 0, "match", "path_prefix"), "/v1/charges\n",
     "listeners[0].routes[0].match.path_prefix"),
    (("listeners", 0, "routes", 0, "match", "methods"), ["POST\n"], "listeners[0].routes[0].match.methods[0]"),
    (("listeners", 0, "routes", 0, "rewrite_prefix"), "/charges\n", "listeners[0].routes[0].rewrite_prefix"),
    (("listeners", 0, "routes", 0, "rate_limit"), {"requests_per_second": 5, "name": "partner\n"},
     "listeners[0].routes[0].rate_limit.name"),
    (("listeners", 0, "routes", 0, "rate_limit"), {"requests_per_second": 5, "key": {"header": "x-tenant\n"}},
     "listeners[0].routes[0].rate_limit.key.header"),
    (("telemetry",), {"tracing": {"redact_query_params": ["token\n"]}}, "telemetry.tracing.redact_query_params[0]"),
])
def test_a_value_with_a_trailing_newline_is_an_error_at_its_path(path: tuple[Any, ...], value: Any,
                                                                 where: str) -> None:
    """``$`` in a pattern matches before a final newline: a name from ``${VAR}`` ending in one got through."""
    issues = _issues(lambda data: _set(data, path, value))
    assert [issue.partition(": ")[0] for issue in issues] == [where], issues


def test_an_upstream_name_with_a_trailing_newline_is_an_error_naming_it_on_one_line() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["upstreams"] = {"payments\n": data["upstreams"]["payments"]}
        for route in data["listeners"][0]["routes"]:
            route["upstream"] = "payments\n"

    issues = _issues(edit)
    assert issues[0] == "upstreams.payments\\n: upstream names may use letters, digits, '_', '.', '-' (1-64)"
    assert all("\n" not in issue for issue in issues)


def test_a_match_header_name_with_a_trailing_newline_is_an_error_naming_it_on_one_line() -> None:
    assert _issues(lambda data: _route(data).setdefault("match", {}).update(headers={"x-tenant\n": "a"})) == [
        "listeners[0].routes[0].match.headers.x-tenant\\n: invalid header name"]


def test_env_var_that_is_a_whole_plain_value_takes_the_type_it_spells() -> None:
    doc = _ENV_DOC.replace('  svc: {url: "${SVC_URL:-http://fallback:8080}"}',
                           '  svc:\n    url: "http://svc:8080"\n    max_connections: ${MAXC:-7}')
    assert load_config(doc, env={"LISTEN": "127.0.0.1:1"}).upstreams["svc"].max_connections == 7
    assert load_config(doc, env={"LISTEN": "127.0.0.1:1", "MAXC": "12"}).upstreams["svc"].max_connections == 12


def test_env_reference_in_a_key_is_not_substituted() -> None:
    doc = _ENV_DOC.replace("version: 1\n", "version: 1\n${EXTRA}: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(doc, env={"LISTEN": "127.0.0.1:1", "EXTRA": "drain"})
    assert [i.path for i in info.value.issues] == ["${EXTRA}"]


def test_env_var_default_is_used_when_unset_and_value_wins_when_set() -> None:
    config = load_config(_ENV_DOC, env={"LISTEN": "127.0.0.1:15009"})
    assert config.listeners[0].address == "127.0.0.1:15009"
    assert config.upstreams["svc"].url == "http://fallback:8080"
    config = load_config(_ENV_DOC, env={"LISTEN": "127.0.0.1:15009", "SVC_URL": "https://real:8443"})
    assert config.upstreams["svc"].url == "https://real:8443"


def test_env_var_in_comment_is_ignored_even_when_unset() -> None:
    """IN_A_COMMENT and ALSO_IN_A_COMMENT are unset, yet only LISTEN is needed."""
    load_config(_ENV_DOC, env={"LISTEN": "127.0.0.1:1"})



def test_env_var_default_is_used_when_set_but_empty_as_in_the_shell() -> None:
    config = load_config(_ENV_DOC, env={"LISTEN": "127.0.0.1:15009", "SVC_URL": ""})
    assert config.upstreams["svc"].url == "http://fallback:8080"


def test_env_var_without_default_set_but_empty_is_substituted_empty() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_ENV_DOC, env={"LISTEN": ""})
    assert [str(i) for i in info.value.issues] == ["listeners[0].address: invalid address ''; expected host:port"]


def test_double_dollar_is_a_literal_env_reference() -> None:
    doc = _ENV_DOC.replace('rewrite', '').replace("routes: [{name: d, upstream: svc}]",
                                                  'routes: [{name: d, upstream: svc, fallback: {body: "$${PRICE}"}}]')
    config = load_config(doc, env={"LISTEN": "127.0.0.1:1", "PRICE": "substituted"})
    fallback = config.listeners[0].routes[0].fallback
    assert fallback is not None and fallback.body == "${PRICE}"


def test_admin_address_env_var_applies_when_the_config_sets_no_admin_address() -> None:
    doc = _ENV_DOC.replace('admin: {address: "127.0.0.1:9901"}\n', "")
    config = load_config(doc, env={"LISTEN": "127.0.0.1:1", "OUTRIGGER_ADMIN_ADDRESS": "0.0.0.0:9911"})
    assert config.admin.address == "0.0.0.0:9911"
    assert load_config(doc, env={"LISTEN": "127.0.0.1:1"}).admin.address == "127.0.0.1:9901"  # the default
    # An explicit admin.address wins over the variable.
    config = load_config(_ENV_DOC, env={"LISTEN": "127.0.0.1:1", "OUTRIGGER_ADMIN_ADDRESS": "0.0.0.0:9911"})
    assert config.admin.address == "127.0.0.1:9901"


def test_admin_address_env_var_with_a_bad_value_is_an_error_at_admin_address() -> None:
    doc = _ENV_DOC.replace('admin: {address: "127.0.0.1:9901"}\n', "")
    with pytest.raises(ConfigError) as info:
        load_config(doc, env={"LISTEN": "127.0.0.1:1", "OUTRIGGER_ADMIN_ADDRESS": "nonsense"})
    assert [i.path for i in info.value.issues] == ["admin.address"]


# --- YAML: 1.2 booleans, duplicate keys ---


_FALLBACK_DOC = """version: 1
upstreams: {svc: {url: "http://svc:8080"}}
listeners:
  - name: main
    address: "127.0.0.1:15001"
    routes:
      - name: d
        upstream: svc
        fallback:
          status: 200
          body: '{"items": []}'
          on: [circuit_open, overflow]
"""


def test_fallback_on_key_written_bare_as_in_the_readme_is_a_key_not_a_boolean() -> None:
    fallback = load_config(_FALLBACK_DOC, env={}).listeners[0].routes[0].fallback
    assert fallback is not None and fallback.on == ("circuit_open", "overflow")


def test_yes_and_no_are_strings_so_a_yaml_1_1_boolean_is_an_error_at_its_path() -> None:
    doc = _FALLBACK_DOC + "telemetry: {access_log: {enabled: no}}\n"
    with pytest.raises(ConfigError) as info:
        load_config(doc, env={})
    assert [i.path for i in info.value.issues] == ["telemetry.access_log.enabled"]
    assert load_config(doc.replace("enabled: no", "enabled: false"), env={}).telemetry.access_log.enabled is False


@pytest.mark.parametrize(("doc", "line"), [
    (_FALLBACK_DOC.replace("upstreams: {svc: {url: \"http://svc:8080\"}}",
                           "upstreams:\n  svc: {url: \"http://svc:8080\"}\n  svc: {url: \"http://other:8080\"}"), 4),
    (_FALLBACK_DOC + "drain: {grace: 1s}\ndrain: {grace: 2s}\n", 14),
])
def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(doc: str, line: int) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(doc, env={})
    [issue] = info.value.issues
    assert issue.path.startswith(f"line {line},")
    assert "duplicate key" in issue.message and "first given on line" in issue.message


# --- units ---


@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("1m30s", 90.0), (3, 3.0), (0.5, 0.5), ("1.5", 1.5),
])
def test_durations_parse_to_seconds(text: Any, seconds: float) -> None:
    config = _load(lambda d: d["drain"].update(grace=text))
    assert config.drain.grace == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "size"), [("64KiB", 65536), ("10MB", 10_000_000), (1234, 1234), ("1MiB", 1 << 20)])
def test_sizes_parse_to_bytes(text: Any, size: int) -> None:
    config = _load(lambda d: d.update(limits={"max_body_bytes": text}))
    assert config.limits.max_body_bytes == size


# --- route override merging: defaults < upstream breaker < route ---


def _merge_doc(d: dict[str, Any]) -> None:
    d["defaults"]["circuit_breaker"] = {"consecutive_failures": 7, "half_open_requests": 2}
    d["defaults"]["rate_limit"] = {"requests_per_second": 5, "burst": 5}
    d["defaults"]["retry"] = {"max_attempts": 4, "backoff": {"base": "10ms", "max": "1s"}}
    d["upstreams"]["payments"]["circuit_breaker"] = {"consecutive_failures": 9}
    _route(d, 0).update(
        circuit_breaker={"scope": "route", "half_open_requests": 3},
        rate_limit=None,
        retry={"backoff": {"max": "500ms"}},
        timeout={"attempt": "1s"},
    )


def test_route_inherits_defaults_and_the_upstream_breaker_unchanged() -> None:
    route = _load(_merge_doc).listeners[0].routes[1]
    assert route.circuit_breaker.consecutive_failures == 9  # upstream beats defaults
    assert route.circuit_breaker.half_open_requests == 2  # from defaults
    assert route.rate_limit is not None and route.rate_limit.requests_per_second == 5
    assert route.retry.max_attempts == 4
    assert route.timeout.attempt == 2.0


def test_route_keys_override_inherited_blocks_key_by_key() -> None:
    route = _load(_merge_doc).listeners[0].routes[0]
    assert route.circuit_breaker.scope == "route"
    assert route.circuit_breaker.half_open_requests == 3  # the route's own key
    assert route.circuit_breaker.consecutive_failures == 9  # still inherited from the upstream
    assert route.retry.max_attempts == 4  # sibling of the overridden nested key survives
    assert route.retry.backoff.max == 0.5 and route.retry.backoff.base == 0.01
    assert (route.timeout.attempt, route.timeout.total, route.timeout.connect) == (1.0, 5.0, 1.0)


def test_rate_limit_null_on_a_route_disables_the_inherited_block() -> None:
    assert _load(_merge_doc).listeners[0].routes[0].rate_limit is None


def test_upstream_breaker_merges_over_defaults() -> None:
    breaker = _load(_merge_doc).upstreams["payments"].circuit_breaker
    assert breaker is not None
    assert (breaker.consecutive_failures, breaker.half_open_requests) == (9, 2)


# --- shipped configs and the CLI ---


SHIPPED = sorted((REPO / "config").rglob("*.yaml")) + sorted((REPO / "config").rglob("*.yml"))


def test_there_are_shipped_configs_to_check() -> None:
    assert any(p.name == "outrigger.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config_file(str(path), env={})
    assert config.listeners


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "validate", str(path)], capture_output=True,
                          text=True, timeout=30, check=False)


def test_validate_accepts_a_good_config_with_a_one_line_summary(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(_base()))
    result = _validate(path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "is valid" in lines[0] and "1 listener(s), 2 route(s), 1 upstream(s)" in lines[0]


def test_validate_rejects_a_bad_config_listing_every_error_with_its_path(tmp_path: Path) -> None:
    data = _base()
    data["listeners"][0]["routes"][1]["upstream"] = "paymnts"
    data["listeners"][0]["routes"][0]["timeout"] = {"attempt": "6s"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = _validate(path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "2 error(s)" in result.stderr
    assert "listeners[0].routes[1].upstream: unknown upstream 'paymnts'" in result.stderr
    assert "listeners[0].routes[0].timeout: attempt (6s) is longer than total (5s)" in result.stderr


def test_validate_of_a_missing_file_exits_1_without_traceback(tmp_path: Path) -> None:
    result = _validate(tmp_path / "absent.yaml")
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_the_documented_policy_blocks_validate_as_written_under_defaults() -> None:
    """docs/configuration.md's "Policy blocks" YAML, pasted as it stands (fallback's bare ``on:`` included)."""
    reference = (REPO / "docs" / "configuration.md").read_text()
    block = reference.partition("## Policy blocks")[2].partition("```yaml\n")[2].partition("```")[0]
    assert "fallback:" in block and "\n  on: [" in block
    indented = "\n".join("  " + line for line in block.splitlines())
    doc = f"""\
version: 1
defaults:
{indented}
upstreams: {{svc: {{url: "http://svc:8080"}}}}
listeners: [{{name: main, address: "127.0.0.1:15001", routes: [{{name: d, upstream: svc}}]}}]
"""
    route = load_config(doc, env={}).listeners[0].routes[0]
    assert route.fallback is not None and route.fallback.on == ("circuit_open",)
    assert route.retry.max_attempts == 3


def test_the_readme_short_config_validates() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.partition("## A short config")[2].partition("```yaml\n")[2].partition("```")[0]
    config = load_config(block, env={})
    assert [route.name for route in config.listeners[0].routes] == ["charges", "default"]


def test_every_bad_key_of_one_block_is_reported_not_only_the_first() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["telemetry"] = {"tracing": {"exporter": "jaeger", "sample_ratio": "lots"}, "acess_log": {}}
        d["defaults"]["retry"] = {"max_attempts": "three", "backof": {}}
    assert sorted(_issues(edit)) == sorted([
        "telemetry.tracing.exporter: invalid value 'jaeger'; valid values: otlp, console, none",
        "telemetry.tracing.sample_ratio: Expected `float | null`, got `str`",
        "telemetry.acess_log: unknown key; did you mean `access_log`?",
        "defaults.retry.max_attempts: Expected `int`, got `str`",
        "defaults.retry.backof: unknown key; did you mean `backoff`?",
    ])


def test_a_route_name_repeated_in_one_listener_is_an_error() -> None:
    issues = _issues(lambda d: _route(d, 1).update(name="charges"))
    assert issues == ["listeners[0].routes[1].name: duplicate route name 'charges'"]


def test_a_route_name_repeated_in_another_listener_is_an_error_naming_both() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["listeners"].append({"name": "other", "address": "127.0.0.1:15002",
                               "routes": [{"name": "charges", "upstream": "payments"}]})
    assert _issues(edit) == [
        "listeners[1].routes[0].name: duplicate route name 'charges' (also listeners[0].routes[0]; "
        "route names label metrics, so they are unique across listeners)"]


def test_the_route_name_none_is_reserved_for_unrouted_requests() -> None:
    issues = _issues(lambda d: _route(d, 1).update(name="none"))
    assert issues == ["listeners[0].routes[1].name: route name 'none' is reserved for requests no route matched"]


def test_a_ca_file_that_is_not_a_certificate_is_an_error_at_its_path(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    issues = _issues(lambda d: d["upstreams"]["payments"].update(tls={"ca_file": str(bogus)}))
    assert len(issues) == 1 and issues[0].startswith("upstreams.payments.tls.ca_file: not a PEM CA certificate file")


def test_a_client_cert_and_key_that_do_not_load_are_an_error_at_cert_file(tmp_path: Path) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    key.write_text("nope\n")
    issues = _issues(lambda d: d["upstreams"]["payments"].update(tls={"cert_file": str(cert), "key_file": str(key)}))
    assert len(issues) == 1 and issues[0].startswith("upstreams.payments.tls.cert_file: cert_file and key_file")


def test_a_yaml_merge_key_may_be_overridden_without_counting_as_a_duplicate() -> None:
    doc = """\
version: 1
x-timeouts: &timeouts {connect: 1s, attempt: 2s, total: 5s}
upstreams: {svc: {url: "http://svc:8080"}}
listeners:
  - name: main
    address: "127.0.0.1:15001"
    routes: [{name: d, upstream: svc, timeout: {<<: *timeouts, total: 9s}}]
"""
    with pytest.raises(ConfigError) as info:  # x-timeouts is an unknown top-level key, nothing else is wrong
        load_config(doc, env={})
    assert [str(i) for i in info.value.issues] == [
        "x-timeouts: unknown key; valid keys: admin, dead_letter, defaults, drain, limits, listeners, redis, "
        "telemetry, upstreams, version"]
    route = load_config(doc.replace("x-timeouts: &timeouts", "defaults: {timeout: &timeouts")
                        .replace("total: 5s}", "total: 5s}}"), env={}).listeners[0].routes[0]
    assert (route.timeout.attempt, route.timeout.total) == (2.0, 9.0)


def test_admin_address_env_var_applies_when_admin_is_given_empty() -> None:
    doc = _ENV_DOC.replace('admin: {address: "127.0.0.1:9901"}', "admin:")
    config = load_config(doc, env={"LISTEN": "127.0.0.1:1", "OUTRIGGER_ADMIN_ADDRESS": "0.0.0.0:9911"})
    assert config.admin.address == "0.0.0.0:9911"


@pytest.mark.parametrize(("a", "b", "clash"), [
    ("localhost:80", "[::1]:80", True), ("localhost:80", "127.0.0.1:80", True), ("[::]:80", "localhost:80", True),
    ("127.0.0.2:80", "127.0.0.1:80", False), ("localhost:80", "localhost:81", False),
    ("127.0.0.1:0", "127.0.0.1:0", False),
])
def test_same_socket_knows_wildcards_and_every_loopback_localhost_binds(a: str, b: str, clash: bool) -> None:
    from proxy.config import same_socket
    assert same_socket(a, b) is clash and same_socket(b, a) is clash


def test_a_duplicate_route_name_is_reported_alongside_the_routes_other_errors() -> None:
    def edit(d: dict[str, Any]) -> None:
        _route(d, 0).update(upstream="paymnts")
        _route(d, 1).update(name="charges", timeout={"attempt": "90s"})
    assert sorted(_issues(edit)) == sorted([
        "listeners[0].routes[0].upstream: unknown upstream 'paymnts'",
        "listeners[0].routes[1].timeout: attempt (90s) is longer than total (5s)",
        "listeners[0].routes[1].name: duplicate route name 'charges'",
    ])


# --- listeners whose routes are broken still take part in the address checks ---


def _second_listener(address: str) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        _route(d).update(upstream="nope")  # listener 0 has an invalid route
        d["listeners"].append({"name": "second", "address": address,
                               "routes": [{"name": "other", "upstream": "payments"}]})
    return edit


def test_a_bad_address_is_reported_at_its_own_listener_index_after_a_listener_with_a_bad_route() -> None:
    issues = _issues(_second_listener("15002"))
    assert "listeners[1].address: invalid address '15002'; expected host:port" in issues
    assert not any(i.startswith("listeners[0].address") for i in issues)


def test_a_listener_with_a_bad_route_is_still_checked_for_an_address_clash() -> None:
    def edit(d: dict[str, Any]) -> None:
        _route(d).update(upstream="nope")
        d["listeners"][0]["address"] = "127.0.0.1:9901"  # the admin's
    issues = _issues(edit)
    assert "listeners[0].address: address 127.0.0.1:9901 is already used by admin.address" in issues
    assert "listeners[0].routes[0].upstream: unknown upstream 'nope'" in issues


# --- error messages say what to do ---


def test_an_enum_error_lists_the_valid_values() -> None:
    issues = _issues(lambda d: d.update(telemetry={"tracing": {"exporter": "jaeger"}}))
    assert issues == ["telemetry.tracing.exporter: invalid value 'jaeger'; valid values: otlp, console, none"]


def test_an_enum_error_inside_a_list_lists_the_valid_values() -> None:
    issues = _issues(lambda d: _route(d).update(retry={"retry_on": ["reset", "5xxx"]}))
    assert len(issues) == 1 and issues[0].startswith("listeners[0].routes[0].retry.retry_on[1]: invalid value '5xxx'")
    assert "5xx" in issues[0] and "gateway-error" in issues[0]


def test_an_unknown_key_suggests_the_nearest_valid_one() -> None:
    issues = _issues(lambda d: d["upstreams"]["payments"].update(max_conections=5))
    assert issues == ["upstreams.payments.max_conections: unknown key; did you mean `max_connections`?"]


def test_a_quoted_boolean_says_only_true_and_false_are_booleans() -> None:
    issues = _issues(lambda d: d.update(telemetry={"access_log": {"enabled": "yes"}}))
    assert issues == ["telemetry.access_log.enabled: Expected `bool`, got `str`; "
                      "only true and false (unquoted) are booleans"]


def test_a_scalar_where_a_block_is_expected_says_so_and_lists_the_block_keys() -> None:
    issues = _issues(lambda d: _route(d).update(timeout="5s"))
    assert issues == ["listeners[0].routes[0].timeout: expected a block (a mapping with the keys connect, attempt, "
                      "total, idle, adaptive), got the str '5s'"]


def test_a_missing_version_says_to_add_version_1() -> None:
    issues = _issues(lambda d: d.pop("version"))
    assert issues == ["version: missing; add `version: 1` at the top of the file"]


def test_a_limits_error_names_the_key_not_the_block() -> None:
    issues = _issues(lambda d: d.update(limits={"header_read_timeout": "0s"}))
    assert issues == ["limits.header_read_timeout: header_read_timeout must be greater than 0"]
