"""Tests for mailedge/cli/render.py: a header as JSON values and as one line of text."""

from __future__ import annotations

import ipaddress
import json

from mailedge.cli.render import address_to_json, describe_header, header_to_json
from mailedge.proxy import (
    TLV,
    Command,
    InetAddress,
    TLVType,
    UnixAddress,
    encode_v2,
    parse_header,
)


def test_header_to_json_for_local() -> None:
    parsed = parse_header(encode_v2(Command.LOCAL))
    assert parsed is not None
    result = header_to_json(parsed[0])
    assert result["command"] == "LOCAL"
    assert result["source"] is None
    assert result["destination"] is None
    json.dumps(result)


def test_describe_header() -> None:
    source = InetAddress(ipaddress.IPv6Address("2001:db8::1"), 40000)
    destination = InetAddress(ipaddress.IPv6Address("2001:db8::25"), 25)
    v2 = encode_v2(Command.PROXY, source, destination, tlvs=[TLV(TLVType.AUTHORITY, b"mx")])
    assert describe_header(v2) == (
        "v2 PROXY INET6 [2001:db8::1]:40000 -> [2001:db8::25]:25, TLVs: AUTHORITY"
    )
    assert describe_header(b"PROXY UNKNOWN\r\n") == "v1: PROXY UNKNOWN\\r\\n"
    assert describe_header(b"PROXY TCP4 ") == "an incomplete header"
    assert describe_header(b"PROXY TCP9 x\r\n").startswith("not a valid header: ")


def test_address_to_json() -> None:
    inet = InetAddress(ipaddress.IPv4Address("192.0.2.1"), 25)
    assert address_to_json(inet) == {"ip": "192.0.2.1", "port": 25}
    assert address_to_json(UnixAddress(b"/run/mx.sock\x00\x00")) == {"path": "/run/mx.sock"}
    assert address_to_json(None) is None
