"""v2 TLVs: the walk over the TLV area, per-type rules, the SSL TLV and CRC32C.

The parser validates the TLVs here and builds nothing: the header keeps its bytes, and
its ``tlvs`` and ``ssl`` are built from them when first read. The types the spec gives
rules for are validated; unknown, custom (0xE0-0xEF), experimental (0xF0-0xF7) and
reserved (0xF8-0xFF) types are kept and otherwise skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NoReturn

import google_crc32c

from mailedge.proxy._decode import (
    SSL_TEXT_FIELDS,
    TLV_HEAD,
    TYPE_AUTHORITY,
    TYPE_CRC32C,
    TYPE_NETNS,
    TYPE_SSL,
    TYPE_UNIQUE_ID,
    decode_ssl,
)
from mailedge.proxy.errors import (
    ChecksumError,
    InvalidTLVError,
    ProxyProtocolError,
    SSLTLVError,
)
from mailedge.proxy.values import ClientFlags, SSLInfo, SSLSubType, TLVType

__all__ = [
    "CRC32C_LENGTH",
    "SSL_FIXED_LENGTH",
    "TLV_HEADER_LENGTH",
    "UNIQUE_ID_MAX_LENGTH",
    "check_partial_tlvs",
    "check_tlvs",
    "crc32c_of",
    "first_problem",
    "parse_ssl",
    "show",
]

# type (1 byte) + length (2 bytes, big-endian) before every value: 3 bytes.
TLV_HEADER_LENGTH = TLV_HEAD.size
# The spec stores CRC32C as a 32-bit big-endian number.
CRC32C_LENGTH = 4
# The spec's bound on PP2_TYPE_UNIQUE_ID, so that receivers can size their storage.
UNIQUE_ID_MAX_LENGTH = 128
# client (1 byte) + verify (4 bytes): what an SSL value holds before its sub-TLVs.
SSL_FIXED_LENGTH = 5
# How much of an offending value an error message quotes: enough to recognise it, not to
# flood a log.
_SHOW_LIMIT = 40

_CRC_VALUE = struct.Struct("!I")
_ZERO_CRC = bytes(CRC32C_LENGTH)
_crc_value = google_crc32c.value

# The only types with rules; every other type is kept without a look.
_CHECKED = frozenset((TYPE_AUTHORITY, TYPE_CRC32C, TYPE_UNIQUE_ID, TYPE_SSL, TYPE_NETNS))

# The SSL sub-types whose values must be UTF-8.
_SSL_TEXT = frozenset(int(sub_type) for sub_type, _ in SSL_TEXT_FIELDS)
_SSL_VERSION = int(SSLSubType.VERSION)
_CLIENT_SSL = int(ClientFlags.SSL)

# check_tlvs's tables, indexed by type byte: a tuple index is cheaper than a set lookup
# followed by comparisons. Each TLV type with a rule gets its own code; 0 is "no rule".
# check_tlvs spells the codes (and 0x21 VERSION, 0x01 CLIENT_SSL) as literals: a constant
# is read faster than a global, and the walk reads them for every TLV.
_RULE_SSL = 1
_RULE_UNIQUE_ID = 2
_RULE_CRC32C = 3
_RULE_AUTHORITY = 4
_RULE_NETNS = 5
_RULES = tuple(
    {
        TYPE_SSL: _RULE_SSL,
        TYPE_UNIQUE_ID: _RULE_UNIQUE_ID,
        TYPE_CRC32C: _RULE_CRC32C,
        TYPE_AUTHORITY: _RULE_AUTHORITY,
        TYPE_NETNS: _RULE_NETNS,
    }.get(type_, 0)
    for type_ in range(256)
)
_SSL_TEXT_TYPES = tuple(type_ in _SSL_TEXT for type_ in range(256))


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
    if type_ == TYPE_CRC32C and length != CRC32C_LENGTH:
        return _crc_length_error(length)
    if type_ == TYPE_UNIQUE_ID and length > UNIQUE_ID_MAX_LENGTH:
        return _unique_id_length_error(length)
    return None


def _check_value(type_: int, value: bytes) -> None:
    """The rules of AUTHORITY, NETNS, UNIQUE_ID and CRC32C's length."""
    if type_ == TYPE_AUTHORITY:
        try:
            value.decode()
        except UnicodeDecodeError:
            raise _authority_error(value) from None
    elif type_ == TYPE_NETNS:
        if not value.isascii():
            raise _netns_error(value)
    else:
        error = _length_error(type_, len(value))
        if error is not None:
            raise error


def _second(name: str, pos: int) -> InvalidTLVError:
    cls = SSLTLVError if name == "SSL" else InvalidTLVError
    return cls(f"v2 {name} TLV at offset {pos} is a second {name} TLV; a header has one")


