"""Turning a header's validated bytes into values: the codec's decoding helpers.

Private: the parser, the header and the TLV checks share these, nobody else. Everything
here reads bytes the parser has already validated in full, so none of it checks anything
and none of it can raise. The v1 parser also uses the octet table and the two address
readers (:func:`ipv4_int`, :func:`ipv6_int`), which do check, to validate its fields.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Any, NamedTuple

from mailedge.proxy.values import (
    TLV,
    ClientFlags,
    Command,
    Family,
    InetAddress,
    IPAddress,
    SSLInfo,
    SSLSubType,
    TLVType,
    Transport,
    UnixAddress,
)

__all__ = [
    "OCTETS",
    "SSL_TEXT_FIELDS",
    "TLV_HEAD",
    "DISCARDED_LOCAL_LAYOUTS",
    "TLV_STARTS",
    "TYPE_ALPN",
    "TYPE_AUTHORITY",
    "TYPE_CRC32C",
    "TYPE_NETNS",
    "TYPE_SSL",
    "TYPE_UNIQUE_ID",
    "Fields",
    "HeaderLayout",
    "decode_ssl",
    "header_layout",
    "ipv4_int",
    "ipv6_int",
    "new_tlv",
    "tlv_spans",
]

# --- building values without their __init__ ----------------------------------------------------
#
# A server reads every header's two endpoints, so building them is most of what it pays per
# connection. The attrs __init__ of our own InetAddress and TLV stores its fields through
# frozen-instance machinery; the values below come from validated bytes, and these classes
# have no validators or converters, so these helpers store the same fields directly into a
# blank instance. The ipaddress objects are built with their public constructors: their
# layout is the standard library's business, not ours.

_new = object.__new__
_set_ip = InetAddress.__dict__["ip"].__set__
_set_port = InetAddress.__dict__["port"].__set__
_set_type = TLV.__dict__["type"].__set__
_set_value = TLV.__dict__["value"].__set__


# --- turning validated bytes into values ------------------------------------------------------

# Every canonical octet text -> its value; leading zeros, "+1", " 1" and full-width digits
# are simply absent, so a lookup is also a check (the v1 parser uses these tables too).
OCTETS = {str(value).encode("ascii"): value for value in range(256)}
_OCTETS_8 = {text: value << 8 for text, value in OCTETS.items()}
_OCTETS_16 = {text: value << 16 for text, value in OCTETS.items()}
_OCTETS_24 = {text: value << 24 for text, value in OCTETS.items()}
_zfill = bytes.zfill
_FOURS = (4,) * 8
# The zero digits that "::" stands for, by the number of groups it replaces.
_ZERO_GROUPS = tuple(b"0000" * count for count in range(9))
_V4_MAPPED = 0xFFFF  # the top 96 bits of ::ffff:a.b.c.d, shifted down by 32
# Single bytes as ints: ``b":" in text`` first tries (and fails, with an exception it then
# clears) to read b":" as an int, and costs three times as much as ``_COLON in text``.
_COLON = ord(":")
_DOT = ord(".")

# A TLV's type (1 byte) and length (2 bytes, big-endian): before every value.
TLV_HEAD = struct.Struct("!BH")
_type_length = TLV_HEAD.unpack_from
_unpack_inet4 = struct.Struct("!IIHH").unpack_from
_unpack_inet6 = struct.Struct("!16s16sHH").unpack_from
_from_bytes = int.from_bytes  # big-endian by default
_V2_FIXED_LENGTH = 16
_UNIX_PATH_LENGTH = 108
# Byte 13's high nibble (the family) -> where the TLVs start.
TLV_STARTS = (16, 16 + 12, 16 + 36, 16 + 216)
# The TLV types as plain ints, for the header and the TLV checks: comparing and hashing
# ints is cheaper than enum members.
TYPE_ALPN = int(TLVType.ALPN)
TYPE_AUTHORITY = int(TLVType.AUTHORITY)
TYPE_CRC32C = int(TLVType.CRC32C)
TYPE_UNIQUE_ID = int(TLVType.UNIQUE_ID)
TYPE_SSL = int(TLVType.SSL)
TYPE_NETNS = int(TLVType.NETNS)
_SSL_FIXED = struct.Struct("!BI")
# The SSL sub-types whose values are UTF-8 text, each with the SSLInfo field that holds it,
# in SSLInfo's field order: the decoder, the TLV checks and the encoder all read this list.
SSL_TEXT_FIELDS = (
    (SSLSubType.VERSION, "version"),
    (SSLSubType.CN, "cn"),
    (SSLSubType.CIPHER, "cipher"),
    (SSLSubType.SIG_ALG, "sig_alg"),
    (SSLSubType.KEY_ALG, "key_alg"),
    (SSLSubType.GROUP, "group"),
    (SSLSubType.SIG_SCHEME, "sig_scheme"),
)
# Those sub-types mapped to their position.
_SSL_TEXT_SLOTS = {int(sub_type): slot for slot, (sub_type, _) in enumerate(SSL_TEXT_FIELDS)}
_SSL_CLIENT_CERT = int(SSLSubType.CLIENT_CERT)
# ClientFlags for every client byte, built once: IntFlag construction is slow.
_CLIENT_FLAGS = tuple(ClientFlags(value) for value in range(256))


def ipv4_int(text: bytes) -> int | None:
    """The value of a canonical dotted quad, or None."""
    parts = text.split(b".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        octet = OCTETS.get(part)
        if octet is None:
            return None
        value = value << 8 | octet
    return value


def ipv6_int(text: bytes) -> int | None:
    """The value of IPv6 text (RFC 4291 forms, no zone id, no brackets), or None.

    ``text`` must already be known to hold only hex digits, colons and dots. Each group is
    zero-filled to 4 digits and the 32 digits become one int: far cheaper than a loop.
    """
    if _DOT in text:
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
    v4 = ipv4_int(text[colon + 1 :]) if colon >= 0 else None
    if v4 is None:
        return None
    return ipv6_int(text[: colon + 1] + b"%x:%x" % (v4 >> 16, v4 & 0xFFFF))


def _ip6(value: int, normalize_v4_mapped: bool) -> IPAddress:
    """An IPv6 address from its value, or the IPv4 one a v4-mapped value stands for."""
    if normalize_v4_mapped and value >> 32 == _V4_MAPPED:
        return IPv4Address(value & 0xFFFFFFFF)
    return IPv6Address(value)


def _inet(ip: IPAddress, port: int) -> InetAddress:
    """An InetAddress built without its __init__."""
    address = _new(InetAddress)
    _set_ip(address, ip)
    _set_port(address, port)
    return address


def new_tlv(type_: int, value: bytes) -> TLV:
    """A TLV built without its __init__."""
    tlv = _new(TLV)
    _set_type(tlv, type_)
    _set_value(tlv, value)
    return tlv


def _group_format(count: int, gap: int) -> bytes:
    """The %-format that turns ``count`` IPv6 text groups into 32 hex digits (spaces for 0s).

    ``gap`` is the index of the first empty group, where "::" stands (8: none). That group
    takes "%s" and adds nothing; the zero groups "::" replaces follow it. An empty group
    next to it (from a "::" at either end) takes "%4s" like the others and so counts as one
    of the zero groups: 9 - count of them are written out, whatever the position.
    """
    if gap >= count:
        return b"%4s" * count
    return b"%4s" * gap + b"%s" + b"0000" * (9 - count) + b"%4s" * (count - gap - 1)


# [number of groups after split(b":")][index of the first empty one, or 8]: with every
# group padded to 4 characters by one %-format, and the spaces then made zeros by one
# replace(), the text becomes 32 hex digits for one int() call. A Python step per group
# would cost more than all of that. Valid text has 3 to 9 groups when compressed, 8 when not.
_GROUP_FORMATS = tuple(
    tuple(_group_format(count, gap) if count >= 3 or gap >= count else b"" for gap in range(9))
    for count in range(10)
)


def _v1_ip(text: bytes, normalize_v4_mapped: bool) -> IPAddress:
    """The address of a validated v1 address field, of either family (nginx mixes them).

    No check, and as few steps as can be: one call per address, with the IPv6 text read
    in place (one split, one %-format, one int()).
    """
    if _COLON not in text:
        a, b, c, d = text.split(b".")
        return IPv4Address(_OCTETS_24[a] | _OCTETS_16[b] | _OCTETS_8[c] | OCTETS[d])
    if _DOT in text:  # a dotted quad in the last 32 bits
        embedded = ipv6_int(text)
        assert embedded is not None  # validated by the parser
        value = embedded
    else:
        groups = text.split(b":")
        format_ = _GROUP_FORMATS[len(groups)][groups.index(b"") if b"" in groups else 8]
        value = int((format_ % tuple(groups)).replace(b" ", b"0"), 16)
    if normalize_v4_mapped and value >> 32 == _V4_MAPPED:
        return IPv4Address(value & 0xFFFFFFFF)
    return IPv6Address(value)


# A header's instance __dict__: raw, _layout, and what has been built. An endpoint builder
# reads raw (and the layout's normalize_v4_mapped) and stores "source" and "destination":
# storing them itself, rather than returning a pair to be stored, saves a step per read.
Fields = dict[str, Any]


def _no_endpoints(fields: Fields) -> None:
    """LOCAL, v1 UNKNOWN and v2 UNSPEC: no usable address."""
    fields["source"] = fields["destination"] = None


def _v1_endpoints(fields: Fields) -> None:
    """A v1 TCP4 or TCP6 line: ``PROXY TCPn src dst sport dport`` and CRLF."""
    raw = fields["raw"]
    if _COLON not in raw:
        # IPv4 addresses only (TCP4, or nginx's TCP6 with two IPv4 addresses): one split
        # yields the eight octets and the two ports.
        a, b, c, d, e, f, g, h, sport, dport = raw[11:-2].replace(b".", b" ").split(b" ")
        src: IPAddress = IPv4Address(_OCTETS_24[a] | _OCTETS_16[b] | _OCTETS_8[c] | OCTETS[d])
        dst: IPAddress = IPv4Address(_OCTETS_24[e] | _OCTETS_16[f] | _OCTETS_8[g] | OCTETS[h])
    else:
        normalize_v4_mapped = fields["_layout"].normalize_v4_mapped
        src_text, dst_text, sport, dport = raw[11:-2].split(b" ")
        src = _v1_ip(src_text, normalize_v4_mapped)
        dst = _v1_ip(dst_text, normalize_v4_mapped)
    fields["source"] = _inet(src, int(sport))
    fields["destination"] = _inet(dst, int(dport))


def _v2_inet_endpoints(fields: Fields) -> None:
    """v2 PROXY over INET: two 4-byte addresses, then the two ports."""
    src, dst, sport, dport = _unpack_inet4(fields["raw"], _V2_FIXED_LENGTH)
    fields["source"] = _inet(IPv4Address(src), sport)
    fields["destination"] = _inet(IPv4Address(dst), dport)


def _v2_inet6_endpoints(fields: Fields) -> None:
    """v2 PROXY over INET6: two 16-byte addresses, then the two ports."""
    src, dst, sport, dport = _unpack_inet6(fields["raw"], _V2_FIXED_LENGTH)
    normalize_v4_mapped = fields["_layout"].normalize_v4_mapped
    fields["source"] = _inet(_ip6(_from_bytes(src), normalize_v4_mapped), sport)
    fields["destination"] = _inet(_ip6(_from_bytes(dst), normalize_v4_mapped), dport)


def _unix_path(raw: bytes, start: int) -> bytes:
    path = raw[start : start + _UNIX_PATH_LENGTH]
    nul = path.find(b"\0")
    return path if nul < 0 else path[:nul]


def _v2_unix_endpoints(fields: Fields) -> None:
    """v2 PROXY over UNIX: two NUL-padded 108-byte paths."""
    raw = fields["raw"]
    fields["source"] = UnixAddress(_unix_path(raw, _V2_FIXED_LENGTH))
    fields["destination"] = UnixAddress(_unix_path(raw, _V2_FIXED_LENGTH + _UNIX_PATH_LENGTH))


def tlv_spans(data: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(type, value start, value end) of each TLV in validated ``data[pos:end]``."""
    spans = []
    while pos < end:
        type_, length = _type_length(data, pos)
        pos += 3
        spans.append((type_, pos, pos + length))
        pos += length
    return spans


