"""The open sessions, by recovered client: what a policy ends when it bans a client.

The server lists every session with a known client in :class:`OpenSessions`, which is the
:class:`~mailedge.policy.Sessions` it hands its hooks (``Hooks.on_start``). ``end(client,
reason)`` ends every session of a client, or of a network such as a ban's IPv6 /64, on every
listener: the handler's next read raises :class:`~mailedge.streams.SessionEnded`, and it says
goodbye; a session that does not finish is cancelled ``SESSION_END_GRACE`` later.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import attrs
import trio

from mailedge.clients import Nat64Prefixes, client_key
from mailedge.networks import IPNetwork
from mailedge.proxy import IPAddress
from mailedge.streams import IdleTimeoutStream

__all__ = ["SESSION_END_GRACE", "LiveSession", "OpenSessions"]

# A session a policy ends (a ban) gets this long to say goodbye before it is cancelled: a
# handler reading is told at once; one stuck sending to a peer that does not read, or in a
# slow hook, is cut here, so a banned client's sessions are gone within a second.
SESSION_END_GRACE = 1.0


@attrs.define(eq=False, repr=False)
class LiveSession:
    """One open session as the registry holds it."""

    scope: trio.CancelScope
    stream: IdleTimeoutStream | None = None
    # Why a policy ended it; None while it runs.
    ended: str | None = None

    def end(self, reason: str) -> None:
        if self.ended is not None:
            return
        self.ended = reason
        if self.stream is not None:
            self.stream.end(reason)
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + SESSION_END_GRACE)


@attrs.define(repr=False)
class OpenSessions:
    """The open sessions with a known client, by client; a :class:`~mailedge.policy.Sessions`.

    ``end(client, reason)`` ends those of one client (an address) or of a network (a ban's
    IPv6 /64), matched with :func:`~mailedge.clients.client_key` at the network's prefix, the
    rule bans are keyed by. It does not wait: each session's handler is told at its next read
    (at once, if it is reading), and its scope is cancelled ``SESSION_END_GRACE`` later.
    """

    # The operator's NAT64 prefixes as the settings say now (the server passes its gate's), so
    # that a ban on an IPv4 client ends its sessions that came through them.
    nat64_prefixes: Callable[[], Nat64Prefixes] = attrs.field(default=tuple, kw_only=True)
    _by_client: dict[IPAddress, set[LiveSession]] = attrs.field(factory=dict, init=False)

    def __repr__(self) -> str:
        return f"<OpenSessions {len(self)} of {len(self._by_client)} clients>"

    def __len__(self) -> int:
        return sum(map(len, self._by_client.values()))

    def add(self, client: IPAddress, live: LiveSession) -> None:
        self._by_client.setdefault(client, set()).add(live)

    def discard(self, client: IPAddress, live: LiveSession) -> None:
        lives = self._by_client.get(client)
        if lives is not None:
            lives.discard(live)
            if not lives:
                del self._by_client[client]

    def end(self, client: IPAddress | IPNetwork, reason: str) -> int:
        match = _client_matcher(client, self.nat64_prefixes())
        ended = 0
        for ip, lives in list(self._by_client.items()):
            if match(ip):
                for live in lives:
                    if live.ended is None:
                        live.end(reason)
                        ended += 1
        return ended


def _client_matcher(
    client: IPAddress | IPNetwork, nat64: Nat64Prefixes
) -> Callable[[IPAddress], bool]:
    """Whether a session's client is ``client``, or in it, by the rule of clients.client_key."""
    if isinstance(client, ipaddress.IPv4Address | ipaddress.IPv6Address):
        client = ipaddress.ip_network(client)
    if isinstance(client, ipaddress.IPv4Network):
        low, high = int(client.network_address), int(client.broadcast_address)
        # client_key is the IPv4 address for IPv4 clients (and IPv4 clients in IPv6 dress).
        return lambda ip: low <= client_key(ip, nat64_prefixes=nat64) <= high
    prefix = client.prefixlen
    wanted = client_key(client.network_address, prefix, nat64)
    return lambda ip: client_key(ip, prefix, nat64) == wanted
