"""Concurrent-connection limits: per listener, and per recovered client IP.

The per-IP count is keyed on the client the gate recovered, never on a trusted proxy's
address: behind a proxy every connection comes from the proxy, and counting on it would let
one noisy client lock everybody out. A client behind NAT64 is the IPv4 address it carries
(:mod:`mailedge.clients`); the operator's extra prefixes come as ``nat64_prefixes``, and a
slot must be released with the same prefixes it was taken with.

Every connection takes and releases a slot, so the bookkeeping is plain counting on
integers: no context manager, no hashing of address objects.
"""

from __future__ import annotations

from typing import Literal, Protocol, TypeVar

import attrs

from mailedge.clients import Nat64Prefixes, client_key, client_label
from mailedge.proxy import IPAddress

__all__ = ["ConnectionLimits", "SharedCounts", "client_key", "shared_key"]

_Key = TypeVar("_Key")


class SharedCounts(Protocol):
    """Open connections per client counted with other processes (``RedisStore`` is one).

    The server keeps its local count too, and asks only when a local slot was free.
    """

    async def take_connection(self, key: str, limit: int) -> str | Literal[False] | None:
        """Take a slot under ``key`` if fewer than ``limit`` are held everywhere.

        A token to release it with when taken, False when the client is at its limit, None
        when the shared count is unavailable (the local count decides). It must return
        within the store's timeout and never raise.
        """
        ...

    def release_connection(self, key: str, token: str) -> None:
        """Give the slot back; must not block (a slot not given back expires by itself)."""
        ...


def shared_key(listener: str, ip: IPAddress, nat64_prefixes: Nat64Prefixes = ()) -> str:
    """The shared count's key for one client on one listener: ``conn:smtp:198.51.100.7``."""
    return f"conn:{listener}:{client_label(ip, nat64_prefixes=nat64_prefixes)}"


@attrs.define(repr=False)
class ConnectionLimits:
    """Counts open connections by listener and by client.

    ``take_*`` returns whether a slot was free and, if so, holds it; the caller releases a
    held slot with the matching ``release_*`` in a ``finally``.
    """

    _by_listener: dict[str, int] = attrs.field(factory=dict)
    _by_client: dict[tuple[str, int], int] = attrs.field(factory=dict)

    def __repr__(self) -> str:
        return f"<ConnectionLimits open={sum(self._by_listener.values())}>"

    def open_on(self, listener: str) -> int:
        return self._by_listener.get(listener, 0)

    def open_from(self, listener: str, ip: IPAddress, nat64_prefixes: Nat64Prefixes = ()) -> int:
        return self._by_client.get((listener, client_key(ip, nat64_prefixes=nat64_prefixes)), 0)

    def take_listener_slot(self, listener: str, limit: int) -> bool:
        count = self._by_listener.get(listener, 0)
        if count >= limit:
            return False
        self._by_listener[listener] = count + 1
        return True

    def release_listener_slot(self, listener: str) -> None:
        _release(self._by_listener, listener)

    def take_client_slot(
        self, listener: str, ip: IPAddress, limit: int, nat64_prefixes: Nat64Prefixes = ()
    ) -> bool:
        key = (listener, client_key(ip, nat64_prefixes=nat64_prefixes))
        count = self._by_client.get(key, 0)
        if count >= limit:
            return False
        self._by_client[key] = count + 1
        return True

    def release_client_slot(
        self, listener: str, ip: IPAddress, nat64_prefixes: Nat64Prefixes = ()
    ) -> None:
        _release(self._by_client, (listener, client_key(ip, nat64_prefixes=nat64_prefixes)))


def _release(counts: dict[_Key, int], key: _Key) -> None:
    count = counts[key] - 1
    if count:
        counts[key] = count
    else:
        # Drop the key, so a long-running server does not keep one entry per client ever seen.
        del counts[key]
