"""``parse_header``: one entry point for v1 and v2, dispatching on the first byte."""

from __future__ import annotations

from mailedge.proxy.errors import NotProxyHeaderError
from mailedge.proxy.header import ProxyHeader
from mailedge.proxy.tlv import show
from mailedge.proxy.v1 import V1_MAX_LENGTH, parse_v1
from mailedge.proxy.v2 import DEFAULT_MAX_V2_LENGTH, V2_FIXED_LENGTH, parse_v2

__all__ = ["parse_header"]

_V1_FIRST = ord("P")
_V2_FIRST = ord("\r")


def parse_header(
    data: bytes | bytearray | memoryview,
    *,
    max_v2_length: int = DEFAULT_MAX_V2_LENGTH,
    allow_unix: bool = False,
    allow_dgram: bool = False,
    allow_v1_mixed_family: bool = False,
    normalize_v4_mapped: bool = True,
) -> tuple[ProxyHeader, int] | None:
    """Parse the PROXY header at the start of ``data``.

    Returns ``(header, consumed)`` for a complete, valid header (``data[consumed:]`` is
    the application's, untouched), or None while ``data`` is a valid but incomplete
    prefix. Raises a :class:`~mailedge.proxy.errors.ProxyProtocolError` as soon as the
    bytes can no longer form a valid header. ``max_v2_length`` caps the whole v2 header,
    the 16 fixed bytes included. See docs/codec.md.
    """
    if max_v2_length < V2_FIXED_LENGTH:
        raise ValueError(f"max_v2_length={max_v2_length} is under the 16-byte v2 fixed part")
    if type(data) is not bytes:
        data = _bytes_prefix(data, max(max_v2_length, V1_MAX_LENGTH))
    if not data:
        return None
    first = data[0]
    if first == _V1_FIRST:
        return parse_v1(data, allow_v1_mixed_family, normalize_v4_mapped)
    if first == _V2_FIRST:
        return parse_v2(data, max_v2_length, allow_unix, allow_dgram, normalize_v4_mapped)
    raise NotProxyHeaderError(
        f"first bytes {show(bytes(data[:12]))} are neither the v1 prefix 'PROXY ' "
        "nor the v2 signature"
    )


def _bytes_prefix(data: bytes | bytearray | memoryview, limit: int) -> bytes:
    """At most ``limit`` bytes of ``data`` as ``bytes``: no header is longer."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return bytes(view[:limit])
