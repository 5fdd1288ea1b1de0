"""Fallback: serve a configured response instead of selected proxy errors.

Outermost policy so it can stand in for any error it is configured for
(by default only ``circuit_open``), wherever in the chain that error arose.
The response carries ``x-outrigger-fallback: true``.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.config import FallbackConfig
from proxy.errors import ProxyError


class Fallback:
    __slots__ = ("_body", "_headers", "_on", "_status")

    def __init__(self, config: FallbackConfig) -> None:
        self._on = frozenset(config.on)
        self._status = config.status
        self._body = config.body.encode()
        self._headers = CIMultiDictProxy(CIMultiDict({
            "Content-Type": config.content_type,
            "Content-Length": str(len(self._body)),
            "x-outrigger-fallback": "true",
        }))

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        try:
            return await call_next(request)
        except ProxyError as error:
            if error.code not in self._on:
                raise
            request.event("fallback", {"outrigger.error": error.code})
            response = ProxyResponse(self._status, self._headers, body=self._body)
            response.error = error.code
            return response
