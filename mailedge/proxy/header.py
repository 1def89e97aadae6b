"""The values the codec produces and consumes: headers, addresses, TLVs and SSL details.

All are immutable ``attrs`` values. A :class:`ProxyHeader` holds the header's bytes as
received, validated in full by the parser; the addresses, TLVs and SSL details are built
from those bytes the first time they are read, and cached. Since the bytes were validated,
building them never raises.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable, Iterable
from typing import Any, Generic, NamedTuple, TypeVar, overload

import attrs

__all__ = [
    "Address",
    "ClientFlags",
    "Command",
    "Family",
    "HeaderLayout",
    "IPAddress",
    "InetAddress",
    "ProxyHeader",
    "SSLInfo",
    "SSLSubType",
    "TLVType",
    "TLV",
    "Transport",
    "UnixAddress",
]

# An IPv4 or IPv6 address: the one spelling of this alias, for the whole package.
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Command(enum.IntEnum):
    """The v2 command nibble; a v1 header is always PROXY."""

    LOCAL = 0x0
    PROXY = 0x1


class Family(enum.IntEnum):
    """The v2 address family (high nibble of byte 13). v1 TCP4/TCP6/UNKNOWN map to these."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    """The v2 transport protocol (low nibble of byte 13)."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


class TLVType(enum.IntEnum):
    """The TLV types the spec names. Others (custom 0xE0-0xEF and so on) are kept raw."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


class SSLSubType(enum.IntEnum):
    """The sub-TLVs carried inside a PP2_TYPE_SSL value."""

    VERSION = 0x21
    CN = 0x22
    CIPHER = 0x23
    SIG_ALG = 0x24
    KEY_ALG = 0x25
    GROUP = 0x26
    SIG_SCHEME = 0x27
    CLIENT_CERT = 0x28


class ClientFlags(enum.IntFlag):
    """The ``client`` byte of the SSL TLV."""

    SSL = 0x01
    CERT_CONN = 0x02
    CERT_SESS = 0x04


@attrs.frozen(repr=False)
class InetAddress:
    """An IPv4 or IPv6 endpoint. v4-mapped IPv6 is normalised to IPv4 by the parser."""

    ip: IPAddress
    port: int

    def __repr__(self) -> str:
        if self.ip.version == 6:
            return f"InetAddress([{self.ip}]:{self.port})"
        return f"InetAddress({self.ip}:{self.port})"


@attrs.frozen
class UnixAddress:
    """An AF_UNIX endpoint: the path with its NUL padding removed."""

    path: bytes


Address = InetAddress | UnixAddress


@attrs.frozen
class TLV:
    """One type-length-value entry, raw, as it appeared on the wire."""

    type: int
    value: bytes


@attrs.frozen
class SSLInfo:
    """The decoded PP2_TYPE_SSL TLV: what the proxy knows of the client's TLS session."""

    client: ClientFlags
    # 0 means the client certificate verified; only meaningful when a CERT bit is set.
    verify: int
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    group: str | None = None
    sig_scheme: str | None = None
    client_cert: bytes | None = attrs.field(default=None, repr=False)
    # Every sub-TLV raw, in wire order, including ones this version does not decode.
    tlvs: tuple[TLV, ...] = attrs.field(default=(), repr=False)

    @property
    def client_ssl(self) -> bool:
        """True when the client reached the proxy over TLS (the CLIENT_SSL bit)."""
        return bool(self.client & ClientFlags.SSL)

    @property
    def cert_presented(self) -> bool:
        """True when the client presented a certificate, on this connection or session."""
        return bool(self.client & (ClientFlags.CERT_CONN | ClientFlags.CERT_SESS))

    @property
    def verified(self) -> bool:
        """True only when a certificate was presented *and* the proxy verified it.

        HAProxy sends verify 0 when no certificate was presented, so verify alone says nothing.
        """
        return self.cert_presented and self.verify == 0


IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address

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
#
# Everything below reads bytes the parser has already validated in full, so none of it checks
# anything and none of it can raise.

