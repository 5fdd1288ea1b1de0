"""Discovery: re-resolve an upstream's host and hand every A/AAAA record to its endpoint set.

Resolution is asynchronous (the event loop never waits on DNS), repeated
every ``discovery.refresh`` with ±20% jitter so that a fleet of sidecars
does not query in lockstep.  A failed or empty answer keeps the last good
set: a DNS outage must not empty the rotation.  With
``discovery.nameservers`` the given servers are asked directly (dnspython),
else the system resolver (``getaddrinfo``, so /etc/hosts and search domains
apply as for any other program in the pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Sequence

from proxy.config.types import DiscoveryConfig
from proxy.tasks import cancel_and_wait

__all__ = ["Discovery", "Resolver", "resolver_for"]

log = logging.getLogger("outrigger.endpoints")
Resolver = Callable[[str, int], Awaitable[list[tuple[str, int]]]]


async def system_resolve(host: str, port: int) -> list[tuple[str, int]]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP)
    return _unique([(str(info[4][0]), port) for info in infos])


def _unique(addresses: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    return sorted(set(addresses))


def nameserver_resolver(nameservers: Sequence[str], timeout_s: float) -> Resolver:
    import dns.asyncresolver  # imported only when configured
    import dns.resolver

    from proxy.config.loader import parse_address

    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = []
    for server in nameservers:
        host, port = parse_address(server)
        resolver.nameservers.append(host)
        resolver.nameserver_ports[host] = port
    resolver.lifetime = timeout_s

    async def resolve(host: str, port: int) -> list[tuple[str, int]]:
        with contextlib.suppress(ValueError):
            return [(str(ipaddress.ip_address(host)), port)]  # an IP literal needs no lookup
        found: list[tuple[str, int]] = []
        for kind in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(host, kind, search=False)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            found.extend((rdata.address, port) for rdata in answer)
        return _unique(found)

    return resolve


def resolver_for(config: DiscoveryConfig) -> Resolver:
    if config.nameservers:
        return nameserver_resolver(config.nameservers, timeout_s=max(0.5, min(5.0, config.refresh / 2)))
    return system_resolve


class Discovery:
    """The refresh loop of one upstream."""

    def __init__(self, upstream: str, host: str, port: int, config: DiscoveryConfig, *,
                 on_update: Callable[[Sequence[tuple[str, int]]], None], rng: random.Random,
                 resolver: Resolver | None = None) -> None:
        self.upstream = upstream
        self.host = host
        self.port = port
        self.refresh_s = config.refresh
        self._on_update = on_update
        self._rng = rng
        self._resolve = resolver or resolver_for(config)
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.resolved: list[tuple[str, int]] = []

    async def resolve_once(self) -> bool:
        """Resolve now and hand a non-empty answer on; False (last set kept) on failure."""
        try:
            addresses = await asyncio.wait_for(self._resolve(self.host, self.port), timeout=max(1.0, self.refresh_s))
        except Exception as exc:  # a background loop's boundary: any resolver failure keeps the last set
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if message != self.last_error:
                log.warning("upstream %s: resolving %s failed (%s); keeping the last %d endpoints", self.upstream,
                            self.host, message, len(self.resolved))
            self.last_error = message
            return False
        if not addresses:
            self.last_error = "no addresses"
            log.warning("upstream %s: %s resolved to no address; keeping the last %d endpoints", self.upstream,
                        self.host, len(self.resolved))
            return False
        self.last_error = None
        if addresses != self.resolved:
            self.resolved = addresses
            self._on_update(addresses)
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s * (0.8 + 0.4 * self._rng.random()))
            await self.resolve_once()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
