"""``Balance``: the chain step that picks each attempt's endpoint and reports how it went.

Sits between the bulkhead and attempt telemetry (see ``proxy.app``): once
per attempt, so a retry (or a hedge) can go elsewhere, and outside the
attempt timeout, so a timed-out attempt is charged to the endpoint that was
slow.  It is the only writer of ``request.endpoint`` (read by the upstream
call, attempt telemetry and the access log) and of ``request.tried``.
"""

from __future__ import annotations

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.errors import ProxyError
from proxy.telemetry.attempts import attempt_result, status_result
from proxy.upstream.endpoints.endpoint_set import EndpointSet

__all__ = ["Balance"]


class Balance:
    __slots__ = ("_clock", "_endpoints", "_other_endpoint")

    def __init__(self, endpoints: EndpointSet, clock: Clock, *, other_endpoint: bool) -> None:
        self._endpoints = endpoints
        self._clock = clock
        self._other_endpoint = other_endpoint

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        endpoints = self._endpoints
        tried = request.tried
        endpoint = endpoints.pick(tried if self._other_endpoint else None)
        if tried is None:
            request.tried = [endpoint]
        else:
            tried.append(endpoint)
        request.endpoint = endpoint
        start = self._clock.now()
        try:
            response = await call_next(request)
        except ProxyError as error:
            endpoints.finish(endpoint)
            endpoints.record(endpoint, attempt_result(error), None, self._clock.now() - start)
            raise
        except BaseException:
            endpoints.finish(endpoint)
            if request.deadline_expired:  # the total timeout cut this attempt off on the endpoint
                endpoints.record(endpoint, "timeout", None, self._clock.now() - start)
            raise
        status = response.status
        endpoints.record(endpoint, status_result(status), status, self._clock.now() - start)
        response.on_release(lambda: endpoints.finish(endpoint))  # in flight until its body is streamed
        return response
