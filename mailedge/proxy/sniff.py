"""Cheap detection: do the first bytes of a connection begin a PROXY header?"""

from __future__ import annotations

import enum

from mailedge.proxy._v1 import V1_PREFIX
from mailedge.proxy._v2 import V2_SIGNATURE

__all__ = ["Sniff", "sniff"]

_V1_FIRST = V1_PREFIX[0]
_V2_FIRST = V2_SIGNATURE[0]


class Sniff(enum.Enum):
    """What the first bytes of a connection say."""

    # The full "PROXY " prefix is present.
    V1 = "v1"
    # The full 12-byte v2 signature is present.
    V2 = "v2"
    # A byte rules out both; parse_header would raise NotProxyHeaderError.
    NOT_PROXY = "not_proxy"
    # Empty, or a strict prefix of "PROXY " or of the v2 signature.
    NEED_MORE = "need_more"


def sniff(data: bytes | bytearray | memoryview) -> Sniff:
    """Classify the first bytes of a connection; looks at no more than 12 bytes."""
    if not data:
        return Sniff.NEED_MORE
    first = data[0]
    if first == _V1_FIRST:
        marker = V1_PREFIX
    elif first == _V2_FIRST:
        marker = V2_SIGNATURE
    else:
        return Sniff.NOT_PROXY
    head = bytes(data[: len(marker)])
    if head == marker:
        return Sniff.V1 if marker is V1_PREFIX else Sniff.V2
    if marker.startswith(head):
        return Sniff.NEED_MORE
    return Sniff.NOT_PROXY
