"""Query strings on spans: sensitive values redacted, the rest kept as sent; the config list is validated."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, load_config
from proxy.telemetry.query import redact_query, redaction_set

CONFIG = """
version: 1
upstreams: {svc: {url: "http://127.0.0.1:9"}}
listeners: [{name: main, address: "127.0.0.1:0", routes: [{name: r, upstream: svc}]}]
telemetry: {tracing: {redact_query_params: %s}}
"""


def test_the_conventions_list_and_the_configured_names_are_redacted_case_insensitively() -> None:
    names = redaction_set(["api_key"])
    query = "a=1&sig=abc&AWSAccessKeyId=K&X-Goog-Signature=s&API_KEY=k&%73ig=enc&flag&b="
    assert redact_query(query, names) == (
        "a=1&sig=REDACTED&AWSAccessKeyId=REDACTED&X-Goog-Signature=REDACTED&API_KEY=REDACTED"
        "&%73ig=REDACTED&flag&b=")


def test_a_query_without_sensitive_names_is_kept_byte_for_byte() -> None:
    assert redact_query("q=caf%C3%A9&page=2&&x", redaction_set()) == "q=caf%C3%A9&page=2&&x"


@pytest.mark.parametrize("value, index", [("[token, '']", 1), ("['a=b']", 0), ("[ok, 'has space']", 1)])
def test_invalid_names_in_the_config_list_are_reported_with_their_path(value: str, index: int) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIG % value, env={})
    assert f"telemetry.tracing.redact_query_params[{index}]" in str(caught.value)


def test_the_config_list_is_accepted() -> None:
    config = load_config(CONFIG % "[token, session_id]", env={})
    assert config.telemetry.tracing.redact_query_params == ("token", "session_id")
