"""What one client is, for counting: the one home of the IPv6 prefix and NAT64 rules.

Connection counts, rate limits and bans all count the client the gate recovered, never the
proxy. An IPv4 client is its address. An IPv6 client is the network of its first
``ipv6_prefix`` bits, because one host normally owns a whole /64 (SLAAC, RFC 7421) and could
otherwise rotate through 2**64 addresses.

An IPv6 address that carries an IPv4 client is that IPv4 client:

- an IPv4-mapped address (``::ffff:a.b.c.d``), which a dual-stack socket reports;
- an address a NAT64 translator made for an IPv4 client (RFC 6052): under the well-known
  prefix ``64:ff9b::/96``, under the local-use prefix ``64:ff9b:1::/48`` (RFC 8215, with the
  /48 layout of RFC 6052 section 2.2), or under one of the ``/96`` prefixes the operator
  lists (``nat64Prefixes``, passed here as ``nat64_prefixes``).

Behind NAT64 every IPv4 client shares the translator's prefix, so the /64 rule would make
all of them one client: one guesser's failures would ban them all, and one sender would
spend everyone's rate budget.

Two forms of the same key: :func:`client_key`, an integer for the per-connection counts (no
object built on the hot path), and :func:`client_label`, text for store keys, logs and the
admin API. :func:`describe_client` is what logs show: the label, and for an IPv6 address
counted as an IPv4 client both forms, ``64:ff9b::c633:6407 (as 198.51.100.7)``.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Network

from mailedge.proxy import IPAddress

__all__ = [
    "DEFAULT_IPV6_PREFIX",
    "LOCAL_USE_NAT64_PREFIX",
    "NAT64_PREFIX_LENGTH",
    "WELL_KNOWN_NAT64_PREFIX",
    "Nat64Prefixes",
    "client_key",
    "client_label",
    "describe_client",
    "embedded_ipv4",
    "parse_nat64_prefix",
]

# One IPv6 host normally owns a whole /64 (SLAAC, RFC 7421), so limits and bans on single
# addresses would let it rotate through 2**64 of them. Postfix uses /84 for its limits.
DEFAULT_IPV6_PREFIX = 64

# RFC 6052's well-known prefix: the IPv4 client is the last 32 bits.
WELL_KNOWN_NAT64_PREFIX = IPv6Network("64:ff9b::/96")
# RFC 8215's local-use prefix, read with RFC 6052's /48 layout: the IPv4 address fills bits
# 48-63 and 72-87, around the reserved "u" octet (bits 64-71).
LOCAL_USE_NAT64_PREFIX = IPv6Network("64:ff9b:1::/48")
# The one form an operator's prefix may take: the IPv4 client in the last 32 bits, the layout
# every NAT64 in common use (Jool, Tayga, cloud NAT gateways) is configured with. The shorter
# RFC 6052 layouts split the address around the u octet; nobody asked for them.
NAT64_PREFIX_LENGTH = 96

# Extra /96 prefixes whose addresses carry an IPv4 client: SystemSettings.nat64_prefixes.
Nat64Prefixes = tuple[IPv6Network, ...]

_LOW32 = 0xFFFFFFFF
# The top 96 bits of ::ffff:a.b.c.d and of 64:ff9b::a.b.c.d, shifted down by 32.
_V4_MAPPED = 0xFFFF
_WELL_KNOWN = int(WELL_KNOWN_NAT64_PREFIX.network_address) >> 32
# The top 48 bits of 64:ff9b:1::/48, shifted down by 80.
_LOCAL_USE = int(LOCAL_USE_NAT64_PREFIX.network_address) >> 80
# Set on every IPv6 key: it lies above any IPv4 address, so the two families never collide.
_V6_FLAG = 1 << 128


def _embedded(value: int, nat64_prefixes: Nat64Prefixes) -> int | None:
    """The IPv4 address inside the IPv6 address ``value``, as an integer, or None."""
    top = value >> 32
    if top in (_V4_MAPPED, _WELL_KNOWN):
        return value & _LOW32
    # The operator's /96 prefixes before the local-use /48, which some of them may lie in.
    for network in nat64_prefixes:
        if top == int(network.network_address) >> 32:
            return value & _LOW32
    if value >> 80 == _LOCAL_USE:
        # RFC 6052 2.2, /48: bits 48-63 hold the first two octets, 72-87 the last two.
        return ((value >> 48) & 0xFFFF0000) | ((value >> 40) & 0xFFFF)
    return None


def client_key(
    ip: IPAddress, ipv6_prefix: int = DEFAULT_IPV6_PREFIX, nat64_prefixes: Nat64Prefixes = ()
) -> int:
    """The client ``ip`` belongs to, as an integer: an IPv4 address, or an IPv6 network."""
    value = int(ip)
    if ip.version == 4:
        return value
    # Every IPv6 connection comes through here: the two /96 forms inline, the rest only when
    # the operator lists prefixes or the address is in the local-use /48.
    if value >> 32 in (_V4_MAPPED, _WELL_KNOWN):
        return value & _LOW32
    if nat64_prefixes or value >> 80 == _LOCAL_USE:
        embedded = _embedded(value, nat64_prefixes)
        if embedded is not None:
            return embedded
    return _V6_FLAG | (value >> (128 - ipv6_prefix))


def client_label(
    ip: IPAddress, ipv6_prefix: int = DEFAULT_IPV6_PREFIX, nat64_prefixes: Nat64Prefixes = ()
) -> str:
    """The same client as text: ``"198.51.100.7"``, ``"2001:db8:1:2::/64"``."""
    key = client_key(ip, ipv6_prefix, nat64_prefixes)
    if key < _V6_FLAG:
        return str(IPv4Address(key))
    shift = 128 - ipv6_prefix
    return str(IPv6Network(((key ^ _V6_FLAG) << shift, ipv6_prefix)))


def embedded_ipv4(ip: IPAddress, nat64_prefixes: Nat64Prefixes = ()) -> IPv4Address | None:
    """The IPv4 client an IPv6 address carries (mapped or NAT64), or None."""
    if ip.version == 4:
        return None
    embedded = _embedded(int(ip), nat64_prefixes)
    return None if embedded is None else IPv4Address(embedded)


def describe_client(
    ip: IPAddress, ipv6_prefix: int = DEFAULT_IPV6_PREFIX, nat64_prefixes: Nat64Prefixes = ()
) -> str:
    """The client as logs show it: its label, or both forms for an embedded IPv4 client."""
    embedded = embedded_ipv4(ip, nat64_prefixes)
    if embedded is not None:
        return f"{ip} (as {embedded})"
    return client_label(ip, ipv6_prefix, nat64_prefixes)


def parse_nat64_prefix(entry: str | IPv6Network) -> IPv6Network:
    """Parse one operator NAT64 prefix: an IPv6 network in the ``/96`` form, strictly.

    Raises ``ValueError`` naming ``entry``: an address without a length, another length,
    host bits set, whitespace, a zone id or an IPv4 network.
    """
    if isinstance(entry, IPv6Network):
        network = entry
        if network.network_address.scope_id is not None:
            raise ValueError(f"{str(entry)!r} is not a NAT64 prefix: zone ids are not allowed")
    elif isinstance(entry, str):
        network = _parse_prefix_text(entry)
    else:
        raise TypeError(f"a NAT64 prefix is a string or an IPv6Network, not {type(entry).__name__}")
    if network.prefixlen != NAT64_PREFIX_LENGTH:
        raise ValueError(
            f"{str(entry)!r} is a /{network.prefixlen}; a NAT64 prefix must be given as a "
            f"/{NAT64_PREFIX_LENGTH} (the IPv4 client in its last 32 bits)"
        )
    return network


def _parse_prefix_text(text: str) -> IPv6Network:
    expected = (
        f"{text!r} is not a NAT64 prefix: expected an IPv6 network such as "
        f"'2001:db8:64::/{NAT64_PREFIX_LENGTH}', with no bits set after the prefix"
    )
    # Whitespace and zone ids, which ip_network would pass over or choke on, are refused.
    if "%" in text or text != text.strip():
        raise ValueError(expected)
    try:
        network = IPv6Network(text)
    except ValueError:
        if _is_ipv4(text):
            raise ValueError(f"{text!r} is not a NAT64 prefix: it is IPv4, not IPv6") from None
        raise ValueError(expected) from None
    if "/" not in text:
        raise ValueError(
            f"{text!r} is not a NAT64 prefix: write it with its length, "
            f"'{text}/{NAT64_PREFIX_LENGTH}'"
        )
    return network


def _is_ipv4(text: str) -> bool:
    try:
        IPv4Network(text, strict=False)
    except ValueError:
        return False
    return True