def decode_ssl(value: bytes) -> SSLInfo:
    """The SSLInfo of a validated PP2_TYPE_SSL value: the first sub-TLV of a type wins."""
    client, verify = _SSL_FIXED.unpack_from(value)
    text: list[str | None] = [None, None, None, None, None, None, None]
    client_cert: bytes | None = None
    subs: list[TLV] = []
    pos = _SSL_FIXED.size
    end = len(value)
    while pos < end:
        type_, length = _type_length(value, pos)
        pos += 3
        sub = value[pos : pos + length]
        pos += length
        slot = _SSL_TEXT_SLOTS.get(type_)
        if slot is not None:
            if text[slot] is None:
                text[slot] = sub.decode()
        elif type_ == _SSL_CLIENT_CERT and client_cert is None:
            client_cert = sub
        tlv = _new(TLV)
        _set_type(tlv, type_)
        _set_value(tlv, sub)
        subs.append(tlv)
    return SSLInfo(
        _CLIENT_FLAGS[client],
        verify,
        text[0],
        text[1],
        text[2],
        text[3],
        text[4],
        text[5],
        text[6],
        client_cert,
        tuple(subs),
    )


# --- the layouts: what a header is, apart from its bytes --------------------------------------


class HeaderLayout(NamedTuple):
    """What a header is, apart from its bytes: shared by every header of that kind."""

    version: int
    command: Command
    family: Family
    transport: Transport
    # The parse option that shapes the addresses: ::ffff:a.b.c.d read as IPv4.
    normalize_v4_mapped: bool
    # Builds source and destination from the header's bytes into its __dict__: set by
    # version, command and family, so that the first read goes straight to the right code.
    endpoints: Callable[[Fields], None]
    # Where the TLVs begin (v2: after the family's address block); None when the header has
    # none to read: v1, and a v2 LOCAL whose protocol block was discarded unread.
    tlv_start: int | None


