"""PROXY protocol v2: the binary header (signature, fixed part, address block, TLVs)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

from mailedge.proxy.errors import (
    AddressBlockTooShortError,
    DisallowedFamilyError,
    HeaderTooLongError,
    InvalidCommandError,
    InvalidFamilyError,
    InvalidVersionError,
    NotProxyHeaderError,
)
from mailedge.proxy.header import (
    Address,
    Command,
    Family,
    InetAddress,
    ProxyHeader,
    Transport,
    UnixAddress,
)
from mailedge.proxy.tlv import check_partial_tlvs, parse_tlvs, show

__all__ = [
    "ADDRESS_BLOCK_LENGTHS",
    "DEFAULT_MAX_V2_LENGTH",
    "UNIX_PATH_LENGTH",
    "V2_FIXED_LENGTH",
    "V2_SIGNATURE",
    "parse_v2",
]

# The 12 bytes every v2 header starts with; chosen by the spec never to look like text.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Signature, version/command, family/transport and the 2-byte length: always present.
V2_FIXED_LENGTH = 16
# go-proxyproto's cap: room for every TLV real proxies send, far below the 65,551 a
# peer could claim and make us wait for.
DEFAULT_MAX_V2_LENGTH = 4096
# sun_path's size in the spec's address block: each AF_UNIX path is NUL-padded to this.
UNIX_PATH_LENGTH = 108
# Bytes of address block each family needs: src + dst addresses, then ports (none for UNIX).
ADDRESS_BLOCK_LENGTHS = {
    Family.UNSPEC: 0,
    Family.INET: 4 + 4 + 2 + 2,
    Family.INET6: 16 + 16 + 2 + 2,
    Family.UNIX: UNIX_PATH_LENGTH * 2,
}

_VERSION_2 = 0x2
_LOCAL = Command.LOCAL
_PROXY = Command.PROXY
_COMMANDS = {0x20: _LOCAL, 0x21: _PROXY}
_INET = Family.INET
_INET6 = Family.INET6
_UNIX = Family.UNIX
_STREAM = Transport.STREAM
_DGRAM = Transport.DGRAM
_FIXED = struct.Struct("!12sHH")  # signature, bytes 12-13 together, length
_INET4_BLOCK = struct.Struct("!IIHH")
_INET6_BLOCK = struct.Struct("!QQQQHH")  # each address as two 64-bit halves
_INET4_BLOCK_LENGTH = _INET4_BLOCK.size
_INET6_BLOCK_LENGTH = _INET6_BLOCK.size
_INET4_END = V2_FIXED_LENGTH + _INET4_BLOCK_LENGTH
_INET6_END = V2_FIXED_LENGTH + _INET6_BLOCK_LENGTH
_PROXY_TCP4 = 0x2111  # bytes 12-13: v2 PROXY, INET STREAM
_PROXY_TCP6 = 0x2121  # bytes 12-13: v2 PROXY, INET6 STREAM
_V4_MAPPED = 0xFFFF  # the top 96 bits of ::ffff:a.b.c.d


def _family_table() -> tuple[tuple[Family, Transport, int] | None, ...]:
    table: list[tuple[Family, Transport, int] | None] = [None] * 256
    for family in Family:
        if family is Family.UNSPEC:
            transports: tuple[Transport, ...] = (Transport.UNSPEC,)
        else:
            transports = (Transport.STREAM, Transport.DGRAM)
        for transport in transports:
            table[family << 4 | transport] = (family, transport, ADDRESS_BLOCK_LENGTHS[family])
    return tuple(table)


# Byte 13 -> (family, transport, address block length), or None for the invalid values.
_FAMILIES = _family_table()


def _command(byte: int) -> Command:
    command = _COMMANDS.get(byte)
    if command is not None:
        return command
    if byte >> 4 != _VERSION_2:
        raise InvalidVersionError(
            f"v2 version nibble {byte >> 4} (byte 12 is 0x{byte:02x}) is not 2"
        )
    raise InvalidCommandError(
        f"v2 command nibble {byte & 0xF} (byte 12 is 0x{byte:02x}) is neither "
        "LOCAL (0) nor PROXY (1)"
    )


def _family(
    byte: int, command: Command, allow_unix: bool, allow_dgram: bool
) -> tuple[Family, Transport, int]:
    info = _FAMILIES[byte]
    if info is None:
        raise InvalidFamilyError(
            f"v2 family/transport byte 0x{byte:02x} (byte 13) is not one of "
            "0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32"
        )
    if command is _PROXY:
        if info[0] is _UNIX and not allow_unix:
            raise DisallowedFamilyError(
                f"v2 family/transport byte 0x{byte:02x} is AF_UNIX, accepted only with "
                "allow_unix=True"
            )
        if info[1] is _DGRAM and not allow_dgram:
            raise DisallowedFamilyError(
                f"v2 family/transport byte 0x{byte:02x} is DGRAM, accepted only with "
                "allow_dgram=True"
            )
    return info


def _check_length(length: int, block: int, family: Family, max_length: int) -> int:
    total = V2_FIXED_LENGTH + length
    if total > max_length:
        raise HeaderTooLongError(
            f"v2 length {length} makes a {total}-byte header, over max_v2_length={max_length}"
        )
    if length < block:
        raise AddressBlockTooShortError(
            f"v2 length {length} is shorter than the {block}-byte {family.name} address block"
        )
    return total


def parse_v2(
    data: bytes,
    max_length: int,
    allow_unix: bool,
    allow_dgram: bool,
    normalize_v4_mapped: bool,
) -> tuple[ProxyHeader, int] | None:
    """Parse a v2 header at the start of ``data`` (which starts with CR)."""
    available = len(data)
    if available >= _INET4_END:
        # The fast path: a complete PROXY over TCP/IPv4 or TCP/IPv6, in one unpack each.
        signature, kind, length = _FIXED.unpack_from(data)
        total = V2_FIXED_LENGTH + length
        if signature == V2_SIGNATURE and total <= max_length and available >= total:
            if kind == _PROXY_TCP4 and length >= _INET4_BLOCK_LENGTH:
                src, dst, sport, dport = _INET4_BLOCK.unpack_from(data, V2_FIXED_LENGTH)
                source = InetAddress(IPv4Address(src), sport)
                destination = InetAddress(IPv4Address(dst), dport)
                if total == _INET4_END:
                    return ProxyHeader(2, _PROXY, _INET, _STREAM, source, destination), total
                tlvs, ssl, crc_ok = parse_tlvs(data, _INET4_END, total)
                return ProxyHeader(
                    2, _PROXY, _INET, _STREAM, source, destination, tlvs, ssl, crc_ok
                ), total
            if kind == _PROXY_TCP6 and length >= _INET6_BLOCK_LENGTH:
                s_hi, s_lo, d_hi, d_lo, sport, dport = _INET6_BLOCK.unpack_from(
                    data, V2_FIXED_LENGTH
                )
                if normalize_v4_mapped and (s_hi == 0 or d_hi == 0):
                    source = InetAddress(_ip6(s_hi, s_lo, True), sport)
                    destination = InetAddress(_ip6(d_hi, d_lo, True), dport)
                else:  # no ::ffff:a.b.c.d possible: skip the check
                    source = InetAddress(IPv6Address(s_hi << 64 | s_lo), sport)
                    destination = InetAddress(IPv6Address(d_hi << 64 | d_lo), dport)
                if total == _INET6_END:
                    return ProxyHeader(2, _PROXY, _INET6, _STREAM, source, destination), total
                tlvs, ssl, crc_ok = parse_tlvs(data, _INET6_END, total)
                return ProxyHeader(
                    2, _PROXY, _INET6, _STREAM, source, destination, tlvs, ssl, crc_ok
                ), total
    return _parse_general(data, max_length, allow_unix, allow_dgram, normalize_v4_mapped)


def _parse_general(
    data: bytes,
    max_length: int,
    allow_unix: bool,
    allow_dgram: bool,
    normalize_v4_mapped: bool,
) -> tuple[ProxyHeader, int] | None:
    """Every case, checked in wire order, raising at the first byte that rules it out."""
    if len(data) < V2_FIXED_LENGTH or not data.startswith(V2_SIGNATURE):
        _check_prefix(data, allow_unix, allow_dgram)
        return None
    command = _command(data[12])
    family, transport, block = _family(data[13], command, allow_unix, allow_dgram)
    total = _check_length(data[14] << 8 | data[15], block, family, max_length)
    if len(data) < total:
        check_partial_tlvs(data, V2_FIXED_LENGTH + block, total)
        return None
    source: Address | None
    destination: Address | None
    if command is _LOCAL or family is Family.UNSPEC:
        source = destination = None
    elif family is _INET:
        src, dst, sport, dport = _INET4_BLOCK.unpack_from(data, V2_FIXED_LENGTH)
        source = InetAddress(IPv4Address(src), sport)
        destination = InetAddress(IPv4Address(dst), dport)
    elif family is _INET6:
        s_hi, s_lo, d_hi, d_lo, sport, dport = _INET6_BLOCK.unpack_from(data, V2_FIXED_LENGTH)
        source = InetAddress(_ip6(s_hi, s_lo, normalize_v4_mapped), sport)
        destination = InetAddress(_ip6(d_hi, d_lo, normalize_v4_mapped), dport)
    else:
        source = UnixAddress(_unix_path(data, V2_FIXED_LENGTH))
        destination = UnixAddress(_unix_path(data, V2_FIXED_LENGTH + UNIX_PATH_LENGTH))
    position = V2_FIXED_LENGTH + block
    tlvs, ssl, crc_ok = parse_tlvs(data, position, total)
    return ProxyHeader(2, command, family, transport, source, destination, tlvs, ssl, crc_ok), total


def _ip6(high: int, low: int, normalize_v4_mapped: bool) -> IPv4Address | IPv6Address:
    if normalize_v4_mapped and high == 0 and low >> 32 == _V4_MAPPED:
        return IPv4Address(low & 0xFFFFFFFF)
    return IPv6Address(high << 64 | low)


def _unix_path(data: bytes, start: int) -> bytes:
    path = data[start : start + UNIX_PATH_LENGTH]
    nul = path.find(b"\0")
    return path if nul < 0 else path[:nul]


def _check_prefix(data: bytes, allow_unix: bool, allow_dgram: bool) -> None:
    """Raise if fewer than 16 bytes (or a bad signature) can no longer be a v2 header."""
    signature = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(signature):
        raise NotProxyHeaderError(
            f"first bytes {show(signature)} are neither the v1 prefix 'PROXY ' nor the v2 signature"
        )
    if len(data) > 12:
        command = _command(data[12])
        if len(data) > 13:
            _family(data[13], command, allow_unix, allow_dgram)
