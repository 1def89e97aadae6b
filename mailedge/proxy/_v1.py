"""PROXY protocol v1: the text line ``PROXY TCP4|TCP6|UNKNOWN ... CRLF``.

The common, valid lines (TCP4, and TCP6 with IPv6 addresses) are matched by
``FAST_LINE``, one precompiled regular expression that holds the whole grammar: a match is
a complete, valid line, and nothing else is checked or built (``parse_header`` runs it
first). The header keeps the line, and its addresses are read from it when first asked
for. Anything else (an error, an incomplete line, UNKNOWN, nginx's mixed families) goes
to :func:`parse_v1`, which validates field by field and says exactly what is wrong.
"""

from __future__ import annotations

import re

from mailedge.proxy._decode import OCTETS, header_layout, ipv4_int, ipv6_int
from mailedge.proxy._tlv import show
from mailedge.proxy.errors import (
    DisallowedFamilyError,
    HeaderTooLongError,
    InvalidAddressError,
    InvalidPortError,
    NotProxyHeaderError,
    V1SyntaxError,
)
from mailedge.proxy.header import ProxyHeader, make_header
from mailedge.proxy.values import Command, Family, Transport

__all__ = [
    "FAST_LINE",
    "TCP4_LAYOUTS",
    "TCP6_LAYOUTS",
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

# --- the grammar as regular expressions ---------------------------------------------------
#
# Bytes patterns, so [0-9] is ASCII only, as the spec wants. No capturing groups: the fast
# path only needs to know that the line matches, and where it ends.

# One octet 0-255 without leading zeros.
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
# One port 0-65535 without leading zeros, as a tree on its leading digits so that the
# engine never backs up: 1-59999; 6, 60-64999; 65, 650-65499; 655, 6550-65535; 66-6999;
# 7-9999; 0. (A test checks every string of up to 5 digits, leading zeros included.)
_PORT = (
    rb"(?:[1-5][0-9]{0,4}"
    rb"|6(?:[0-4][0-9]{0,3}|5(?:[0-4][0-9]{0,2}|5(?:[0-2][0-9]?|3[0-5]?|[4-9])?|[6-9][0-9]?)?"
    rb"|[6-9][0-9]{0,2})?"
    rb"|[7-9][0-9]{0,3}"
    rb"|0)"
)
_IPV4 = _OCTET + rb"\." + _OCTET + rb"\." + _OCTET + rb"\." + _OCTET
# One IPv6 group: 1 to 4 hex digits, either case.
_H16 = rb"[0-9A-Fa-f]{1,4}"


def _ipv6_tail(room: int) -> bytes:
    """What may follow "::": up to ``room`` groups, the last two of which may be a dotted quad."""
    if room == 0:
        return b""
    forms = [_H16 + (b"(?::" + _H16 + b"){0,%d}" % (room - 1) if room > 1 else b"")]
    if room >= 2:
        forms.append((b"(?:" + _H16 + b":){0,%d}" % (room - 2) if room > 2 else b"") + _IPV4)
    return b"(?:" + b"|".join(forms) + b")?"


def _ipv6_after(groups: int) -> bytes:
    """What may follow the first ``groups`` groups and no "::" yet (1 <= groups <= 8)."""
    if groups == 8:
        return b""
    forms = [b":" + _ipv6_tail(7 - groups), _H16 + _ipv6_after(groups + 1)]
    if groups == 6:
        forms.append(_IPV4)  # x:x:x:x:x:x:d.d.d.d
    return b":(?:" + b"|".join(forms) + b")"


# RFC 4291 section 2.2 text: eight groups; or "::" standing for one or more zero groups, at
# most seven groups around it; either with the last two groups as a dotted quad. No zone id,
# no brackets. Written as a tree on the number of groups read so far, so the engine reads
# each character once: a group, then ":" and either another group or the "::".
_IPV6 = b"(?:::" + _ipv6_tail(7) + b"|" + _H16 + _ipv6_after(1) + b")"

# The whole TCP4 and TCP6 grammar: a match is a complete, valid line (TCP6 can still be
# longer than the 107 bytes the spec allows: the caller checks). Mixed families (nginx) do
# not match, and go through parse_v1 and its allow_mixed_family check. Byte 9 of a match
# tells TCP4 from TCP6.
FAST_LINE = re.compile(
    rb"PROXY TCP(?:4 "
    + _IPV4
    + b" "
    + _IPV4
    + b"|6 "
    + _IPV6
    + b" "
    + _IPV6
    + b") "
    + _PORT
    + b" "
    + _PORT
    + b"\r\n"
)
_IPV6_TEXT = re.compile(rb"[0-9A-Fa-f:.]*")
_PORT_TEXT = re.compile(_PORT)

_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
_FIELD_NAMES = ("source address", "destination address", "source port", "destination port")

_PROXY = Command.PROXY
_INET = Family.INET
_INET6 = Family.INET6
_UNSPEC = Family.UNSPEC
_STREAM = Transport.STREAM
# The layouts of the three kinds of v1 line, indexed by normalize_v4_mapped.
TCP4_LAYOUTS = tuple(header_layout(1, _PROXY, _INET, _STREAM, n) for n in (False, True))
TCP6_LAYOUTS = tuple(header_layout(1, _PROXY, _INET6, _STREAM, n) for n in (False, True))
_UNKNOWN_LAYOUTS = tuple(header_layout(1, _PROXY, _UNSPEC, _STREAM, n) for n in (False, True))


def _ipv4_prefix_ok(text: bytes) -> bool:
    """True when ``text`` can still grow into a canonical dotted quad."""
    parts = text.split(b".")
    if len(parts) > 4:
        return False
    for part in parts[:-1]:
        if part not in OCTETS:
            return False
    return parts[-1] == b"" or parts[-1] in OCTETS


def _ipv6_prefix_ok(text: bytes) -> bool:
    """True when ``text`` can still grow into IPv6 text that ipv6_int accepts."""
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


def _check_address(protocol: bytes, name: str, text: bytes, allow_mixed_family: bool) -> None:
    """Validate a complete address field for its protocol (or, when allowed, the other)."""
    v4 = ipv4_int(text)
    v6 = None
    if len(text) <= _IPV6_MAX_TEXT and _IPV6_TEXT.fullmatch(text) is not None:
        v6 = ipv6_int(text)
    if protocol == b"TCP4":
        if v4 is not None:
            return
        if v6 is not None:
            if not allow_mixed_family:
                raise _mixed_error(protocol, name, text, "IPv6")
            return
        raise InvalidAddressError(
            f"v1 TCP4 {name} {show(text)} is not a dotted-quad IPv4 address "
            "(octets 0-255, no leading zeros)"
        )
    if v6 is not None:
        return
    if v4 is not None:
        if not allow_mixed_family:
            raise _mixed_error(protocol, name, text, "IPv4")
        return
    raise InvalidAddressError(
        f"v1 TCP6 {name} {show(text)} is not an IPv6 address (hex groups, no zone id, no brackets)"
    )


def _port_error(name: str, text: bytes) -> InvalidPortError:
    return InvalidPortError(
        f"v1 {name} {show(text)} is not a decimal 0-65535 without leading zeros"
    )


def _check_port(name: str, text: bytes) -> None:
    if _PORT_TEXT.fullmatch(text) is None:
        raise _port_error(name, text)


def _check_partial_field(
    protocol: bytes, index: int, text: bytes, allow_mixed_family: bool
) -> None:
    """Reject the field being received when no continuation can make it valid."""
    name = _FIELD_NAMES[index]
    if index >= 2:
        if not _port_prefix_ok(text):
            raise _port_error(name, text)
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


def parse_v1(
    data: bytes, allow_mixed_family: bool, normalize_v4_mapped: bool
) -> tuple[ProxyHeader, int] | None:
    """Parse a v1 line at the start of ``data`` (which starts with ``P``), field by field.

    It accepts every valid line, FAST_LINE's included, and names the first thing that is
    wrong, or waits for more.
    """
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
            return make_header(data[: end + 2], _UNKNOWN_LAYOUTS[normalize_v4_mapped]), end + 2
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
    for index, text in enumerate(finished[:2]):
        _check_address(protocol, _FIELD_NAMES[index], text, allow_mixed_family)
    for index, text in enumerate(finished[2:4], 2):
        _check_port(_FIELD_NAMES[index], text)
    if not complete:
        if values:
            _check_partial_field(protocol, len(values) - 1, values[-1], allow_mixed_family)
        _check_room(head)
        return None
    layouts = TCP4_LAYOUTS if protocol == b"TCP4" else TCP6_LAYOUTS
    return make_header(data[: end + 2], layouts[normalize_v4_mapped]), end + 2


def _check_room(head: bytes) -> None:
    """A valid prefix so far: raise if the line already used up its 107 bytes."""
    if len(head) >= V1_MAX_LENGTH:
        raise HeaderTooLongError(f"v1 line has no CRLF within {V1_MAX_LENGTH} bytes: {show(head)}")