def check_tlvs(
    data: bytes,
    pos: int,
    end: int,
    # Bound as defaults: these are read for every TLV, and locals are the cheapest reads.
    _type_length: Callable[[bytes, int], tuple[int, int]] = TLV_HEAD.unpack_from,
    _rules: tuple[int, ...] = _RULES,
    _ssl_text: tuple[bool, ...] = _SSL_TEXT_TYPES,
) -> None:
    """Validate the TLVs in ``data[pos:end]``, where ``data[:end]`` is the header.

    Every rule is checked and the CRC32C, when present, verified; nothing is built. This
    is the hot path, so it only tells valid from invalid: at the first sign of a problem
    it hands over to :func:`_raise_first_problem`, which walks again and names it.

    UTF-8 and ASCII rules are met at once when the whole TLV area is ASCII, as it is for
    the text real proxies send (host names, protocol names, TLS version and cipher
    names); the area is checked once, at the first TLV that has such a rule, and only if
    it holds other bytes is each value decoded on its own.
    """
    first = pos
    area_is_ascii: bool | None = None  # not looked at yet
    seen_ssl = False
    crc_at = 0  # where the CRC32C value starts; 0 = none (a value never starts there)
    # No bounds check per TLV: one that overruns ``end`` leaves ``pos`` past it and fails
    # the check after the loop, before anything is accepted; reading past the end of
    # ``data`` on the way raises struct.error or IndexError, which means the same.
    try:
        while pos < end:
            type_, length = _type_length(data, pos)
            start = pos + 3
            pos = start + length
            rule = _rules[type_]
            if not rule:
                continue
            if rule == 1:  # _RULE_SSL
                if seen_ssl or length < 5:
                    _raise_first_problem(data, first, end)
                seen_ssl = True
                if area_is_ascii is None:
                    area_is_ascii = data[first:end].isascii()
                # The sub-TLVs: the same walk, one level down.
                has_version = False
                sub = start + 5
                while sub < pos:
                    sub_type, sub_length = _type_length(data, sub)
                    sub += 3 + sub_length
                    if sub_type == 0x21:  # VERSION
                        has_version = True
                    if not area_is_ascii and _ssl_text[sub_type]:
                        try:
                            data[sub - sub_length : sub].decode()
                        except UnicodeDecodeError:
                            _raise_first_problem(data, first, end)
                if sub != pos or (data[start] & 0x01 and not has_version):  # 0x01: CLIENT_SSL
                    _raise_first_problem(data, first, end)
            elif rule == 2:  # _RULE_UNIQUE_ID
                if length > 128:
                    _raise_first_problem(data, first, end)
            elif rule == 3:  # _RULE_CRC32C
                if crc_at or length != 4:
                    _raise_first_problem(data, first, end)
                crc_at = start
            else:  # AUTHORITY (UTF-8) or NETNS (ASCII)
                if area_is_ascii is None:
                    area_is_ascii = data[first:end].isascii()
                if not area_is_ascii:
                    value = data[start:pos]
                    if rule == 4:  # _RULE_AUTHORITY
                        try:
                            value.decode()
                        except UnicodeDecodeError:
                            _raise_first_problem(data, first, end)
                    elif not value.isascii():
                        _raise_first_problem(data, first, end)
    except (struct.error, IndexError):
        _raise_first_problem(data, first, end)
    if pos != end:
        _raise_first_problem(data, first, end)
    if crc_at:
        # _check_crc's computation, inlined (the slices and the call are most of its cost).
        stop = crc_at + 4
        zeroed = data[:crc_at] + _ZERO_CRC
        if stop != end:
            zeroed += data[stop:end]
        if _crc_value(zeroed) != _CRC_VALUE.unpack_from(data, crc_at)[0]:
            _check_crc(data, crc_at, end)


def _check_crc(data: bytes, crc_at: int, end: int) -> None:
    (expected,) = _CRC_VALUE.unpack_from(data, crc_at)
    actual = crc32c_of(data, crc_at, end)
    if expected != actual:
        raise ChecksumError(
            f"v2 CRC32C TLV value 0x{expected:08x} does not match the header's checksum "
            f"0x{actual:08x}"
        )


def _raise_first_problem(data: bytes, pos: int, end: int) -> NoReturn:
    """Raise the error :func:`first_problem` names; :func:`check_tlvs` knows there is one."""
    error = first_problem(data, pos, end)
    if error is None:  # pragma: no cover - the two walks disagree: a bug in one of them
        error = InvalidTLVError(f"v2 TLVs at offset {pos} are invalid")
    raise error


def first_problem(data: bytes, pos: int, end: int) -> ProxyProtocolError | None:
    """The error for the first problem with the TLVs in ``data[pos:end]``, in wire order.

    None when they are valid. This is the slow, plain walk that :func:`check_tlvs` hands
    over to: its messages name the TLV, its offset and the rule it breaks. The tests run
    both on the same bytes and check that they agree.
    """
    try:
        _walk_explaining(data, pos, end)
    except ProxyProtocolError as error:
        return error
    return None


