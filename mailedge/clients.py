"""What one client is, for counting: the one home of the IPv6 prefix rule.

Connection counts, rate limits and bans all count the client the gate recovered, never the
proxy. An IPv4 client is its address. An IPv6 client is the network of its first
``ipv6_prefix`` bits, because one host normally owns a whole /64 (SLAAC, RFC 7421) and could
otherwise rotate through 2**64 addresses. An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``)
is the IPv4 client it maps.

Two forms of the same key: :func:`client_key`, an integer for the per-connection counts (no
object built on the hot path), and :func:`client_label`, text for store keys, logs and the
admin API.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Network

from mailedge.proxy import IPAddress

__all__ = ["DEFAULT_IPV6_PREFIX", "client_key", "client_label"]

# One IPv6 host normally owns a whole /64 (SLAAC, RFC 7421), so limits and bans on single
# addresses would let it rotate through 2**64 of them. Postfix uses /84 for its limits.
DEFAULT_IPV6_PREFIX = 64

# The top 96 bits of ::ffff:a.b.c.d, shifted down by 32.
_V4_MAPPED = 0xFFFF
# Set on every IPv6 key: it lies above any IPv4 address, so the two families never collide.
_V6_FLAG = 1 << 128


def client_key(ip: IPAddress, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> int:
    """The client ``ip`` belongs to, as an integer: an IPv4 address, or an IPv6 network."""
    value = int(ip)
    if ip.version == 4:
        return value
    if value >> 32 == _V4_MAPPED:
        return value & 0xFFFFFFFF
    return _V6_FLAG | (value >> (128 - ipv6_prefix))


def client_label(ip: IPAddress, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """The same client as text: ``"198.51.100.7"``, ``"2001:db8:1:2::/64"``."""
    key = client_key(ip, ipv6_prefix)
    if key < _V6_FLAG:
        return str(IPv4Address(key))
    shift = 128 - ipv6_prefix
    return str(IPv6Network(((key ^ _V6_FLAG) << shift, ipv6_prefix)))
