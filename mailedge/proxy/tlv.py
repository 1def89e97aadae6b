"""v2 TLVs: the walk over the TLV area, per-type rules, the SSL TLV and CRC32C.

Every TLV is kept raw, in wire order. The types the spec gives rules for are validated;
unknown, custom (0xE0-0xEF), experimental (0xF0-0xF7) and reserved (0xF8-0xFF) types are
kept and otherwise skipped.
"""

from __future__ import annotations

import struct

import google_crc32c

from mailedge.proxy.errors import ChecksumError, InvalidTLVError, SSLTLVError
from mailedge.proxy.header import TLV, ClientFlags, SSLInfo, SSLSubType, TLVType

__all__ = [
    "CRC32C_LENGTH",
    "SSL_FIXED_LENGTH",
    "TLV_HEADER_LENGTH",
    "UNIQUE_ID_MAX_LENGTH",
    "check_partial_tlvs",
    "crc32c_of",
    "parse_ssl",
    "parse_tlvs",
    "show",
]

# type (1 byte) + length (2 bytes, big-endian) before every value.
TLV_HEADER_LENGTH = 3
# The spec stores CRC32C as a 32-bit big-endian number.
CRC32C_LENGTH = 4
# The spec's bound on PP2_TYPE_UNIQUE_ID, so that receivers can size their storage.
UNIQUE_ID_MAX_LENGTH = 128
# client (1 byte) + verify (4 bytes): what an SSL value holds before its sub-TLVs.
SSL_FIXED_LENGTH = 5
# How much of an offending value an error message quotes: enough to recognise it, not to
# flood a log.
_SHOW_LIMIT = 40

_TYPE_LENGTH = struct.Struct("!BH")
_SSL_FIXED = struct.Struct("!BI")
_CRC_VALUE = struct.Struct("!I")
_ZERO_CRC = bytes(CRC32C_LENGTH)
_crc_value = google_crc32c.value

# Plain ints for the hot loop: comparing ints is cheaper than comparing enum members.
_AUTHORITY = int(TLVType.AUTHORITY)
_CRC32C = int(TLVType.CRC32C)
_UNIQUE_ID = int(TLVType.UNIQUE_ID)
_SSL = int(TLVType.SSL)
_NETNS = int(TLVType.NETNS)
# The only types with rules; every other type is kept without a look.
_CHECKED = frozenset((_AUTHORITY, _CRC32C, _UNIQUE_ID, _SSL, _NETNS))

# The SSL sub-types decoded to text, in SSLInfo's field order, mapped to their position.
_SSL_TEXT_TYPES = (
    SSLSubType.VERSION,
    SSLSubType.CN,
    SSLSubType.CIPHER,
    SSLSubType.SIG_ALG,
    SSLSubType.KEY_ALG,
    SSLSubType.GROUP,
    SSLSubType.SIG_SCHEME,
)
_SSL_TEXT = {int(sub_type): slot for slot, sub_type in enumerate(_SSL_TEXT_TYPES)}
_SSL_CLIENT_CERT = int(SSLSubType.CLIENT_CERT)
# ClientFlags for every client byte, built once: IntFlag construction is slow.
_CLIENT_FLAGS = tuple(ClientFlags(value) for value in range(256))
_CLIENT_SSL = int(ClientFlags.SSL)


def show(value: bytes | bytearray | memoryview) -> str:
    """A short, escaped repr of a wire field for an error message."""
    text = repr(bytes(value[:_SHOW_LIMIT]))[1:]  # b'...' -> '...'
    return text + ("..." if len(value) > _SHOW_LIMIT else "")


def crc32c_of(data: bytes, value_offset: int, end: int) -> int:
    """CRC32C of ``data[:end]`` with the 4 bytes at ``value_offset`` taken as zero.

    Computed over the bytes as received, in their order: nothing is re-sorted. One
    concatenation and one call measured faster than three ``extend`` calls.
    """
    result: int = _crc_value(
        data[:value_offset] + _ZERO_CRC + data[value_offset + CRC32C_LENGTH : end]
    )
    return result


def _type_name(type_: int) -> str:
    try:
        return f"{TLVType(type_).name} TLV (0x{type_:02x})"
    except ValueError:
        return f"TLV 0x{type_:02x}"


def _cut_short(pos: int, end: int) -> str:
    return f"header at offset {pos} is cut short: {end - pos} of {TLV_HEADER_LENGTH} bytes left"


