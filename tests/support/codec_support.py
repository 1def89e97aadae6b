"""Helpers shared by the codec's tests: every valid header is parsed three ways."""

from __future__ import annotations

from mailedge.proxy import ProxyHeader, parse_header

__all__ = ["TRAILERS", "Values", "three_ways", "values"]

# Everything a header says, as ``values`` reads it.
Values = tuple[object, ...]

# What follows a header on a real connection: an SMTP command, and the start of a TLS
# ClientHello.
TRAILERS = (
    b"EHLO client.example.org\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),
)


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
