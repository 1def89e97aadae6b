"""ProxyHeader itself: bytes kept, attributes built lazily, equality, endpoints."""

from __future__ import annotations

import pickle
from ipaddress import IPv4Address, IPv6Address

import attrs
import pytest
from codec_support import (
    DESTINATION4,
    DESTINATION6,
    PERMISSIVE,
    SOURCE4,
    SOURCE6,
    SSL,
    parse,
    values,
)
from hypothesis import given
from hypothesis import strategies as st

from mailedge.proxy import (
    TLV,
    Command,
    Family,
    InetAddress,
    ProxyHeader,
    TLVType,
    encode_v1,
    encode_v2,
    parse_header,
)

# --- what a parsed header holds -------------------------------------------------------------


def test_raw_is_the_header_exactly_as_received() -> None:
    data = encode_v2(Command.PROXY, SOURCE4, DESTINATION4, crc32c=True)
    result = parse_header(data + b"EHLO x\r\n")
    assert result is not None
    header, consumed = result
    assert header.raw == data
    assert consumed == len(data)
    assert type(header.raw) is bytes
    assert parse(bytes(memoryview(data))).raw == data


def test_only_the_bytes_and_the_layout_are_stored() -> None:
    header = parse(encode_v1(SOURCE4, DESTINATION4))
    assert [field.name for field in attrs.fields(ProxyHeader)] == ["raw", "_layout"]
    assert set(vars(header)) == {"raw", "_layout"}
    assert header.source == SOURCE4
    assert set(vars(header)) == {"raw", "_layout", "source", "destination"}


def test_lazy_attributes_are_built_once() -> None:
    header = parse(
        encode_v2(
            Command.PROXY,
            SOURCE6,
            DESTINATION6,
            tlvs=[TLV(TLVType.ALPN, b"h2"), TLV(TLVType.AUTHORITY, b"mail.example")],
            ssl=SSL,
            crc32c=True,
        )
    )
    assert header.source is header.source
    assert header.destination is header.destination
    assert header.tlvs is header.tlvs
    assert header.ssl is header.ssl
    assert header.crc32c_verified is True
    assert header.alpn == b"h2"
    assert header.authority == "mail.example"
    assert header.unique_id is None
    assert header.netns is None


def test_headers_are_frozen_lazy_attributes_included() -> None:
    header = parse(encode_v1(SOURCE4, DESTINATION4))
    for name in ("raw", "version", "family", "source", "destination", "tlvs", "ssl"):
        with pytest.raises((attrs.exceptions.FrozenInstanceError, AttributeError)):
            setattr(header, name, None)
    header.source  # noqa: B018 - built now, and still frozen
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        header.source = None


def test_equal_when_bytes_and_normalisation_are() -> None:
    data = encode_v2(Command.PROXY, SOURCE6, DESTINATION6)
    first, second = parse(data), parse(bytearray(data))
    assert first == second
    assert hash(first) == hash(second)
    second.source  # noqa: B018 - what was built already plays no part
    assert first == second
    assert first != parse(data, normalize_v4_mapped=False)
    assert first != parse(encode_v2(Command.PROXY, SOURCE6, DESTINATION6, crc32c=True))
    assert len({first, second, parse(data, normalize_v4_mapped=False)}) == 2


def test_repr_shows_the_values() -> None:
    header = parse(encode_v1(SOURCE4, DESTINATION4))
    assert repr(header) == (
        "ProxyHeader(version=1, command=<Command.PROXY: 1>, family=<Family.INET: 1>, "
        "transport=<Transport.STREAM: 1>, source=InetAddress(192.0.2.10:51234), "
        "destination=InetAddress(198.51.100.25:25), ssl=None, crc32c_verified=False)"
    )


def test_pickles() -> None:
    header = parse(encode_v2(Command.PROXY, SOURCE6, DESTINATION6, ssl=SSL))
    assert pickle.loads(pickle.dumps(header)) == header
    header.ssl  # noqa: B018
    again = pickle.loads(pickle.dumps(header))
    assert values(again) == values(header)


# --- the addresses, built without their __init__ ------------------------------------------


def _same_object(built: object, public: object) -> None:
    assert type(built) is type(public)
    assert built == public
    assert hash(built) == hash(public)
    assert repr(built) == repr(public)
    assert pickle.loads(pickle.dumps(built)) == public


@given(
    st.ip_addresses(),
    st.ip_addresses(),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.booleans(),
)
def test_endpoints_are_the_objects_the_public_constructors_make(
    src: IPv4Address | IPv6Address,
    dst: IPv4Address | IPv6Address,
    sport: int,
    dport: int,
    normalize: bool,
) -> None:
    # Both versions, and both families in v1 (mixed ones too: nginx), read back as the
    # values InetAddress(ipaddress.ip_address(...), port) makes.
    source, destination = InetAddress(src, sport), InetAddress(dst, dport)
    # (bytes, whether IPv4 addresses are written v4-mapped)
    datas = [(encode_v2(Command.PROXY, source, destination, family=Family.INET6), True)]
    if src.version == dst.version:
        datas.append((encode_v2(Command.PROXY, source, destination), False))
    v1_line = f"PROXY TCP{src.version} {src} {dst} {sport} {dport}\r\n".encode()
    if len(v1_line) <= 107:
        datas.append((v1_line, False))
    for data, mapped in datas:
        header = parse(data, normalize_v4_mapped=normalize, **PERMISSIVE)
        for endpoint, ip, port in ((header.source, src, sport), (header.destination, dst, dport)):
            assert isinstance(endpoint, InetAddress)
            if ip.version == 6 and normalize and ip.ipv4_mapped is not None:
                expected: IPv4Address | IPv6Address = ip.ipv4_mapped
            elif ip.version == 4 and mapped and not normalize:
                expected = IPv6Address(int(ip) | 0xFFFF << 32)
            else:
                expected = ip
            _same_object(endpoint.ip, expected)
            _same_object(endpoint, InetAddress(expected, port))
            assert endpoint.ip.version == expected.version
            if isinstance(expected, IPv6Address):
                assert isinstance(endpoint.ip, IPv6Address)
                assert endpoint.ip.scope_id is None