def _endpoints_builder(version: int, command: Command, family: Family) -> Callable[[Fields], None]:
    if command is Command.LOCAL or family is Family.UNSPEC:
        return _no_endpoints
    if version == 1:
        return _v1_endpoints
    if family is Family.INET:
        return _v2_inet_endpoints
    if family is Family.INET6:
        return _v2_inet6_endpoints
    return _v2_unix_endpoints


def _all_layouts() -> dict[tuple[int, Command, Family, Transport, bool], HeaderLayout]:
    keys = [
        (1, Command.PROXY, family, Transport.STREAM, normalize)
        for family in (Family.UNSPEC, Family.INET, Family.INET6)
        for normalize in (False, True)
    ]
    keys += [
        (2, command, family, transport, normalize)
        for command in Command
        for family in Family
        for transport in Transport
        if (family is Family.UNSPEC) == (transport is Transport.UNSPEC)
        for normalize in (False, True)
    ]
    return {
        key: HeaderLayout(
            *key,
            _endpoints_builder(key[0], key[1], key[2]),
            None if key[0] == 1 else TLV_STARTS[key[2]],
        )
        for key in keys
    }


# Every valid layout, built once: a parsed header points at one of these.
_LAYOUTS = _all_layouts()
# A v2 LOCAL header whose family byte is not one we know, or whose length is shorter than its
# family's address block: the spec has the receiver discard that block, family included, so
# nothing in it is read. Indexed by normalize_v4_mapped, like the others.
DISCARDED_LOCAL_LAYOUTS = tuple(
    HeaderLayout(2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, normalize, _no_endpoints, None)
    for normalize in (False, True)
)


def header_layout(
    version: int,
    command: Command,
    family: Family,
    transport: Transport,
    normalize_v4_mapped: bool,
) -> HeaderLayout:
    """The shared layout for these values (which the parser has validated)."""
    return _LAYOUTS[version, command, family, transport, normalize_v4_mapped]
