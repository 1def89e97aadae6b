"""Trusted networks: the peers whose PROXY headers a listener believes.

A :class:`TrustedNetworks` is an immutable set of IPv4 and IPv6 networks, built from the
strings a configuration file holds ("127.0.0.0/8", "::1") or from :mod:`ipaddress` objects,
and answering one question fast: is this peer address inside one of them?

Two normalisations keep IPv4 and IPv6 from drifting apart:

- A dual-stack socket reports an IPv4 peer as an IPv4-mapped IPv6 address
  (``::ffff:127.0.0.1``). :func:`normalize_ip` turns those into plain IPv4 before any lookup,
  so they match the IPv4 entries they came from.
- An entry written in the mapped range (``::ffff:10.0.0.0/104``) is stored as the IPv4
  network it names (``10.0.0.0/8``), so it matches the same peers either way.

Parsing is strict, because a too-lenient allow-list is how a forged client address gets in:
a network with host bits set, a zone id, surrounding whitespace or a netmask in place of the
prefix length is an error that names the entry, never something silently "fixed".
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import NoReturn

import attrs

from mailedge.proxy import IPAddress

__all__ = [
    "EndpointProblem",
    "EndpointSyntaxError",
    "HostPort",
    "IPAddress",
    "IPNetwork",
    "InvalidNetworkError",
    "NetworkEntry",
    "TrustedNetworks",
    "format_endpoint",
    "normalize_ip",
    "parse_network",
    "split_host_port",
]

IPNetwork = IPv4Network | IPv6Network
NetworkEntry = str | IPv4Network | IPv6Network | IPv4Address | IPv6Address


def format_endpoint(host: IPAddress | str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets: ``[2001:db8::1]:25``."""
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


# A port is plain ASCII decimal without leading zeros or signs: "25", never "025" or "+25".
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_MAX_PORT = 0xFFFF
_ENDPOINT_EXAMPLE = "such as '127.0.0.1:25' or '[::1]:25'"


class EndpointProblem(enum.Enum):
    """What makes a text not ``HOST:PORT``; callers may word each one their own way."""

    # A "[" without "]:" after the address.
    MALFORMED = "malformed"
    # Colons in the host without brackets: an IPv6 address that needs them.
    NEEDS_BRACKETS = "needs_brackets"
    NO_PORT = "no_port"
    BAD_PORT = "bad_port"


class EndpointSyntaxError(ValueError):
    """``text`` is not ``HOST:PORT`` or ``[IPv6]:PORT``. The message names ``text``."""

    def __init__(self, text: str, problem: EndpointProblem, port_text: str = "") -> None:
        self.text = text
        self.problem = problem
        self.port_text = port_text
        super().__init__(
            {
                EndpointProblem.MALFORMED: f"{text!r} is not an address and port "
                f"{_ENDPOINT_EXAMPLE}",
                EndpointProblem.NEEDS_BRACKETS: f"{text!r} needs brackets around an IPv6 "
                f"address, {_ENDPOINT_EXAMPLE}",
                EndpointProblem.NO_PORT: f"{text!r} has no port; write an address and port "
                f"{_ENDPOINT_EXAMPLE}",
                EndpointProblem.BAD_PORT: f"{text!r} has an invalid port {port_text!r}; "
                "write a number from 0 to 65535",
            }[problem]
        )


@attrs.frozen
class HostPort:
    """A split ``HOST:PORT``: the host text as written (no brackets) and the port."""

    host: str
    port: int
    # True for "[host]:port": the host was written in brackets, as IPv6 must be.
    bracketed: bool


