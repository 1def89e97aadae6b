"""Concurrent-connection limits: per listener, and per recovered client IP.

The per-IP count is keyed on the client the gate recovered, never on a trusted proxy's
address: behind a proxy every connection comes from the proxy, and counting on it would let
one noisy client lock everybody out.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
from collections.abc import Iterator

import attrs

__all__ = ["ConnectionLimits", "client_key"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# One IPv6 host normally owns a whole /64, so counting single addresses would let it open
# 2**64 times the limit.
IPV6_CLIENT_PREFIX = 64


def client_key(ip: IPAddress) -> IPAddress | ipaddress.IPv6Network:
    """What one "client" is for counting: an IPv4 address, or an IPv6 /64."""
    if ip.version == 4:
        return ip
    return ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False)


@attrs.define(repr=False)
class ConnectionLimits:
    """Counts open connections by listener and by client; both are released on exit."""

    _by_listener: collections.Counter[str] = attrs.field(factory=collections.Counter)
    _by_client: collections.Counter[tuple[str, object]] = attrs.field(factory=collections.Counter)

    def __repr__(self) -> str:
        return f"<ConnectionLimits open={self._by_listener.total()}>"

    def open_on(self, listener: str) -> int:
        return self._by_listener[listener]

    def open_from(self, listener: str, ip: IPAddress) -> int:
        return self._by_client[listener, client_key(ip)]

    @contextlib.contextmanager
    def listener_slot(self, listener: str, limit: int) -> Iterator[bool]:
        """Yields whether a slot was free; a taken slot is held until the block exits."""
        if self._by_listener[listener] >= limit:
            yield False
            return
        self._by_listener[listener] += 1
        try:
            yield True
        finally:
            self._by_listener[listener] -= 1
            if not self._by_listener[listener]:
                del self._by_listener[listener]

    @contextlib.contextmanager
    def client_slot(self, listener: str, ip: IPAddress, limit: int) -> Iterator[bool]:
        """Like ``listener_slot``, counted per client on one listener."""
        key = (listener, client_key(ip))
        if self._by_client[key] >= limit:
            yield False
            return
        self._by_client[key] += 1
        try:
            yield True
        finally:
            self._by_client[key] -= 1
            if not self._by_client[key]:
                del self._by_client[key]