# Every canonical octet text -> its value; leading zeros, "+1", " 1" and full-width digits
# are simply absent, so a lookup is also a check (the v1 parser uses these tables too).
_OCTETS = {str(value).encode("ascii"): value for value in range(256)}
_OCTETS_8 = {text: value << 8 for text, value in _OCTETS.items()}
_OCTETS_16 = {text: value << 16 for text, value in _OCTETS.items()}
_OCTETS_24 = {text: value << 24 for text, value in _OCTETS.items()}
_zfill = bytes.zfill
_FOURS = (4,) * 8
# The zero digits that "::" stands for, by the number of groups it replaces.
_ZERO_GROUPS = tuple(b"0000" * count for count in range(9))
_V4_MAPPED = 0xFFFF  # the top 96 bits of ::ffff:a.b.c.d, shifted down by 32
# Single bytes as ints: ``b":" in text`` first tries (and fails, with an exception it then
# clears) to read b":" as an int, and costs three times as much as ``_COLON in text``.
_COLON = ord(":")
_DOT = ord(".")

_TYPE_LENGTH = struct.Struct("!BH").unpack_from
_unpack_inet4 = struct.Struct("!IIHH").unpack_from
_unpack_inet6 = struct.Struct("!16s16sHH").unpack_from
_from_bytes = int.from_bytes  # big-endian by default
_V2_FIXED_LENGTH = 16
_UNIX_PATH_LENGTH = 108
# Byte 13's high nibble (the family) -> where the TLVs start.
_TLV_STARTS = (16, 16 + 12, 16 + 36, 16 + 216)
_SSL_FIXED = struct.Struct("!BI")
# The SSL sub-types decoded to text, in SSLInfo's field order, mapped to their position.
_SSL_TEXT_SLOTS = {
    int(sub_type): slot
    for slot, sub_type in enumerate(
        (
            SSLSubType.VERSION,
            SSLSubType.CN,
            SSLSubType.CIPHER,
            SSLSubType.SIG_ALG,
            SSLSubType.KEY_ALG,
            SSLSubType.GROUP,
            SSLSubType.SIG_SCHEME,
        )
    )
}
_SSL_CLIENT_CERT = int(SSLSubType.CLIENT_CERT)
# ClientFlags for every client byte, built once: IntFlag construction is slow.
_CLIENT_FLAGS = tuple(ClientFlags(value) for value in range(256))
_ALPN = int(TLVType.ALPN)
_AUTHORITY = int(TLVType.AUTHORITY)
_CRC32C = int(TLVType.CRC32C)
_UNIQUE_ID = int(TLVType.UNIQUE_ID)
_SSL = int(TLVType.SSL)
_NETNS = int(TLVType.NETNS)


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
    v4 = _ipv4_int(text[colon + 1 :]) if colon >= 0 else None
    if v4 is None:
        return None
    return _ipv6_int(text[: colon + 1] + b"%x:%x" % (v4 >> 16, v4 & 0xFFFF))


def _ip6(value: int, normalize_v4_mapped: bool) -> IPAddress:
    """An IPv6 address from its value, or the IPv4 one a v4-mapped value stands for."""
    if normalize_v4_mapped and value >> 32 == _V4_MAPPED:
        return IPv4Address(value & 0xFFFFFFFF)
    return IPv6Address(value)


def _inet(ip: IPAddress, port: int) -> InetAddress:
    address = _new(InetAddress)
    _set_ip(address, ip)
    _set_port(address, port)
    return address


def _tlv(type_: int, value: bytes) -> TLV:
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
        return IPv4Address(_OCTETS_24[a] | _OCTETS_16[b] | _OCTETS_8[c] | _OCTETS[d])
    if _DOT in text:  # a dotted quad in the last 32 bits
        embedded = _ipv6_int(text)
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
        src: IPAddress = IPv4Address(_OCTETS_24[a] | _OCTETS_16[b] | _OCTETS_8[c] | _OCTETS[d])
        dst: IPAddress = IPv4Address(_OCTETS_24[e] | _OCTETS_16[f] | _OCTETS_8[g] | _OCTETS[h])
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


