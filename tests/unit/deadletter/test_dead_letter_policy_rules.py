"""The dead-letter policy's pure rules: which requests are eligible, and the listener target of a rewritten path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.chain import ProxyRequest, ProxyResponse, RequestBody
from proxy.config import DeadLetterConfig, MatchConfig, RouteConfig, RouteDeadLetterConfig, UpstreamConfig
from proxy.config.units import Size
from proxy.deadletter.policy import DeadLetter
from proxy.deadletter.spool import Spool
from proxy.edge.routing import Route
from proxy.telemetry.metrics import Metrics
from proxy.upstream.call import UpstreamPool


def _policy(prefix: str = "/", rewrite: str | None = None, **config: Any) -> DeadLetter:
    return DeadLetter(RouteDeadLetterConfig(**config), spool=None, route="r", listener="main",  # type: ignore[arg-type]
                      prefix=prefix, rewrite_prefix=rewrite, metrics=Metrics(process_collectors=False))


def _request(method: str, body: RequestBody, **headers: str) -> ProxyRequest:
    return ProxyRequest(method, "/x", CIMultiDict(headers), body, request_id="rid")


async def _stream() -> Any:
    yield b"rest"


@pytest.mark.parametrize(("method", "headers", "unsafe", "eligible"), [
    ("POST", {}, False, False),
    ("PATCH", {}, False, False),
    ("POST", {"Idempotency-Key": "k"}, False, True),
    ("POST", {}, True, True),
    ("PUT", {}, False, True),
    ("DELETE", {}, False, True),
])
def test_post_and_patch_need_an_idempotency_key_unless_unsafe_methods(
        method: str, headers: dict[str, str], unsafe: bool, eligible: bool) -> None:
    policy = _policy(unsafe_methods=unsafe)
    assert (policy._body(_request(method, RequestBody(b"{}"), **headers)) is not None) is eligible


def test_only_whole_bodies_within_max_body_are_eligible() -> None:
    policy = _policy(max_body=Size(4))
    assert policy._body(_request("PUT", RequestBody(b"1234"))) == b"1234"
    assert policy._body(_request("PUT", RequestBody(b"12345"))) is None
    assert policy._body(_request("PUT", RequestBody(None))) == b""
    streamed = RequestBody(prefix=b"12", stream=_stream())  # beyond the buffer: never held whole
    assert policy._body(_request("PUT", streamed)) is None


_ROUTES = [("/", None), ("/api", "/v1"), ("/api/", "/v1/"), ("/api", "/v1/"), ("/api/", "/v1"), ("/hooks", "/"),
           ("/", "/base/")]
_PATHS = ["/api/orders?id=1", "/api", "/api/", "/apix", "/hooks/x/y", "/a%2Fb"]


async def _unused_handler(request: ProxyRequest) -> ProxyResponse:
    raise AssertionError("the route's chain is not called here")


@pytest.mark.parametrize(("prefix", "rewrite", "path"), [
    (prefix, rewrite, path) for prefix, rewrite in _ROUTES for path in _PATHS if path.startswith(prefix)])
def test_the_stored_target_reaches_the_same_upstream_path_through_the_route(
        prefix: str, rewrite: str | None, path: str) -> None:
    route = Route(name="r", listener="main", config=RouteConfig(name="r", upstream="u", rewrite_prefix=rewrite,
                                                                match=MatchConfig(path_prefix=prefix)),
                  pool=UpstreamPool("u", UpstreamConfig(url="http://127.0.0.1:9")), handler=_unused_handler,
                  metrics=Metrics(process_collectors=False).for_route("r", "u"), buffer_limit=0)
    upstream_path = route.upstream_path(path)
    target = _policy(prefix=prefix, rewrite=rewrite)._listener_target(upstream_path)
    assert target.startswith(prefix)  # the same route matches it again
    assert route.upstream_path(target) == upstream_path


async def test_an_entry_refused_by_a_spool_a_reload_closed_is_counted_as_closed_not_full(tmp_path: Path) -> None:
    metrics = Metrics(process_collectors=False)
    spool = Spool(DeadLetterConfig(dir=str(tmp_path), max_bytes=Size(64 * 1024)), metrics)
    policy = DeadLetter(RouteDeadLetterConfig(), spool=spool, route="r", listener="main", prefix="/",
                        rewrite_prefix=None, metrics=metrics)

    def count(result: str) -> float:
        return metrics.registry.get_sample_value("outrigger_dead_letters_total", {"route": "r", "result": result}) \
            or 0.0

    assert spool.accepting
    spool.close()  # a reload removed dead_letter: no successor
    assert not spool.accepting
    assert await policy._spool_or_raise(_request("PUT", RequestBody(b"{}")), "upstream_5xx", 1, "503") is None
    assert (count("refused_closed"), count("refused_full")) == (1.0, 0.0)
    (tmp_path / "next").mkdir()
    successor = Spool(DeadLetterConfig(dir=str(tmp_path / "next")), metrics)
    spool.successor = successor  # a reload replaced it instead: entries go on to the new spool
    assert spool.accepting
    successor.close()
