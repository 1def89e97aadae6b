"""``parse_header``: one entry point for v1 and v2, dispatching on the first byte.

It holds the two hot paths itself, since every function call counts at this scale: a
complete v1 TCP4/TCP6 line that one regular expression accepts whole, and a complete v2
PROXY over TCP/IPv4 or TCP/IPv6 header, whose TLVs ``check_tlvs`` validates. Both store
the validated bytes and build nothing else. Everything else goes to ``parse_v1`` or
``parse_v2``, which check field by field and name what is wrong.
"""

from __future__ import annotations

from mailedge.proxy._tlv import check_tlvs, show
from mailedge.proxy._v1 import FAST_LINE, V1_MAX_LENGTH, parse_v1
from mailedge.proxy._v1 import TCP4_LAYOUTS as V1_TCP4_LAYOUTS
from mailedge.proxy._v1 import TCP6_LAYOUTS as V1_TCP6_LAYOUTS
from mailedge.proxy._v2 import (
    DEFAULT_MAX_V2_LENGTH,
    FIXED,
    V2_SIGNATURE,
    parse_v2,
)
from mailedge.proxy._v2 import TCP4_LAYOUTS as V2_TCP4_LAYOUTS
from mailedge.proxy._v2 import TCP6_LAYOUTS as V2_TCP6_LAYOUTS
from mailedge.proxy.errors import NotProxyHeaderError
from mailedge.proxy.header import ProxyHeader

# The limits parse_header works to are public here, with it: the longest v1 line, the v2
# signature, and the default cap on a v2 header.
__all__ = ["parse_header", "DEFAULT_MAX_V2_LENGTH", "V1_MAX_LENGTH", "V2_SIGNATURE"]

_fast_line = FAST_LINE.match
_unpack_fixed = FIXED.unpack_from
# The parser's constructor, make_header, inlined: the class is frozen, but filling the
# new instance's __dict__ directly is allowed, and far cheaper than an __init__.
_new_header = object.__new__


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
    # The hot paths spell their constants as literals (named in the comments, and checked
    # against the names by the tests): a constant is read faster than a module global.
    if max_v2_length < 16:  # V2_FIXED_LENGTH
        raise ValueError(f"max_v2_length={max_v2_length} is under the 16-byte v2 fixed part")
    if type(data) is not bytes:
        data = _bytes_prefix(data, max(max_v2_length, V1_MAX_LENGTH))
    if not data:
        return None
    first = data[0]
    if first == 0x0D:  # CR, the first byte of V2_SIGNATURE
        available = len(data)
        if available >= 28:  # INET4_END: the shortest header the fast path takes
            signature, kind, length = _unpack_fixed(data)
            total = 16 + length  # V2_FIXED_LENGTH + length
            if signature == V2_SIGNATURE and total <= max_v2_length and available >= total:
                if kind == 0x2111:  # PROXY_TCP4
                    if total > 28:  # INET4_END: TLVs follow the address block
                        check_tlvs(data, 28, total)
                    elif total < 28:  # the block is cut short: parse_v2 names the error
                        return parse_v2(
                            data, max_v2_length, allow_unix, allow_dgram, normalize_v4_mapped
                        )
                    header = _new_header(ProxyHeader)
                    fields = header.__dict__
                    fields["raw"] = data[:total]
                    fields["_layout"] = V2_TCP4_LAYOUTS[normalize_v4_mapped]
                    return header, total
                if kind == 0x2121:  # PROXY_TCP6
                    if total > 52:  # INET6_END
                        check_tlvs(data, 52, total)
                    elif total < 52:
                        return parse_v2(
                            data, max_v2_length, allow_unix, allow_dgram, normalize_v4_mapped
                        )
                    header = _new_header(ProxyHeader)
                    fields = header.__dict__
                    fields["raw"] = data[:total]
                    fields["_layout"] = V2_TCP6_LAYOUTS[normalize_v4_mapped]
                    return header, total
        return parse_v2(data, max_v2_length, allow_unix, allow_dgram, normalize_v4_mapped)
    if first == 0x50:  # "P", the first byte of V1_PREFIX
        match = _fast_line(data)
        if match is not None:
            end = match.end()
            if end <= 107:  # V1_MAX_LENGTH
                header = _new_header(ProxyHeader)
                fields = header.__dict__
                fields["raw"] = data[:end]
                layouts = V1_TCP4_LAYOUTS if data[9] == 0x34 else V1_TCP6_LAYOUTS  # "4"
                fields["_layout"] = layouts[normalize_v4_mapped]
                return header, end
        return parse_v1(data, allow_v1_mixed_family, normalize_v4_mapped)
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