def _tlv_spans(data: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(type, value start, value end) of each TLV in validated ``data[pos:end]``."""
    spans = []
    while pos < end:
        type_, length = _TYPE_LENGTH(data, pos)
        pos += 3
        spans.append((type_, pos, pos + length))
        pos += length
    return spans


def _decode_ssl(value: bytes) -> SSLInfo:
    """The SSLInfo of a validated PP2_TYPE_SSL value: the first sub-TLV of a type wins."""
    client, verify = _SSL_FIXED.unpack_from(value)
    text: list[str | None] = [None, None, None, None, None, None, None]
    client_cert: bytes | None = None
    subs: list[TLV] = []
    pos = _SSL_FIXED.size
    end = len(value)
    while pos < end:
        type_, length = _TYPE_LENGTH(value, pos)
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


# --- the header --------------------------------------------------------------------------------

_T = TypeVar("_T")


class _lazy(Generic[_T]):  # lower case: used as a decorator, like property
    """A read-only attribute computed on first read and kept in the instance ``__dict__``.

    A non-data descriptor: once the value is in ``__dict__``, Python finds it there and
    never calls this again. ``functools.cached_property`` does the same, but on Python 3.11
    it takes a lock on every first read, which costs three times as much.
    """

    def __init__(self, compute: Callable[[Any], _T]) -> None:
        self._compute = compute
        self._name = compute.__name__
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _lazy[_T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _T: ...

    def __get__(self, instance: object, owner: type | None = None) -> _T | _lazy[_T]:
        if instance is None:
            return self
        value = instance.__dict__[self._name] = self._compute(instance)
        return value


class _Endpoint:
    """``source`` or ``destination``: a first read of either builds and keeps both.

    A non-data descriptor like :class:`_lazy`. The gate reads both on every connection, so
    one read builds both, with the builder the header's layout names: no test of version
    or family is left for this first read to make.
    """

    def __init__(self, name: str, doc: str) -> None:
        self._name = name
        self.__doc__ = doc

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _Endpoint: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> Address | None: ...

    def __get__(self, instance: object, owner: type | None = None) -> Address | _Endpoint | None:
        if instance is None:
            return self
        fields = instance.__dict__
        fields["_layout"].endpoints(fields)
        address: Address | None = fields[self._name]
        return address


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
    return {key: HeaderLayout(*key, _endpoints_builder(key[0], key[1], key[2])) for key in keys}


# Every valid layout, built once: a parsed header points at one of these.
_LAYOUTS = _all_layouts()


def header_layout(
    version: int,
    command: Command,
    family: Family,
    transport: Transport,
    normalize_v4_mapped: bool,
) -> HeaderLayout:
    """The shared layout for these values (which the parser has validated)."""
    return _LAYOUTS[version, command, family, transport, normalize_v4_mapped]


@attrs.frozen(slots=False, init=False, repr=False, match_args=False)
class ProxyHeader:
    """A complete, validated PROXY protocol header (v1 or v2).

    The parser validates every byte, then stores just two things: the bytes (``raw``) and
    a shared :class:`HeaderLayout` (version, command, family, transport and the
    ``normalize_v4_mapped`` option). ``version``, ``command``, ``family`` and
    ``transport`` read the layout. ``source``, ``destination``, ``tlvs``, ``ssl``,
    ``crc32c_verified`` and the TLV accessors are built from ``raw`` on first read and
    cached; since ``raw`` was validated, they never raise.

    Two headers are equal (and hash alike) when their ``raw`` bytes and the
    ``normalize_v4_mapped`` option they were parsed with are equal: those two decide every
    other attribute. ``ProxyHeader(...)`` builds a header from values; see ``__init__``.
    """

    # The whole header exactly as received: "PROXY " to the CRLF, or the v2 signature to
    # the end of the last TLV. Never anything after it.
    raw: bytes
    _layout: HeaderLayout = attrs.field(alias="layout")

    def __init__(
        self,
        version: int,
        command: Command,
        family: Family,
        transport: Transport,
        source: Address | None = None,
        destination: Address | None = None,
        tlvs: Iterable[TLV] = (),
        ssl: SSLInfo | None = None,
        crc32c_verified: bool = False,
    ) -> None:
        """Build the header these values describe: encoded, then parsed back.

        The bytes are what ``encode_v1``/``encode_v2`` write for them, so the header is as
        valid as a parsed one. ``tlvs`` are written in order (a CRC32C TLV among them gets
        the right checksum); ``ssl``, when no SSL TLV is among ``tlvs``, is appended as one;
        ``crc32c_verified=True`` appends a CRC32C TLV when none is among ``tlvs``. What the
        attributes then hold is what the parser read back, so ``tlvs`` also lists the SSL
        and CRC32C TLVs. Raises ``ValueError`` (or ``TypeError``) for values no header can
        carry, or that would not read back as given.
        """
        from mailedge.proxy.build import build_header  # here: build imports this module

        built = build_header(
            version,
            command,
            family,
            transport,
            source,
            destination,
            tuple(tlvs),
            ssl,
            crc32c_verified,
        )
        self.__dict__.update(built.__dict__)

    @property
    def version(self) -> int:
        """1 (text) or 2 (binary)."""
        return self._layout.version

    @property
    def command(self) -> Command:
        """PROXY, or LOCAL (v2 only): the proxy's own connection, addresses ignored."""
        return self._layout.command

    @property
    def family(self) -> Family:
        """The address family on the wire: v1 TCP4/TCP6/UNKNOWN are INET/INET6/UNSPEC."""
        return self._layout.family

    @property
    def transport(self) -> Transport:
        """STREAM or DGRAM; UNSPEC with v2 family UNSPEC; always STREAM for v1."""
        return self._layout.transport

    def __repr__(self) -> str:
        return (
            f"ProxyHeader(version={self.version!r}, command={self.command!r}, "
            f"family={self.family!r}, transport={self.transport!r}, source={self.source!r}, "
            f"destination={self.destination!r}, ssl={self.ssl!r}, "
            f"crc32c_verified={self.crc32c_verified!r})"
        )

    source = _Endpoint("source", "The client's endpoint; None for LOCAL, v1 UNKNOWN and v2 UNSPEC.")
    destination = _Endpoint(
        "destination", "The endpoint the client connected to; None when source is."
    )

    @_lazy
    def tlvs(self) -> tuple[TLV, ...]:
        """Every TLV raw, in wire order (v2 only; empty for v1)."""
        if self._layout.version == 1:
            return ()
        raw = self.raw
        return tuple(
            [
                _tlv(type_, raw[start:stop])
                for type_, start, stop in _tlv_spans(raw, _TLV_STARTS[raw[13] >> 4], len(raw))
            ]
        )

    @_lazy
    def _first_values(self) -> dict[int, bytes]:
        """The value of the first TLV of each type."""
        values: dict[int, bytes] = {}
        if self._layout.version == 1:
            return values
        raw = self.raw
        pos = _TLV_STARTS[raw[13] >> 4]
        end = len(raw)
        while pos < end:
            type_, length = _TYPE_LENGTH(raw, pos)
            pos += 3
            if type_ not in values:
                values[type_] = raw[pos : pos + length]
            pos += length
        return values

    @_lazy
    def ssl(self) -> SSLInfo | None:
        """The decoded SSL TLV, when one was present (a header has at most one)."""
        value = self._first_values.get(_SSL)
        return None if value is None else _decode_ssl(value)

    @_lazy
    def crc32c_verified(self) -> bool:
        """True when a CRC32C TLV was present, and so matched: a mismatch never parses."""
        return _CRC32C in self._first_values

    @property
    def alpn(self) -> bytes | None:
        """The PP2_TYPE_ALPN value: the protocol the client negotiated, e.g. ``b"h2"``."""
        return self._first_values.get(_ALPN)

    @property
    def authority(self) -> str | None:
        """The PP2_TYPE_AUTHORITY value (the SNI host name), validated as UTF-8 by the parser."""
        value = self._first_values.get(_AUTHORITY)
        return None if value is None else value.decode("utf-8")

    @property
    def unique_id(self) -> bytes | None:
        """The PP2_TYPE_UNIQUE_ID value: an opaque id of at most 128 bytes."""
        return self._first_values.get(_UNIQUE_ID)

    @property
    def netns(self) -> str | None:
        """The PP2_TYPE_NETNS value: the network namespace name, validated by the parser."""
        value = self._first_values.get(_NETNS)
        return None if value is None else value.decode("ascii")


def make_header(raw: bytes, layout: HeaderLayout) -> ProxyHeader:
    """The parser's constructor: ``raw`` must be a header it has validated in full.

    It skips ``__init__`` and fills the instance ``__dict__`` directly, which the frozen
    class allows (only attribute assignment is blocked): a fraction of an ``attrs``
    ``__init__``'s cost. The hot paths in v1.py and v2.py inline these same lines.
    """
    header = _new(ProxyHeader)
    fields = header.__dict__
    fields["raw"] = raw
    fields["_layout"] = layout
    return header