def _overrun(name: str, pos: int, start: int, stop: int, end: int) -> str:
    return f"v2 {name} at offset {pos} claims {stop - start} bytes but only {end - start} remain"


def _crc_length_error(length: int) -> InvalidTLVError:
    return InvalidTLVError(f"v2 CRC32C TLV length {length} is not {CRC32C_LENGTH} bytes")


def _unique_id_length_error(length: int) -> InvalidTLVError:
    return InvalidTLVError(f"v2 UNIQUE_ID TLV length {length} is over {UNIQUE_ID_MAX_LENGTH} bytes")


def _authority_error(value: bytes) -> InvalidTLVError:
    return InvalidTLVError(f"v2 AUTHORITY TLV value {show(value)} is not valid UTF-8")


def _netns_error(value: bytes) -> InvalidTLVError:
    return InvalidTLVError(f"v2 NETNS TLV value {show(value)} is not US-ASCII")


def _length_error(type_: int, length: int) -> InvalidTLVError | None:
    """The error for a CRC32C or UNIQUE_ID length that breaks its rule, else None."""
    if type_ == _CRC32C and length != CRC32C_LENGTH:
        return _crc_length_error(length)
    if type_ == _UNIQUE_ID and length > UNIQUE_ID_MAX_LENGTH:
        return _unique_id_length_error(length)
    return None


def _check_value(type_: int, value: bytes) -> None:
    """The rules of AUTHORITY, NETNS, UNIQUE_ID and CRC32C's length."""
    if type_ == _AUTHORITY:
        try:
            value.decode()
        except UnicodeDecodeError:
            raise _authority_error(value) from None
    elif type_ == _NETNS:
        if not value.isascii():
            raise _netns_error(value)
    else:
        error = _length_error(type_, len(value))
        if error is not None:
            raise error


def _second(name: str, pos: int) -> InvalidTLVError:
    cls = SSLTLVError if name == "SSL" else InvalidTLVError
    return cls(f"v2 {name} TLV at offset {pos} is a second {name} TLV; a header has one")


def parse_tlvs(data: bytes, pos: int, end: int) -> tuple[tuple[TLV, ...], SSLInfo | None, bool]:
    """Walk and validate the TLVs in ``data[pos:end]``, where ``data[:end]`` is the header.

    Returns the TLVs, the decoded SSL TLV, and whether a CRC32C TLV was present (and so
    matched: a mismatch raises).
    """
    tlvs: list[TLV] = []
    ssl: SSLInfo | None = None
    crc_at = 0  # where the CRC32C value starts; 0 = none (a value never starts there)
    while pos < end:
        start = pos + TLV_HEADER_LENGTH
        if start > end:
            raise InvalidTLVError("v2 TLV " + _cut_short(pos, end))
        type_, length = _TYPE_LENGTH.unpack_from(data, pos)
        stop = start + length
        if stop > end:
            raise InvalidTLVError(_overrun(_type_name(type_), pos, start, stop, end))
        value = data[start:stop]
        if type_ in _CHECKED:  # the same rules as _check_value, inlined for speed
            if type_ == _SSL:
                if ssl is not None:
                    raise _second("SSL", pos)
                ssl = parse_ssl(value)
            elif type_ == _AUTHORITY:
                try:
                    value.decode()
                except UnicodeDecodeError:
                    raise _authority_error(value) from None
            elif type_ == _UNIQUE_ID:
                if length > UNIQUE_ID_MAX_LENGTH:
                    raise _unique_id_length_error(length)
            elif type_ == _CRC32C:
                if crc_at:
                    raise _second("CRC32C", pos)
                if length != CRC32C_LENGTH:
                    raise _crc_length_error(length)
                crc_at = start
            elif not value.isascii():  # NETNS
                raise _netns_error(value)
        tlvs.append(TLV(type_, value))
        pos = stop
    if not crc_at:
        return tuple(tlvs), ssl, False
    (expected,) = _CRC_VALUE.unpack_from(data, crc_at)
    actual = crc32c_of(data, crc_at, end)
    if expected != actual:
        raise ChecksumError(
            f"v2 CRC32C TLV value 0x{expected:08x} does not match the header's checksum "
            f"0x{actual:08x}"
        )
    return tuple(tlvs), ssl, True