def split_host_port(text: str, *, default_port: int | None = None) -> HostPort:
    """Split ``HOST:PORT`` or ``[IPv6]:PORT``; the one home of that syntax.

    The host is not checked (an address, a name: the caller decides what it accepts). The
    port is decimal 0-65535 without leading zeros. With ``default_port``, the port may be
    left out, and then a bare IPv6 address (``2001:db8::53``) stands without brackets.
    Raises :class:`EndpointSyntaxError`.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if bracket and rest.startswith(":"):
            return HostPort(host, _port(text, rest[1:]), True)
        if bracket and not rest and default_port is not None:
            return HostPort(host, default_port, True)
        raise EndpointSyntaxError(text, EndpointProblem.MALFORMED)
    host, colon, port_text = text.rpartition(":")
    if default_port is not None and (not colon or ":" in host):
        return HostPort(text, default_port, False)  # a bare address or name
    if ":" in host:
        raise EndpointSyntaxError(text, EndpointProblem.NEEDS_BRACKETS)
    if not colon:
        raise EndpointSyntaxError(text, EndpointProblem.NO_PORT)
    return HostPort(host, _port(text, port_text), False)


def _port(text: str, port_text: str) -> int:
    if not _PORT.fullmatch(port_text) or int(port_text) > _MAX_PORT:
        raise EndpointSyntaxError(text, EndpointProblem.BAD_PORT, port_text)
    return int(port_text)


# The v4-mapped IPv6 block, ::ffff:0:0/96: its low 32 bits are an IPv4 address.
_MAPPED_PREFIX = 0xFFFF << 32
_MAPPED_PREFIXLEN = 96
# A prefix length is plain ASCII decimal without leading zeros: "/8", never "/08" or "/255.0.0.0".
_PREFIXLEN = re.compile(r"0|[1-9][0-9]{0,2}")
# repr() shows this many networks and then a count, so a 5,000-entry list stays one short line.
_REPR_ENTRIES = 4


class InvalidNetworkError(ValueError):
    """An entry that is not a valid trusted network. The message names the entry."""

    def __init__(self, entry: object, message: str) -> None:
        super().__init__(message)
        self.entry = entry
        self.message = message


def normalize_ip(ip: IPAddress) -> IPAddress:
    """Return ``ip``, with an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) turned into IPv4.

    A dual-stack (``::``) socket reports IPv4 peers in the mapped form; everything that
    compares, logs or bans peer addresses should see the IPv4 address instead.
    """
    if isinstance(ip, IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return mapped
    return ip


def _format_ip(ip: IPAddress) -> str:
    # Python 3.13 started printing mapped addresses dotted; spell them one way on every version.
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _normalize_network(network: IPNetwork) -> IPNetwork:
    """Store a network inside ::ffff:0:0/96 as the IPv4 network it names."""
    if (
        isinstance(network, IPv6Network)
        and network.prefixlen >= _MAPPED_PREFIXLEN
        and int(network.network_address) >> 32 == _MAPPED_PREFIX >> 32
    ):
        return IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - _MAPPED_PREFIXLEN)
        )
    return network


def _reject(entry: object, reason: str | None = None) -> NoReturn:
    message = f"{entry!r} is not an IP network"
    raise InvalidNetworkError(entry, message if reason is None else f"{message}: {reason}")


def _parse_text(entry: str) -> IPNetwork:
    if not entry:
        _reject(entry, "the entry is empty")
    if any(char.isspace() for char in entry):
        _reject(entry, "remove the whitespace")
    if not entry.isprintable():
        _reject(entry)
    if "%" in entry:
        zone = "%" + entry.partition("%")[2].partition("/")[0]
        _reject(entry, f"zone ids ({zone!r}) are not allowed")
    address_text, slash, prefix_text = entry.partition("/")
    address: IPAddress
    try:
        address = IPv6Address(address_text) if ":" in address_text else IPv4Address(address_text)
    except ValueError:
        _reject(entry)
    if not slash:
        return _normalize_network(
            IPv4Network(address) if isinstance(address, IPv4Address) else IPv6Network(address)
        )
    bits = address.max_prefixlen
    if not _PREFIXLEN.fullmatch(prefix_text) or int(prefix_text) > bits:
        _reject(entry, f"the prefix length must be a number from 0 to {bits}")
    prefixlen = int(prefix_text)
    host_mask = (1 << (bits - prefixlen)) - 1
    if int(address) & host_mask:
        network_address = type(address)(int(address) & ~host_mask & ((1 << bits) - 1))
        raise InvalidNetworkError(
            entry,
            f"{entry!r} has host bits set: write '{_format_ip(network_address)}/{prefixlen}' "
            f"for the network or '{address_text}' for one host",
        )
    network = (
        IPv4Network((address, prefixlen))
        if isinstance(address, IPv4Address)
        else IPv6Network((address, prefixlen))
    )
    return _normalize_network(network)


def parse_network(entry: NetworkEntry) -> IPNetwork:
    """Parse one trusted-network entry strictly, and normalise it.

    Accepts "10.0.0.0/8", "2001:db8::/32", a bare address ("::1" means ``::1/128``) or an
    :mod:`ipaddress` address or network object. Raises :class:`InvalidNetworkError` for
    anything else, including host bits set ("10.0.0.1/8"), zone ids and whitespace.
    """
    if isinstance(entry, str):
        return _parse_text(entry)
    if isinstance(entry, IPv4Address | IPv6Address):
        if isinstance(entry, IPv6Address) and entry.scope_id is not None:
            _reject(entry, "zone ids are not allowed")
        host = normalize_ip(entry)
        return IPv4Network(host) if isinstance(host, IPv4Address) else IPv6Network(host)
    if isinstance(entry, IPv4Network | IPv6Network):
        if isinstance(entry, IPv6Network) and entry.network_address.scope_id is not None:
            _reject(entry, "zone ids are not allowed")
        return _normalize_network(entry)
    raise TypeError(
        f"a trusted network is a string, an address or a network, not {type(entry).__name__}"
    )


def _lookup_table(
    networks: Iterable[IPNetwork], bits: int
) -> tuple[tuple[int, frozenset[int]], ...]:
    by_prefixlen: dict[int, set[int]] = {}
    for network in networks:
        by_prefixlen.setdefault(network.prefixlen, set()).add(int(network.network_address))
    full = (1 << bits) - 1
    # Longest prefixes first: single hosts (/32, /128) are the most common entries.
    return tuple(
        (full ^ ((1 << (bits - prefixlen)) - 1), frozenset(addresses))
        for prefixlen, addresses in sorted(by_prefixlen.items(), reverse=True)
    )


class TrustedNetworks:
    """An immutable set of IPv4 and IPv6 networks, tested with ``ip in networks``.

    Iteration, :attr:`networks` and ``repr`` keep the input order, without duplicates;
    equality and hashing ignore order. An empty instance is falsy: a listener whose
    effective trusted networks are empty does not accept PROXY headers at all.
    """

    # Membership is a set lookup per distinct prefix length, not a scan of the entries: per
    # IP version, a tuple of (netmask, frozenset of network addresses as integers), one pair
    # per prefix length present. A lookup masks the address once per pair and probes the
    # set, so it costs O(distinct prefix lengths), at most 33 for IPv4 and 129 for IPv6,
    # whether the list holds 3 entries or 50,000. A radix trie would do the same in more
    # Python code; a sorted list with bisect cannot handle overlapping networks simply.
    __slots__ = ("_hash", "_networks", "_set", "_v4", "_v6")

    _networks: tuple[IPNetwork, ...]
    _set: frozenset[IPNetwork]
    _v4: tuple[tuple[int, frozenset[int]], ...]
    _v6: tuple[tuple[int, frozenset[int]], ...]
    _hash: int

    def __init__(self, entries: Iterable[NetworkEntry] = ()) -> None:
        if isinstance(entries, str):
            raise TypeError(
                f"TrustedNetworks takes a list of entries, not one string: "
                f"write TrustedNetworks([{entries!r}])"
            )
        networks = tuple(dict.fromkeys(parse_network(entry) for entry in entries))
        set_ = frozenset(networks)
        object.__setattr__(self, "_networks", networks)
        object.__setattr__(self, "_set", set_)
        object.__setattr__(
            self, "_v4", _lookup_table((n for n in networks if isinstance(n, IPv4Network)), 32)
        )
        object.__setattr__(
            self, "_v6", _lookup_table((n for n in networks if isinstance(n, IPv6Network)), 128)
        )
        object.__setattr__(self, "_hash", hash(set_))

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"TrustedNetworks is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"TrustedNetworks is immutable; cannot delete {name!r}")

    def __reduce__(self) -> tuple[type[TrustedNetworks], tuple[tuple[IPNetwork, ...]]]:
        return (TrustedNetworks, (self._networks,))

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        """The normalised networks, in input order, without duplicates."""
        return self._networks

    def __contains__(self, ip: object) -> bool:
        """True when ``ip`` (an address object; v4-mapped IPv6 counts as IPv4) is inside."""
        if isinstance(ip, IPv4Address):
            table = self._v4
        elif isinstance(ip, IPv6Address):
            mapped = ip.ipv4_mapped
            if mapped is not None:
                ip, table = mapped, self._v4
            else:
                table = self._v6
        else:
            # A string here is almost always a bug (a peer never parsed); fail loudly.
            raise TypeError(
                f"test membership with an IPv4Address or IPv6Address, not {type(ip).__name__}"
            )
        value = int(ip)
        return any(value & mask in addresses for mask, addresses in table)

    def __len__(self) -> int:
        return len(self._networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(self._networks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustedNetworks):
            return NotImplemented
        return self._set == other._set

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        shown = ", ".join(repr(str(network)) for network in self._networks[:_REPR_ENTRIES])
        more = len(self._networks) - _REPR_ENTRIES
        if more > 0:
            shown += f", ... {more} more"
        return f"TrustedNetworks([{shown}])"

    def union(self, *others: TrustedNetworks) -> TrustedNetworks:
        """Every network in this list and in ``others``, in that order, without duplicates."""
        merged: list[IPNetwork] = list(self._networks)
        for other in others:
            merged.extend(other._networks)
        return TrustedNetworks(merged)

    def __or__(self, other: object) -> TrustedNetworks:
        if not isinstance(other, TrustedNetworks):
            return NotImplemented
        return self.union(other)
