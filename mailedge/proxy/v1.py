"""PROXY protocol v1: the text line ``PROXY TCP4|TCP6|UNKNOWN ... CRLF``.

The common, valid lines go through one precompiled regular expression each; anything
else (an error, an incomplete line, UNKNOWN, nginx's mixed families) takes the slow path,
which validates field by field and says exactly what is wrong.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address

from mailedge.proxy.errors import (
    DisallowedFamilyError,
    HeaderTooLongError,
    InvalidAddressError,
    InvalidPortError,
    NotProxyHeaderError,
    V1SyntaxError,
)
from mailedge.proxy.header import (
    Command,
    Family,
    InetAddress,
    ProxyHeader,
    Transport,
)
from mailedge.proxy.tlv import show

__all__ = [
    "V1_MAX_LENGTH",
    "V1_PREFIX",
    "parse_v1",
]

# The spec's bound on a whole v1 line, CRLF included: a receiver never reads further.
V1_MAX_LENGTH = 107
# Every v1 header starts with these 6 bytes.
V1_PREFIX = b"PROXY "
# The longest IPv6 text: six hex groups and an embedded dotted quad.
_IPV6_MAX_TEXT = 45

# One octet 0-255 without leading zeros, and one port 0-65535 without leading zeros.
_OCTET = rb"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_PORT = rb"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0)"
_IPV4 = _OCTET + rb"\." + _OCTET + rb"\." + _OCTET + rb"\." + _OCTET
# The whole TCP4 grammar: a match is a complete, valid line.
_TCP4_LINE = re.compile(
    rb"PROXY TCP4 " + _IPV4 + b" " + _IPV4 + b" " + _PORT + b" " + _PORT + b"\r\n"
)
# TCP6 with the IPv6 character set; the addresses are then checked by _ipv6_int.
_IPV6_CHARS = rb"([0-9A-Fa-f:.]{2,45})"
_TCP6_LINE = re.compile(
    rb"PROXY TCP6 " + _IPV6_CHARS + b" " + _IPV6_CHARS + b" " + _PORT + b" " + _PORT + b"\r\n"
)
_IPV6_TEXT = re.compile(rb"[0-9A-Fa-f:.]*")
_PORT_TEXT = re.compile(_PORT)

# Every canonical octet text -> its value; leading zeros, "+1", " 1" and full-width digits
# are simply absent. The shifted copies save the shifts on the hot path.
_OCTETS = {str(value).encode("ascii"): value for value in range(256)}
_OCTETS_8 = {text: value << 8 for text, value in _OCTETS.items()}
_OCTETS_16 = {text: value << 16 for text, value in _OCTETS.items()}
_OCTETS_24 = {text: value << 24 for text, value in _OCTETS.items()}
_zfill = bytes.zfill
_FOURS = (4,) * 8
# The zero digits that "::" stands for, by the number of groups it replaces.
_ZERO_GROUPS = tuple(b"0000" * count for count in range(9))
_V4_MAPPED = 0xFFFF  # the top 96 bits of ::ffff:a.b.c.d
_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
_FIELD_NAMES = ("source address", "destination address", "source port", "destination port")

_PROXY = Command.PROXY
_INET = Family.INET
_INET6 = Family.INET6
_UNSPEC = Family.UNSPEC
_STREAM = Transport.STREAM
_UNKNOWN_HEADER = ProxyHeader(1, _PROXY, _UNSPEC, _STREAM, None, None, (), None, False)


def parse_v1(
    data: bytes, allow_mixed_family: bool, normalize_v4_mapped: bool
) -> tuple[ProxyHeader, int] | None:
    """Parse a v1 line at the start of ``data`` (which starts with ``P``)."""
    match = _TCP4_LINE.match(data)
    if match is not None:
        a, b, c, d, e, f, g, h, sport, dport = match.groups()
        return ProxyHeader(
            1,
            _PROXY,
            _INET,
            _STREAM,
            InetAddress(
                IPv4Address(_OCTETS_24[a] | _OCTETS_16[b] | _OCTETS_8[c] | _OCTETS[d]),
                int(sport),
            ),
            InetAddress(
                IPv4Address(_OCTETS_24[e] | _OCTETS_16[f] | _OCTETS_8[g] | _OCTETS[h]),
                int(dport),
            ),
        ), match.end()
    match = _TCP6_LINE.match(data)
    if match is not None:
        end = match.end()
        source, destination, sport, dport = match.groups()
        src = _ipv6_int(source)
        dst = _ipv6_int(destination)
        if src is not None and dst is not None and end <= V1_MAX_LENGTH:
            if normalize_v4_mapped and (src >> 32 == _V4_MAPPED or dst >> 32 == _V4_MAPPED):
                source_ip, destination_ip = _ip6(src, True), _ip6(dst, True)
            else:
                source_ip, destination_ip = IPv6Address(src), IPv6Address(dst)
            return ProxyHeader(
                1,
                _PROXY,
                _INET6,
                _STREAM,
                InetAddress(source_ip, int(sport)),
                InetAddress(destination_ip, int(dport)),
            ), end
    return _parse_slow(data, allow_mixed_family, normalize_v4_mapped)


def _ip6(value: int, normalize_v4_mapped: bool) -> IPv4Address | IPv6Address:
    if normalize_v4_mapped and value >> 32 == _V4_MAPPED:
        return IPv4Address(value & 0xFFFFFFFF)
    return IPv6Address(value)


def _ipv4_int(text: bytes) -> int | None:
    """The value of a canonical dotted quad, or None."""
    parts = text.split(b".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        octet = _OCTETS.get(part)
        if octet is None:
            return None
        value = value << 8 | octet
    return value


def _ipv6_int(text: bytes) -> int | None:
    """The value of IPv6 text (RFC 4291 forms, no zone id, no brackets), or None.

    ``text`` must already be known to hold only hex digits, colons and dots. Each group is
    zero-filled to 4 digits and the 32 digits become one int: far cheaper than a loop.
    """
    if b"." in text:
        return _ipv6_embedded_int(text)
    head, double_colon, tail = text.partition(b"::")
    if double_colon:
        groups = head.split(b":") if head else []
        rest = tail.split(b":") if tail else []
        fill = 8 - len(groups) - len(rest)
        if fill < 1 or b"" in groups or b"" in rest:
            return None
        digits = (
            b"".join(map(_zfill, groups, _FOURS))
            + _ZERO_GROUPS[fill]
            + b"".join(map(_zfill, rest, _FOURS))
        )
    else:
        groups = text.split(b":")
        if len(groups) != 8 or b"" in groups:
            return None
        digits = b"".join(map(_zfill, groups, _FOURS))
    # A group of more than 4 digits would make the text longer than 32 digits.
    return int(digits, 16) if len(digits) == 32 else None


def _ipv6_embedded_int(text: bytes) -> int | None:
    """IPv6 text whose last 32 bits are a dotted quad, e.g. ``::ffff:192.0.2.1``."""
    colon = text.rfind(b":")
    v4 = _ipv4_int(text[colon + 1 :]) if colon >= 0 else None
    if v4 is None:
        return None
    return _ipv6_int(text[: colon + 1] + b"%x:%x" % (v4 >> 16, v4 & 0xFFFF))


def _ipv4_prefix_ok(text: bytes) -> bool:
    """True when ``text`` can still grow into a canonical dotted quad."""
    parts = text.split(b".")
    if len(parts) > 4:
        return False
    for part in parts[:-1]:
        if part not in _OCTETS:
            return False
    return parts[-1] == b"" or parts[-1] in _OCTETS


def _ipv6_prefix_ok(text: bytes) -> bool:
    """True when ``text`` can still grow into IPv6 text that _ipv6_int accepts."""
    if len(text) > _IPV6_MAX_TEXT or _IPV6_TEXT.fullmatch(text) is None:
        return False
    compressed = b"::" in text
    if b":::" in text or text.count(b"::") > 1:
        return False
    if text.startswith(b":") and not text.startswith(b"::") and len(text) > 1:
        return False  # a leading colon only ever begins "::"
    pieces = text.split(b":")
    for piece in pieces[:-1]:
        if len(piece) > 4 or b"." in piece:
            return False
    last = pieces[-1]
    # Groups so far (a dotted quad is two), one at least for "::", one more after a
    # trailing single colon: together they must fit in eight.
    groups = sum(1 for piece in pieces if piece) + (1 if b"." in last else 0)
    groups += compressed + (text.endswith(b":") and not text.endswith(b"::"))
    if groups > 8:
        return False
    if b"." in last:
        return len(pieces) > 1 and _ipv4_prefix_ok(last)
    return len(last) <= 4


def _port_prefix_ok(text: bytes) -> bool:
    return text == b"" or _PORT_TEXT.fullmatch(text) is not None


def _mixed_error(
    protocol: bytes, name: str, text: bytes, other: str, partial: bool = False
) -> DisallowedFamilyError:
    what = f"can only go on as an {other} address" if partial else f"is an {other} address"
    return DisallowedFamilyError(
        f"v1 {protocol.decode()} {name} {show(text)} {what}; this mixed-family form (sent by "
        "nginx) is accepted only with allow_v1_mixed_family=True"
    )


def _address(
    protocol: bytes,
    name: str,
    text: bytes,
    allow_mixed_family: bool,
    normalize_v4_mapped: bool,
) -> IPv4Address | IPv6Address:
    """Validate a complete address field for its protocol and build the address."""
    v4 = _ipv4_int(text)
    v6 = None
    if len(text) <= _IPV6_MAX_TEXT and _IPV6_TEXT.fullmatch(text) is not None:
        v6 = _ipv6_int(text)
    if protocol == b"TCP4":
        if v4 is not None:
            return IPv4Address(v4)
        if v6 is not None:
            if not allow_mixed_family:
                raise _mixed_error(protocol, name, text, "IPv6")
            return _ip6(v6, normalize_v4_mapped)
        raise InvalidAddressError(
            f"v1 TCP4 {name} {show(text)} is not a dotted-quad IPv4 address "
            "(octets 0-255, no leading zeros)"
        )
    if v6 is not None:
        return _ip6(v6, normalize_v4_mapped)
    if v4 is not None:
        if not allow_mixed_family:
            raise _mixed_error(protocol, name, text, "IPv4")
        return IPv4Address(v4)
    raise InvalidAddressError(
        f"v1 TCP6 {name} {show(text)} is not an IPv6 address (hex groups, no zone id, no brackets)"
    )


def _port(name: str, text: bytes) -> int:
    if _PORT_TEXT.fullmatch(text) is None:
        raise InvalidPortError(
            f"v1 {name} {show(text)} is not a decimal 0-65535 without leading zeros"
        )
    return int(text)


def _check_partial_field(
    protocol: bytes, index: int, text: bytes, allow_mixed_family: bool
) -> None:
    """Reject the field being received when no continuation can make it valid."""
    name = _FIELD_NAMES[index]
    if index >= 2:
        if not _port_prefix_ok(text):
            raise InvalidPortError(
                f"v1 {name} {show(text)} is not a decimal 0-65535 without leading zeros"
            )
        return
    own, other = (
        (_ipv4_prefix_ok, _ipv6_prefix_ok)
        if protocol == b"TCP4"
        else (_ipv6_prefix_ok, _ipv4_prefix_ok)
    )
    if own(text):
        return
    if other(text):
        if allow_mixed_family:
            return
        other_name = "IPv6" if protocol == b"TCP4" else "IPv4"
        raise _mixed_error(protocol, name, text, other_name, partial=True)
    family = "a dotted-quad IPv4" if protocol == b"TCP4" else "an IPv6"
    raise InvalidAddressError(f"v1 {protocol.decode()} {name} {show(text)} is not {family} address")


def _parse_slow(
    data: bytes, allow_mixed_family: bool, normalize_v4_mapped: bool
) -> tuple[ProxyHeader, int] | None:
    """Validate field by field; name the first thing that is wrong, or wait for more."""
    head = data[:V1_MAX_LENGTH]
    if not head.startswith(V1_PREFIX):
        if V1_PREFIX.startswith(head):
            return None
        raise NotProxyHeaderError(
            f"first bytes {show(head[: len(V1_PREFIX)])} are neither the v1 prefix 'PROXY ' "
            "nor the v2 signature"
        )
    end = head.find(b"\r\n")
    complete = end >= 0
    if complete:
        line = head[len(V1_PREFIX) : end]
    else:
        line = head[len(V1_PREFIX) :]
        if line.endswith(b"\r"):
            line = line[:-1]  # the LF may be on its way (or would come too late)
    for stray, label in ((b"\r", "CR"), (b"\n", "LF")):
        at = line.find(stray)
        if at >= 0:
            raise V1SyntaxError(
                f"v1 line has a lone {label} at offset {len(V1_PREFIX) + at}: "
                f"{show(head[: len(V1_PREFIX) + at + 1])}"
            )
    fields = line.split(b" ")
    protocol = fields[0]
    if protocol not in _PROTOCOLS:
        if not complete and len(fields) == 1 and any(p.startswith(protocol) for p in _PROTOCOLS):
            _check_room(head)
            return None
        raise V1SyntaxError(f"v1 protocol {show(protocol)} is not TCP4, TCP6 or UNKNOWN")
    if protocol == b"UNKNOWN":
        if complete:
            return _UNKNOWN_HEADER, end + 2
        _check_room(head)
        return None
    values = fields[1:]
    finished = values if complete else values[:-1]
    for index, text in enumerate(finished[:4]):
        if not text:
            raise V1SyntaxError(
                f"v1 {protocol.decode()} {_FIELD_NAMES[index]} is empty "
                "(a double space, or a space before the CRLF)"
            )
    if len(values) > 4:
        extra = b" ".join(values[4:])
        raise V1SyntaxError(
            f"v1 {protocol.decode()} line goes on after the destination port with "
            f"{show(extra) if extra else 'a space'}; only CRLF may follow it"
        )
    if complete and len(values) < 4:
        raise V1SyntaxError(
            f"v1 {protocol.decode()} line has {len(values)} fields after the protocol, "
            "expected 4 (source address, destination address, source port, destination port)"
        )
    ips = [
        _address(protocol, _FIELD_NAMES[index], text, allow_mixed_family, normalize_v4_mapped)
        for index, text in enumerate(finished[:2])
    ]
    ports = [_port(_FIELD_NAMES[index], text) for index, text in enumerate(finished[2:], 2)]
    if not complete:
        if values:
            _check_partial_field(protocol, len(values) - 1, values[-1], allow_mixed_family)
        _check_room(head)
        return None
    return ProxyHeader(
        1,
        _PROXY,
        _INET if protocol == b"TCP4" else _INET6,
        _STREAM,
        InetAddress(ips[0], ports[0]),
        InetAddress(ips[1], ports[1]),
        (),
        None,
        False,
    ), end + 2


def _check_room(head: bytes) -> None:
    """A valid prefix so far: raise if the line already used up its 107 bytes."""
    if len(head) >= V1_MAX_LENGTH:
        raise HeaderTooLongError(f"v1 line has no CRLF within {V1_MAX_LENGTH} bytes: {show(head)}")
