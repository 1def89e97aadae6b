"""PROXY protocol v2: the binary header (signature, fixed part, address block, TLVs).

The parser validates the fixed part and the TLVs and builds nothing else: the header keeps
its bytes, and its addresses, TLVs and SSL details are read from them when first asked for.
Every address block of the right length is valid, so there is nothing to check there.
"""

from __future__ import annotations

import struct

from mailedge.proxy._decode import DISCARDED_LOCAL_LAYOUTS, header_layout
from mailedge.proxy._tlv import check_partial_tlvs, check_tlvs, show
from mailedge.proxy.errors import (
    AddressBlockTooShortError,
    DisallowedFamilyError,
    HeaderTooLongError,
    InvalidCommandError,
    InvalidFamilyError,
    InvalidVersionError,
    NotProxyHeaderError,
)
from mailedge.proxy.header import ProxyHeader, make_header
from mailedge.proxy.values import Command, Family, Transport

__all__ = [
    "ADDRESS_BLOCK_LENGTHS",
    "DEFAULT_MAX_V2_LENGTH",
    "FIXED",
    "INET4_END",
    "INET6_END",
    "PROXY_TCP4",
    "PROXY_TCP6",
    "TCP4_LAYOUTS",
    "TCP6_LAYOUTS",
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

# --- what parse_header's fast path (a complete PROXY over TCP/IPv4 or TCP/IPv6) uses ---------
FIXED = struct.Struct("!12sHH")  # signature, bytes 12-13 together, length
INET4_END = V2_FIXED_LENGTH + ADDRESS_BLOCK_LENGTHS[Family.INET]  # where the TLVs start
INET6_END = V2_FIXED_LENGTH + ADDRESS_BLOCK_LENGTHS[Family.INET6]
PROXY_TCP4 = 0x2111  # bytes 12-13: v2 PROXY, INET STREAM
PROXY_TCP6 = 0x2121  # bytes 12-13: v2 PROXY, INET6 STREAM
# Their layouts, indexed by normalize_v4_mapped.
TCP4_LAYOUTS = tuple(header_layout(2, _PROXY, _INET, _STREAM, n) for n in (False, True))
TCP6_LAYOUTS = tuple(header_layout(2, _PROXY, _INET6, _STREAM, n) for n in (False, True))


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
    """Parse a v2 header at the start of ``data`` (which starts with CR).

    Every case, checked in wire order, raising at the first byte that rules it out
    (``parse_header`` handles a complete PROXY over TCP before calling this).
    """
    if len(data) < V2_FIXED_LENGTH or not data.startswith(V2_SIGNATURE):
        _check_prefix(data, allow_unix, allow_dgram)
        return None
    command = _command(data[12])
    if command is _LOCAL:
        return _parse_local(data, max_length, normalize_v4_mapped)
    family, transport, block = _family(data[13], command, allow_unix, allow_dgram)
    total = _check_length(data[14] << 8 | data[15], block, family, max_length)
    if len(data) < total:
        check_partial_tlvs(data, V2_FIXED_LENGTH + block, total)
        return None
    check_tlvs(data, V2_FIXED_LENGTH + block, total)
    layout = header_layout(2, command, family, transport, normalize_v4_mapped)
    header = make_header(data[:total], layout)
    return header, total


def _parse_local(
    data: bytes, max_length: int, normalize_v4_mapped: bool
) -> tuple[ProxyHeader, int] | None:
    """A LOCAL header: the proxy's own connection, whose endpoints are the socket's.

    The spec (section 2.2) has the receiver "discard the protocol block including the
    family which is ignored". So a family byte that is not one of the seven, or a length
    shorter than the family's address block, is no error: the block is skipped unread. When
    the family is known and its block fits, the TLVs after it are read and checked as for
    PROXY, because a CRC32C among them (HAProxy's health checks send one) must be verified.
    """
    length = data[14] << 8 | data[15]
    total = _check_length(length, 0, Family.UNSPEC, max_length)
    info = _FAMILIES[data[13]]
    if info is None or length < info[2]:
        if len(data) < total:
            return None
        return make_header(data[:total], DISCARDED_LOCAL_LAYOUTS[normalize_v4_mapped]), total
    family, transport, block = info
    if len(data) < total:
        check_partial_tlvs(data, V2_FIXED_LENGTH + block, total)
        return None
    check_tlvs(data, V2_FIXED_LENGTH + block, total)
    layout = header_layout(2, _LOCAL, family, transport, normalize_v4_mapped)
    return make_header(data[:total], layout), total


def _check_prefix(data: bytes, allow_unix: bool, allow_dgram: bool) -> None:
    """Raise if fewer than 16 bytes (or a bad signature) can no longer be a v2 header."""
    signature = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(signature):
        raise NotProxyHeaderError(
            f"first bytes {show(signature)} are neither the v1 prefix 'PROXY ' nor the v2 signature"
        )
    if len(data) > 12:
        command = _command(data[12])
        if len(data) > 13 and command is _PROXY:  # LOCAL ignores the family byte
            _family(data[13], command, allow_unix, allow_dgram)
