"""Helpers shared by the codec's tests: every valid header is parsed three ways."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from mailedge.proxy import ClientFlags, InetAddress, ProxyHeader, SSLInfo, parse_header

__all__ = [
    "DESTINATION4",
    "DESTINATION6",
    "PERMISSIVE",
    "SOURCE4",
    "SOURCE6",
    "SSL",
    "TRAILERS",
    "Values",
    "parse",
    "three_ways",
    "values",
]

# The endpoints and SSL details the header tests build their headers from.
SOURCE4 = InetAddress(IPv4Address("192.0.2.10"), 51234)
DESTINATION4 = InetAddress(IPv4Address("198.51.100.25"), 25)
SOURCE6 = InetAddress(IPv6Address("2001:db8::7"), 40000)
DESTINATION6 = InetAddress(IPv6Address("2001:db8::25"), 587)
SSL = SSLInfo(ClientFlags.SSL | ClientFlags.CERT_CONN, 0, version="TLSv1.3", cn="alice")
# Every family the codec can be told to accept.
PERMISSIVE = {"allow_unix": True, "allow_dgram": True, "allow_v1_mixed_family": True}

# Everything a header says, as ``values`` reads it.
Values = tuple[object, ...]

# What follows a header on a real connection: an SMTP command, and the start of a TLS
# ClientHello.
TRAILERS = (
    b"EHLO client.example.org\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),
)


def parse(data: bytes | bytearray, **options: bool) -> ProxyHeader:
    """The header that is the whole of ``data``."""
    result = parse_header(data, **options)
    assert result is not None
    assert result[1] == len(data)
    return result[0]


def three_ways(data: bytes, **options: bool) -> ProxyHeader:
    """Parse one whole header whole, a byte at a time, and with bytes after it.

    Every way must give the same header and consume exactly ``len(data)``; the bytes after
    the header come back untouched; bytearray and memoryview input agree.
    """
    result = parse_header(data, **options)
    assert result is not None, data
    header, consumed = result
    assert consumed == len(data)
    for size in range(len(data)):
        assert parse_header(data[:size], **options) is None, (size, data[:size])
    for trailer in TRAILERS:
        stream = data + trailer
        result = parse_header(stream, **options)
        assert result == (header, len(data))
        assert stream[result[1] :] == trailer
    assert parse_header(bytearray(data), **options) == (header, len(data))
    assert parse_header(memoryview(data + TRAILERS[1]), **options) == (header, len(data))
    return header


def values(header: ProxyHeader) -> Values:
    """What a header says, every lazily built attribute materialised: tests compare these."""
    return (
        header.version,
        header.command,
        header.family,
        header.transport,
        header.source,
        header.destination,
        header.tlvs,
        header.ssl,
        header.crc32c_verified,
    )
