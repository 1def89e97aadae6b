"""Build PROXY headers: for tests, benchmarks, probes and anything that sends them.

Misuse (a missing address, mismatched families, an oversized value) is a programming
error and raises ``ValueError``; the bytes produced always parse with ``parse_header``
(given ``allow_unix`` / ``allow_dgram`` for those families).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address

from mailedge.proxy._decode import SSL_TEXT_FIELDS
from mailedge.proxy._tlv import CRC32C_LENGTH, crc32c_of
from mailedge.proxy._v2 import UNIX_PATH_LENGTH, V2_SIGNATURE
from mailedge.proxy.values import (
    TLV,
    Address,
    Command,
    Family,
    InetAddress,
    SSLInfo,
    SSLSubType,
    TLVType,
    Transport,
    UnixAddress,
)

__all__ = ["encode_v1", "encode_v2"]

# The 2-byte length fields (v2 length, TLV lengths) cannot say more.
_MAX_FIELD = 0xFFFF
_MAX_PORT = 0xFFFF


def encode_v1(
    source: InetAddress | None = None,
    destination: InetAddress | None = None,
    *,
    family: Family | None = None,
    mixed: bool = False,
) -> bytes:
    """A v1 line: TCP4 or TCP6 from two addresses, UNKNOWN from none.

    ``family`` is inferred from the addresses unless given; they must then be of one
    family. ``family=Family.INET6`` takes IPv4 addresses too, and writes them v4-mapped as
    ``::ffff:a.b.c.d``: HAProxy's form for a pair of two families. With ``mixed=True``
    (``family`` given), every address is written as its own family's text whatever the
    line says: nginx's form, which receivers accept only when they allow mixed families.
    """
    if source is None and destination is None:
        if family is not None and family is not Family.UNSPEC:
            raise ValueError(f"a v1 {family.name} line needs a source and a destination")
        return b"PROXY UNKNOWN\r\n"
    if source is None or destination is None:
        raise ValueError("encode_v1 needs both source and destination, or neither (UNKNOWN)")
    if not isinstance(source, InetAddress) or not isinstance(destination, InetAddress):
        raise TypeError("encode_v1 carries only InetAddress values")
    if family is None:
        if mixed:
            raise ValueError("encode_v1 needs the line's family to write mixed families")
        if source.ip.version != destination.ip.version:
            raise ValueError(
                f"encode_v1 source {source!r} and destination {destination!r} differ in "
                "family; pass family=Family.INET6 to write the IPv4 one v4-mapped"
            )
        family = Family.INET if source.ip.version == 4 else Family.INET6
    elif family is not Family.INET and family is not Family.INET6:
        raise ValueError(f"v1 has no {family.name} form with addresses")
    version = 4 if family is Family.INET else 6
    texts = []
    for address in (source, destination):
        _check_port(address.port)
        ip = address.ip
        if isinstance(ip, IPv6Address) and ip.scope_id is not None:
            raise ValueError(f"v1 cannot carry the IPv6 zone id of {address!r}")
        if ip.version == version or mixed:
            texts.append(str(ip).encode("ascii"))
        elif version == 6:
            texts.append(b"::ffff:%s" % str(ip).encode("ascii"))  # HAProxy's mixed form
        else:
            raise ValueError(
                f"v1 TCP4 cannot carry the IPv6 address of {address!r}; mixed=True writes "
                "it as it is (nginx's form)"
            )
    return b"PROXY %s %s %s %d %d\r\n" % (
        b"TCP4" if version == 4 else b"TCP6",
        texts[0],
        texts[1],
        source.port,
        destination.port,
    )


def encode_v2(
    command: Command = Command.PROXY,
    source: Address | None = None,
    destination: Address | None = None,
    *,
    transport: Transport = Transport.STREAM,
    tlvs: Iterable[TLV] = (),
    ssl: SSLInfo | None = None,
    crc32c: bool = False,
    family: Family | None = None,
) -> bytes:
    """A v2 header.

    ``family`` is inferred from the addresses (UNSPEC for none) unless given; INET6 with
    IPv4 addresses writes them v4-mapped. With UNSPEC the family byte is 0x00 whatever
    ``transport`` says (the only valid UNSPEC value). ``tlvs`` are written as given, in
    order; then the SSL TLV built from ``ssl``; then, with ``crc32c``, a CRC32C TLV that
    holds the right checksum. SSL sub-TLVs: ``ssl.tlvs`` verbatim when non-empty, else
    one per named field that is set, in SSLSubType order.
    """
    family = _infer_family(source, destination, family)
    if family is Family.UNSPEC:
        family_byte = 0x00
    elif transport is Transport.UNSPEC:
        raise ValueError(f"v2 family {family.name} needs transport STREAM or DGRAM, not UNSPEC")
    else:
        family_byte = family << 4 | transport
    body = bytearray(_address_block(family, source, destination))
    tlv_list = list(tlvs)
    if ssl is not None:
        if any(tlv.type == TLVType.SSL for tlv in tlv_list):
            raise ValueError("encode_v2 got both ssl= and a raw SSL TLV; a header has one")
        tlv_list.append(TLV(TLVType.SSL, ssl_value(ssl)))
    if crc32c and any(tlv.type == TLVType.CRC32C for tlv in tlv_list):
        raise ValueError("encode_v2 got both crc32c=True and a raw CRC32C TLV; a header has one")
    for tlv in tlv_list:
        body += _tlv_bytes(tlv.type, tlv.value)
    if crc32c:
        body += _tlv_bytes(TLVType.CRC32C, bytes(CRC32C_LENGTH))
    if len(body) > _MAX_FIELD:
        raise ValueError(f"v2 header body of {len(body)} bytes is over the 65535 the length holds")
    header = V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family_byte, len(body)) + body
    if not crc32c:
        return header
    at = len(header) - CRC32C_LENGTH
    return header[:at] + crc32c_of(header, at, len(header)).to_bytes(CRC32C_LENGTH, "big")


def ssl_value(ssl: SSLInfo) -> bytes:
    """The PP2_TYPE_SSL value for ``ssl``: client, verify, then the sub-TLVs."""
    if not 0 <= ssl.client <= 0xFF:
        raise ValueError(f"SSL client flags {int(ssl.client):#x} do not fit in one byte")
    if not 0 <= ssl.verify <= 0xFFFFFFFF:
        raise ValueError(f"SSL verify {ssl.verify} does not fit in 4 bytes")
    value = bytearray(struct.pack("!BI", ssl.client, ssl.verify))
    if ssl.tlvs:
        for sub in ssl.tlvs:
            value += _tlv_bytes(sub.type, sub.value)
    else:
        for sub_type, name in SSL_TEXT_FIELDS:
            text: str | None = getattr(ssl, name)
            if text is not None:
                value += _tlv_bytes(sub_type, text.encode("utf-8"))
        if ssl.client_cert is not None:
            value += _tlv_bytes(SSLSubType.CLIENT_CERT, ssl.client_cert)
    return bytes(value)


def _tlv_bytes(type_: int, value: bytes) -> bytes:
    if not 0 <= type_ <= 0xFF:
        raise ValueError(f"TLV type {type_} does not fit in one byte")
    if len(value) > _MAX_FIELD:
        raise ValueError(f"TLV 0x{type_:02x} value of {len(value)} bytes is over 65535")
    return struct.pack("!BH", type_, len(value)) + bytes(value)


def _infer_family(
    source: Address | None, destination: Address | None, family: Family | None
) -> Family:
    if (source is None) != (destination is None):
        raise ValueError("encode_v2 needs both source and destination, or neither")
    if source is None or destination is None:
        if family is not None and family is not Family.UNSPEC:
            raise ValueError(f"v2 family {family.name} needs a source and a destination")
        return Family.UNSPEC
    if family is Family.UNSPEC:
        raise ValueError("v2 family UNSPEC carries no addresses; pass none")
    if isinstance(source, UnixAddress) and isinstance(destination, UnixAddress):
        inferred = Family.UNIX
    elif isinstance(source, InetAddress) and isinstance(destination, InetAddress):
        if source.ip.version == destination.ip.version == 4:
            inferred = Family.INET
        else:
            inferred = Family.INET6
            if family is None and source.ip.version != destination.ip.version:
                raise ValueError(
                    "encode_v2 source and destination differ in IP version; pass "
                    "family=Family.INET6 to write the IPv4 one v4-mapped"
                )
    else:
        raise TypeError("encode_v2 source and destination must both be Inet or both Unix")
    if family is None or family == inferred:
        return inferred
    if family is Family.INET6 and inferred is Family.INET:
        return Family.INET6  # IPv4 addresses written v4-mapped
    raise ValueError(f"v2 family {family.name} does not fit addresses of family {inferred.name}")


def _address_block(family: Family, source: Address | None, destination: Address | None) -> bytes:
    if family is Family.UNSPEC:
        return b""
    if family is Family.UNIX:
        assert isinstance(source, UnixAddress)
        assert isinstance(destination, UnixAddress)
        return _unix_path(source.path) + _unix_path(destination.path)
    assert isinstance(source, InetAddress)
    assert isinstance(destination, InetAddress)
    _check_port(source.port)
    _check_port(destination.port)
    if family is Family.INET:
        return struct.pack(
            "!4s4sHH", source.ip.packed, destination.ip.packed, source.port, destination.port
        )
    return struct.pack(
        "!16s16sHH", _v6(source.ip), _v6(destination.ip), source.port, destination.port
    )


def _v6(ip: IPv4Address | IPv6Address) -> bytes:
    if isinstance(ip, IPv4Address):
        return bytes(10) + b"\xff\xff" + ip.packed
    return ip.packed


def _unix_path(path: bytes) -> bytes:
    if len(path) > UNIX_PATH_LENGTH:
        raise ValueError(f"AF_UNIX path of {len(path)} bytes is over {UNIX_PATH_LENGTH}")
    if b"\0" in path:
        raise ValueError(f"AF_UNIX path {path!r} holds a NUL, which ends it on the wire")
    return path.ljust(UNIX_PATH_LENGTH, b"\0")


def _check_port(port: int) -> None:
    if not 0 <= port <= _MAX_PORT:
        raise ValueError(f"port {port} is outside 0-65535")
