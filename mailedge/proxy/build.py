"""``build_header``: a header from values, encoded, parsed back, and checked to read back.

A :class:`~mailedge.proxy.header.ProxyHeader` always holds bytes that the parser
validated, so that its lazily built attributes can never fail. A header built from values
is no exception: the values are encoded, the bytes parsed, and the result compared with
what was asked for. The header module does not import this one: building sits above
both the encoders and the parser.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address

from mailedge.proxy._tlv import CRC32C_LENGTH, TLV_HEADER_LENGTH, crc32c_of
from mailedge.proxy._v2 import ADDRESS_BLOCK_LENGTHS, V2_FIXED_LENGTH
from mailedge.proxy.encoder import encode_v1, encode_v2
from mailedge.proxy.errors import ProxyProtocolError
from mailedge.proxy.header import ProxyHeader
from mailedge.proxy.parser import parse_header
from mailedge.proxy.values import (
    TLV,
    Address,
    Command,
    Family,
    InetAddress,
    SSLInfo,
    TLVType,
    Transport,
    UnixAddress,
)

__all__ = ["build_header"]

# The addresses a LOCAL header's block holds when none are given: receivers ignore them.
_ZERO_ADDRESSES: dict[Family, Address] = {
    Family.INET: InetAddress(IPv4Address(0), 0),
    Family.INET6: InetAddress(IPv6Address(0), 0),
    Family.UNIX: UnixAddress(b""),
}


def build_header(
    version: int,
    command: Command,
    family: Family,
    transport: Transport,
    source: Address | None = None,
    destination: Address | None = None,
    tlvs: Iterable[TLV] = (),
    ssl: SSLInfo | None = None,
    crc32c_verified: bool = False,
) -> ProxyHeader:
    """The header these values describe: encoded, then parsed back.

    The bytes are what ``encode_v1``/``encode_v2`` write for them, so the header is as
    valid as a parsed one. ``tlvs`` are written in order (a CRC32C TLV among them gets
    the right checksum); ``ssl``, when no SSL TLV is among ``tlvs``, is appended as one;
    ``crc32c_verified=True`` appends a CRC32C TLV when none is among ``tlvs``. What the
    attributes then hold is what the parser read back, so ``tlvs`` also lists the SSL
    and CRC32C TLVs. Raises ``ValueError`` (or ``TypeError``) for values no header can
    carry, or that would not read back as given.
    """
    tlv_values = tuple(tlvs)
    command = Command(command)
    family = Family(family)
    transport = Transport(transport)
    # A v4-mapped IPv6Address can only read back as itself without normalisation.
    normalize = not any(
        isinstance(address, InetAddress)
        and isinstance(address.ip, IPv6Address)
        and address.ip.ipv4_mapped is not None
        for address in (source, destination)
    )
    if version == 1:
        raw = _v1_bytes(command, family, transport, source, destination, normalize)
        if tlv_values or ssl is not None or crc32c_verified:
            raise ValueError("a v1 header carries no TLVs, SSL details or CRC32C")
    elif version == 2:
        raw = _v2_bytes(
            command, family, transport, source, destination, tlv_values, ssl, crc32c_verified
        )
    else:
        raise ValueError(f"PROXY protocol version {version!r} is neither 1 nor 2")
    try:
        result = parse_header(
            raw,
            max_v2_length=max(len(raw), V2_FIXED_LENGTH),
            allow_unix=True,
            allow_dgram=True,
            allow_v1_mixed_family=True,
            normalize_v4_mapped=normalize,
        )
    except ProxyProtocolError as error:
        raise ValueError(f"these values make no valid header: {error.message}") from error
    assert result is not None, raw
    header, consumed = result
    assert consumed == len(raw), (raw, consumed)
    wanted = (version, command, family, transport, source, destination)
    got = (
        header.version,
        header.command,
        header.family,
        header.transport,
        header.source,
        header.destination,
    )
    if got != wanted:
        raise ValueError(f"the values {wanted!r} would read back as {got!r}")
    if ssl is not None and header.ssl != ssl and (ssl.tlvs or not _same_fields(header.ssl, ssl)):
        raise ValueError(f"the SSL details {ssl!r} would read back as {header.ssl!r}")
    return header


def _same_fields(parsed: SSLInfo | None, given: SSLInfo) -> bool:
    """True when ``parsed`` is ``given`` once the sub-TLVs the parser lists are set aside."""
    return parsed is not None and parsed == SSLInfo(
        given.client,
        given.verify,
        given.version,
        given.cn,
        given.cipher,
        given.sig_alg,
        given.key_alg,
        given.group,
        given.sig_scheme,
        given.client_cert,
        parsed.tlvs,
    )


def _v1_bytes(
    command: Command,
    family: Family,
    transport: Transport,
    source: Address | None,
    destination: Address | None,
    normalize: bool,
) -> bytes:
    if command is not Command.PROXY or transport is not Transport.STREAM:
        raise ValueError("a v1 header is always PROXY over STREAM")
    if family is Family.UNSPEC:
        if source is not None or destination is not None:
            raise ValueError("a v1 UNKNOWN header (family UNSPEC) carries no addresses")
        return encode_v1()
    if family is Family.UNIX:
        raise ValueError("v1 has no AF_UNIX form")
    if not isinstance(source, InetAddress) or not isinstance(destination, InetAddress):
        raise TypeError("a v1 TCP4 or TCP6 header needs two InetAddress values")
    # HAProxy's mixed form (the IPv4 address v4-mapped) reads back as given only when the
    # parser normalises v4-mapped addresses; else, and for an IPv6 address under TCP4,
    # every address is written as it is (nginx's form).
    return encode_v1(
        source, destination, family=family, mixed=family is Family.INET or not normalize
    )


def _v2_bytes(
    command: Command,
    family: Family,
    transport: Transport,
    source: Address | None,
    destination: Address | None,
    tlvs: tuple[TLV, ...],
    ssl: SSLInfo | None,
    crc32c_verified: bool,
) -> bytes:
    if command is Command.LOCAL and source is None and destination is None:
        zero = _ZERO_ADDRESSES.get(family)
        source = destination = zero
    elif command is Command.LOCAL:
        raise ValueError("receivers ignore a LOCAL header's addresses: pass none")
    crc_indexes = [index for index, tlv in enumerate(tlvs) if tlv.type == TLVType.CRC32C]
    if crc_indexes and not crc32c_verified:
        raise ValueError("a header with a CRC32C TLV reads back with crc32c_verified=True")
    tlv_list = list(tlvs)
    for index in crc_indexes:
        if len(tlv_list[index].value) != CRC32C_LENGTH:
            raise ValueError(f"a CRC32C TLV value is {CRC32C_LENGTH} bytes")
        tlv_list[index] = TLV(TLVType.CRC32C, bytes(CRC32C_LENGTH))
    has_ssl_tlv = any(tlv.type == TLVType.SSL for tlv in tlv_list)
    raw = encode_v2(
        command,
        source,
        destination,
        transport=transport,
        tlvs=tlv_list,
        ssl=None if has_ssl_tlv else ssl,
        crc32c=crc32c_verified and not crc_indexes,
        family=family,
    )
    if crc_indexes:  # fill in the checksum the TLV the caller placed must hold
        at = V2_FIXED_LENGTH + ADDRESS_BLOCK_LENGTHS[family] + TLV_HEADER_LENGTH
        at += sum(TLV_HEADER_LENGTH + len(tlv.value) for tlv in tlv_list[: crc_indexes[0]])
        crc = crc32c_of(raw, at, len(raw))
        raw = raw[:at] + crc.to_bytes(CRC32C_LENGTH, "big") + raw[at + CRC32C_LENGTH :]
    return raw