def _walk_explaining(data: bytes, pos: int, end: int) -> None:
    seen_ssl = False
    crc_at = 0
    while pos < end:
        start = pos + TLV_HEADER_LENGTH
        if start > end:
            raise InvalidTLVError("v2 TLV " + _cut_short(pos, end))
        type_, length = TLV_HEAD.unpack_from(data, pos)
        stop = start + length
        if stop > end:
            raise InvalidTLVError(_overrun(_type_name(type_), pos, start, stop, end))
        if type_ == TYPE_SSL:
            if seen_ssl:
                raise _second("SSL", pos)
            seen_ssl = True
            check_ssl(data[start:stop])
        elif type_ == TYPE_CRC32C:
            if crc_at:
                raise _second("CRC32C", pos)
            if length != CRC32C_LENGTH:
                raise _crc_length_error(length)
            crc_at = start
        elif type_ in _CHECKED:
            _check_value(type_, data[start:stop])
        pos = stop
    if crc_at:
        _check_crc(data, crc_at, end)


def check_partial_tlvs(data: bytes, pos: int, total: int) -> None:
    """Raise if the TLVs of an incomplete header can already never be valid.

    ``data`` holds fewer than ``total`` bytes. Every TLV header that arrived has its
    length checked against ``total`` and its type's length rule; a TLV whose value fully
    arrived gets every check of :func:`parse_tlvs` but the CRC match, which needs all bytes.
    """
    available = len(data)
    seen_ssl = seen_crc = False
    while pos + TLV_HEADER_LENGTH <= available:
        type_, length = TLV_HEAD.unpack_from(data, pos)
        start = pos + TLV_HEADER_LENGTH
        stop = start + length
        if stop > total:
            raise InvalidTLVError(_overrun(_type_name(type_), pos, start, stop, total))
        if type_ == TYPE_SSL:
            if seen_ssl:
                raise _second("SSL", pos)
            seen_ssl = True
        elif type_ == TYPE_CRC32C:
            if seen_crc:
                raise _second("CRC32C", pos)
            seen_crc = True
        error = _length_error(type_, length)
        if error is not None:
            raise error
        if stop > available:
            if type_ == TYPE_SSL:
                _check_partial_ssl(data[start:available], length)
            return
        if type_ == TYPE_SSL:
            check_ssl(data[start:stop])
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
        type_, size = TLV_HEAD.unpack_from(head, pos)
        start = pos + TLV_HEADER_LENGTH
        stop = start + size
        if stop > length:
            raise SSLTLVError(_overrun(f"SSL sub-TLV 0x{type_:02x}", pos, start, stop, length))
        if stop > available:
            return
        if type_ in _SSL_TEXT:
            _check_ssl_text(type_, head[start:stop])
        pos = stop


def _ssl_too_short(length: int) -> SSLTLVError:
    return SSLTLVError(
        f"v2 SSL TLV length {length} is under the {SSL_FIXED_LENGTH} bytes of client and verify"
    )


def _check_ssl_text(type_: int, value: bytes) -> None:
    """The value of a sub-TLV that SSLInfo holds as text must be UTF-8."""
    try:
        value.decode()
    except UnicodeDecodeError:
        raise SSLTLVError(
            f"v2 SSL sub-TLV {SSLSubType(type_).name} (0x{type_:02x}) value {show(value)} is "
            "not valid UTF-8"
        ) from None


def check_ssl(value: bytes) -> None:
    """Validate a PP2_TYPE_SSL value: client, verify, then sub-TLVs, naming any problem."""
    length = len(value)
    if length < SSL_FIXED_LENGTH:
        raise _ssl_too_short(length)
    has_version = False
    pos = SSL_FIXED_LENGTH
    while pos < length:
        start = pos + TLV_HEADER_LENGTH
        if start > length:
            raise SSLTLVError("v2 SSL sub-TLV " + _cut_short(pos, length))
        type_, size = TLV_HEAD.unpack_from(value, pos)
        stop = start + size
        if stop > length:
            raise SSLTLVError(_overrun(f"SSL sub-TLV 0x{type_:02x}", pos, start, stop, length))
        if type_ in _SSL_TEXT:
            _check_ssl_text(type_, value[start:stop])
            if type_ == _SSL_VERSION:
                has_version = True
        pos = stop
    client = value[0]
    if client & _CLIENT_SSL and not has_version:
        raise SSLTLVError(
            f"v2 SSL TLV client 0x{client:02x} has CLIENT_SSL set but no VERSION sub-TLV"
        )


def parse_ssl(value: bytes) -> SSLInfo:
    """Validate and decode a PP2_TYPE_SSL value (the first sub-TLV of a type wins)."""
    check_ssl(value)
    return decode_ssl(value)
