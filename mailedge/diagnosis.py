"""What arrived instead of a PROXY header: the first bytes of a connection, recognised.

A header that never comes usually means the proxy is not sending one, so what does arrive
is the client's own protocol: a TLS ClientHello, an HTTP request, an SMTP or IMAP command.
:func:`recognize` names which; :func:`diagnose` is the gate's sentence about it, and
``mailedge decode`` words its hint from the same :class:`Arrival`.
"""

from __future__ import annotations

import enum
import re

__all__ = ["Arrival", "diagnose", "recognize"]

_SMTP_COMMAND = re.compile(rb"(?i)(EHLO|HELO|LHLO|QUIT|NOOP|RSET|MAIL|STARTTLS|AUTH)\b")
_HTTP_REQUEST = re.compile(rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH|CONNECT|PRI) ")
_IMAP_COMMAND = re.compile(
    rb"[A-Za-z0-9.]+ (?i:CAPABILITY|LOGIN|STARTTLS|LOGOUT|NOOP|AUTHENTICATE)"
)


class Arrival(enum.Enum):
    """A recognised start of a client's protocol; the value is how a sentence names it."""

    TLS = "a TLS ClientHello"
    HTTP = "an HTTP request"
    SMTP = "an SMTP command"
    IMAP = "an IMAP command"


def recognize(data: bytes | bytearray) -> Arrival | None:
    """Which client protocol these first bytes start, or None when they start none we know.

    A lone 0x16 counts as TLS: the rest of a ClientHello may not have arrived yet.
    """
    if data[:1] == b"\x16" and data[1:2] in (b"\x03", b""):
        return Arrival.TLS
    if _HTTP_REQUEST.match(data):
        return Arrival.HTTP
    if _SMTP_COMMAND.match(data):
        return Arrival.SMTP
    if _IMAP_COMMAND.match(data):
        return Arrival.IMAP
    return None


def diagnose(data: bytes | bytearray) -> str:
    """Name what arrived instead of a PROXY header, and the likely misconfiguration."""
    expected = "where a PROXY header was expected"
    fix = (
        "the proxy is not sending PROXY headers, or sends them only on another port "
        "(HAProxy: send-proxy or send-proxy-v2 on the server line; nginx: proxy_protocol on)"
    )
    arrival = recognize(data)
    if arrival is None:
        return f"bytes that are not a PROXY header arrived {expected}: {fix}"
    if arrival is Arrival.TLS:
        return f"{arrival.value} arrived {expected}: {fix}"
    return f"{arrival.value} arrived {expected}: {fix}, or a client connected directly"
