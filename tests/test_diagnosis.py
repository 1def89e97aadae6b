"""Tests for mailedge/diagnosis.py: naming what arrived instead of a PROXY header."""

from __future__ import annotations

import pytest

from mailedge.diagnosis import Arrival, diagnose, recognize

FIX = (
    "the proxy is not sending PROXY headers, or sends them only on another port "
    "(HAProxy: send-proxy or send-proxy-v2 on the server line; nginx: proxy_protocol on)"
)


@pytest.mark.parametrize(
    ("data", "arrival"),
    [
        (b"\x16\x03\x01\x02\x00", Arrival.TLS),
        (b"\x16", Arrival.TLS),  # the rest of the ClientHello is still on its way
        (b"GET / HTTP/1.1\r\n", Arrival.HTTP),
        (b"PRI * HTTP/2.0\r\n", Arrival.HTTP),
        (b"EHLO client.example\r\n", Arrival.SMTP),
        (b"ehlo client.example\r\n", Arrival.SMTP),
        (b"QUIT\r\n", Arrival.SMTP),
        (bytearray(b"a1 CAPABILITY\r\n"), Arrival.IMAP),
        (b"A.2 login user pass\r\n", Arrival.IMAP),
        (b"\x16\x02", None),
        (b"get / HTTP/1.1\r\n", None),  # methods are case-sensitive
        (b"EHLOX\r\n", None),
        (b"a1 FETCH 1 BODY[]\r\n", None),
        (b"", None),
    ],
)
def test_recognize(data: bytes, arrival: Arrival | None) -> None:
    assert recognize(data) is arrival


def test_diagnose_words_each_arrival() -> None:
    expected = "where a PROXY header was expected"
    direct = f"{FIX}, or a client connected directly"
    assert diagnose(b"\x16\x03\x01") == f"a TLS ClientHello arrived {expected}: {FIX}"
    assert diagnose(b"GET / ") == f"an HTTP request arrived {expected}: {direct}"
    assert diagnose(b"MAIL FROM:<>") == f"an SMTP command arrived {expected}: {direct}"
    assert diagnose(b"x NOOP") == f"an IMAP command arrived {expected}: {direct}"
    assert diagnose(b"\x00\x01") == f"bytes that are not a PROXY header arrived {expected}: {FIX}"
