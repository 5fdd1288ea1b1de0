"""Loopback ports for tests that must write a port into a config before anything binds it.

``bind(("127.0.0.1", 0))`` then close hands back a port from the kernel's
ephemeral range, and the kernel may hand the very same port to the next
``bind(0)`` or to any outgoing connection a moment later: two ports taken
that way for one sidecar (admin and listener) can collide.  ``free_port``
therefore picks below the ephemeral range, where outgoing connections never
land, never returns a port twice in one test process, and checks that the
port can be bound right now.
"""

from __future__ import annotations

import os
import random
import socket

__all__ = ["free_port"]

_LOWEST = 20000
_handed_out: set[int] = set()
# Seeded by the process id so that two test processes on one machine start in different places.
_rng = random.Random(os.getpid())


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_HIGHEST = max(_LOWEST + 1000, _ephemeral_floor())


def free_port() -> int:
    """A loopback port that nothing listens on now, below the ephemeral range, unique in this process."""
    for _ in range(2000):
        port = _rng.randrange(_LOWEST, _HIGHEST)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            # As the servers under test bind: SO_REUSEADDR, so a TIME_WAIT leftover does not disqualify it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {_LOWEST}-{_HIGHEST}")
