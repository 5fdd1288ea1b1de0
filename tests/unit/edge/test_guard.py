"""Request-target rules: absolute-form by its path, dot segments (with path parameters) refused."""

from __future__ import annotations

import pytest

from proxy import errors
from proxy.edge.guard import describe_parse_error, origin_path


@pytest.mark.parametrize(("target", "expected"), [
    ("/v1/x?q=1", "/v1/x?q=1"),
    ("http://evil.example/v1/x", "/v1/x"),
    ("https://169.254.169.254:443/latest?x=1", "/latest?x=1"),
    ("http://host", "/"),
    ("http://host?q", "/?q"),
    ("/v1/file.tar.gz/..hidden", "/v1/file.tar.gz/..hidden"),
    ("/v1/a;b/c", "/v1/a;b/c"),
])
def test_origin_path_keeps_the_path_and_query_and_drops_any_authority(target: str, expected: str) -> None:
    assert origin_path(target) == expected


@pytest.mark.parametrize("target", [
    "/a/../b", "/a/./b", "/a/..", "/a/%2e%2e/b", "/a/..;/b", "/a/%2E%2e;/b", "/a/.;/b", "/a/..;x=1/b",
    "/a/..%3b/b", "/a%2f..%2fb", "/a\\..\\b", "http://h/a/../b", "/..?q=/x",
])
def test_dot_segments_are_refused_also_encoded_and_with_path_parameters(target: str) -> None:
    with pytest.raises(errors.BadRequest):
        origin_path(target)


@pytest.mark.parametrize("target", ["*", "evil.example:443", "example.com/x"])
def test_asterisk_and_authority_forms_are_refused(target: str) -> None:
    with pytest.raises(errors.BadRequest):
        origin_path(target)


def test_a_tls_handshake_is_named_and_llhttp_reasons_are_kept() -> None:
    assert describe_parse_error("Invalid method encountered", b"\x16\x03") == \
        "TLS handshake received on a plain-HTTP listener"
    assert describe_parse_error("Invalid header value char", b"GE") == "Invalid header value char"