def check_partial_tlvs(data: bytes, pos: int, total: int) -> None:
    """Raise if the TLVs of an incomplete header can already never be valid.

    ``data`` holds fewer than ``total`` bytes. Every TLV header that arrived has its
    length checked against ``total`` and its type's length rule; a TLV whose value fully
    arrived gets every check of :func:`parse_tlvs` but the CRC match, which needs all bytes.
    """
    available = len(data)
    seen_ssl = seen_crc = False
    while pos + TLV_HEADER_LENGTH <= available:
        type_, length = _TYPE_LENGTH.unpack_from(data, pos)
        start = pos + TLV_HEADER_LENGTH
        stop = start + length
        if stop > total:
            raise InvalidTLVError(_overrun(_type_name(type_), pos, start, stop, total))
        if type_ == _SSL:
            if seen_ssl:
                raise _second("SSL", pos)
            seen_ssl = True
        elif type_ == _CRC32C:
            if seen_crc:
                raise _second("CRC32C", pos)
            seen_crc = True
        error = _length_error(type_, length)
        if error is not None:
            raise error
        if stop > available:
            if type_ == _SSL:
                _check_partial_ssl(data[start:available], length)
            return
        if type_ == _SSL:
            parse_ssl(data[start:stop])
        elif type_ in _CHECKED:
            _check_value(type_, data[start:stop])
        pos = stop


def _check_partial_ssl(head: bytes, length: int) -> None:
    """Raise if an SSL TLV whose value is still arriving can already never be valid."""
    if length < SSL_FIXED_LENGTH:
        raise _ssl_too_short(length)
    pos = SSL_FIXED_LENGTH
    available = len(head)
    while pos + TLV_HEADER_LENGTH <= available:
        type_, size = _TYPE_LENGTH.unpack_from(head, pos)
        start = pos + TLV_HEADER_LENGTH
        stop = start + size
        if stop > length:
            raise SSLTLVError(_overrun(f"SSL sub-TLV 0x{type_:02x}", pos, start, stop, length))
        if stop > available:
            return
        if type_ in _SSL_TEXT:
            try:
                head[start:stop].decode()
            except UnicodeDecodeError:
                raise _ssl_text_error(type_, head[start:stop]) from None
        pos = stop


def _ssl_too_short(length: int) -> SSLTLVError:
    return SSLTLVError(
        f"v2 SSL TLV length {length} is under the {SSL_FIXED_LENGTH} bytes of client and verify"
    )


def _ssl_text_error(type_: int, value: bytes) -> SSLTLVError:
    return SSLTLVError(
        f"v2 SSL sub-TLV {SSLSubType(type_).name} (0x{type_:02x}) value {show(value)} is not "
        "valid UTF-8"
    )


def parse_ssl(value: bytes) -> SSLInfo:
    """Decode a PP2_TYPE_SSL value: client, verify, then sub-TLVs (the first of a type wins)."""
    length = len(value)
    if length < SSL_FIXED_LENGTH:
        raise _ssl_too_short(length)
    client, verify = _SSL_FIXED.unpack_from(value)
    text: list[str | None] = [None, None, None, None, None, None, None]
    client_cert: bytes | None = None
    subs: list[TLV] = []
    pos = SSL_FIXED_LENGTH
    while pos < length:
        start = pos + TLV_HEADER_LENGTH
        if start > length:
            raise SSLTLVError("v2 SSL sub-TLV " + _cut_short(pos, length))
        type_, size = _TYPE_LENGTH.unpack_from(value, pos)
        stop = start + size
        if stop > length:
            raise SSLTLVError(_overrun(f"SSL sub-TLV 0x{type_:02x}", pos, start, stop, length))
        sub = value[start:stop]
        slot = _SSL_TEXT.get(type_)
        if slot is not None:
            try:
                decoded = sub.decode()
            except UnicodeDecodeError:
                raise _ssl_text_error(type_, sub) from None
            if text[slot] is None:
                text[slot] = decoded
        elif type_ == _SSL_CLIENT_CERT and client_cert is None:
            client_cert = sub
        subs.append(TLV(type_, sub))
        pos = stop
    if client & _CLIENT_SSL and text[0] is None:
        raise SSLTLVError(
            f"v2 SSL TLV client 0x{client:02x} has CLIENT_SSL set but no VERSION sub-TLV"
        )
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
