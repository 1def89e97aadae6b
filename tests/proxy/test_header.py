"""ProxyHeader itself: bytes kept, attributes built lazily, equality, building from values."""

from __future__ import annotations

import ipaddress
import pickle
from ipaddress import IPv4Address, IPv6Address

import attrs
import pytest
from codec_support import values
from hypothesis import given
from hypothesis import strategies as st

from mailedge.proxy import (
    TLV,
    ClientFlags,
    Command,
    Family,
    InetAddress,
    ProxyHeader,
    SSLInfo,
    TLVType,
    Transport,
    UnixAddress,
    encode_v1,
    encode_v2,
    parse_header,
)

SOURCE4 = InetAddress(IPv4Address("192.0.2.10"), 51234)
DESTINATION4 = InetAddress(IPv4Address("198.51.100.25"), 25)
SOURCE6 = InetAddress(IPv6Address("2001:db8::7"), 40000)
DESTINATION6 = InetAddress(IPv6Address("2001:db8::25"), 587)
SSL = SSLInfo(ClientFlags.SSL | ClientFlags.CERT_CONN, 0, version="TLSv1.3", cn="alice")
PERMISSIVE = {"allow_unix": True, "allow_dgram": True, "allow_v1_mixed_family": True}


def parse(data: bytes | bytearray, **options: bool) -> ProxyHeader:
    result = parse_header(data, **options)
    assert result is not None
    assert result[1] == len(data)
    return result[0]


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


# --- building one from values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "options"),
    [
        ((1, Command.PROXY, Family.INET, Transport.STREAM, SOURCE4, DESTINATION4), {}),
        ((1, Command.PROXY, Family.INET6, Transport.STREAM, SOURCE6, DESTINATION6), {}),
        ((1, Command.PROXY, Family.UNSPEC, Transport.STREAM, None, None), {}),
        # HAProxy's mixed families: written v4-mapped, read back as IPv4.
        ((1, Command.PROXY, Family.INET6, Transport.STREAM, SOURCE4, DESTINATION6), {}),
        # nginx's: an IPv6 address under TCP4.
        ((1, Command.PROXY, Family.INET, Transport.STREAM, SOURCE6, DESTINATION4), PERMISSIVE),
        ((2, Command.PROXY, Family.INET, Transport.STREAM, SOURCE4, DESTINATION4), {}),
        ((2, Command.PROXY, Family.INET6, Transport.STREAM, SOURCE4, DESTINATION6), {}),
        ((2, Command.PROXY, Family.INET, Transport.DGRAM, SOURCE4, DESTINATION4), PERMISSIVE),
        ((2, Command.PROXY, Family.UNSPEC, Transport.UNSPEC, None, None), {}),
        ((2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, None, None), {}),
        ((2, Command.LOCAL, Family.INET6, Transport.STREAM, None, None), {}),
        (
            (
                2,
                Command.PROXY,
                Family.UNIX,
                Transport.STREAM,
                UnixAddress(b"/run/a"),
                UnixAddress(b"/run/b"),
            ),
            PERMISSIVE,
        ),
    ],
)
def test_built_headers_read_back_as_given(
    arguments: tuple[object, ...], options: dict[str, bool]
) -> None:
    header = ProxyHeader(*arguments)  # type: ignore[arg-type]
    assert values(header)[:6] == arguments
    assert values(header)[6:] == ((), None, False)
    # ... and are what parsing their bytes gives.
    assert values(parse(header.raw, **options)) == values(header)


def test_a_v4_mapped_ipv6_address_is_kept_as_given() -> None:
    mapped = InetAddress(IPv6Address("::ffff:192.0.2.1"), 1)
    for version in (1, 2):
        header = ProxyHeader(
            version, Command.PROXY, Family.INET6, Transport.STREAM, mapped, DESTINATION6
        )
        assert header.source == mapped
        assert header == parse(header.raw, normalize_v4_mapped=False)


def test_built_tlvs_ssl_and_crc32c() -> None:
    tlvs = (TLV(TLVType.ALPN, b"h2"), TLV(0xEA, b"\x01vpce-1"))
    header = ProxyHeader(
        2,
        Command.PROXY,
        Family.INET6,
        Transport.STREAM,
        SOURCE6,
        DESTINATION6,
        tlvs,
        ssl=SSL,
        crc32c_verified=True,
    )
    assert header.tlvs[:2] == tlvs
    assert [tlv.type for tlv in header.tlvs] == [0x01, 0xEA, 0x20, 0x03]
    assert header.crc32c_verified
    assert header.ssl is not None
    assert attrs.evolve(header.ssl, tlvs=()) == SSL
    # Building again from what was read back gives the very same header.
    again = ProxyHeader(*values(header))  # type: ignore[arg-type]
    assert again == header


def test_a_crc32c_tlv_among_the_given_ones_gets_the_right_checksum() -> None:
    tlvs = (TLV(TLVType.CRC32C, b"\xff" * 4), TLV(TLVType.ALPN, b"h2"))
    header = ProxyHeader(
        2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, tlvs=tlvs, crc32c_verified=True
    )
    assert header.crc32c_verified
    assert [tlv.type for tlv in header.tlvs] == [0x03, 0x01]  # where it was placed
    assert header.tlvs[0].value != b"\xff" * 4
    assert parse(header.raw).crc32c_verified


@pytest.mark.parametrize(
    ("arguments", "keywords", "error"),
    [
        ((3, Command.PROXY, Family.INET, Transport.STREAM, SOURCE4, DESTINATION4), {}, ValueError),
        ((1, Command.LOCAL, Family.INET, Transport.STREAM, SOURCE4, DESTINATION4), {}, ValueError),
        (
            (1, Command.PROXY, Family.INET, Transport.STREAM, SOURCE4, DESTINATION4),
            {"tlvs": (TLV(1, b"h2"),)},
            ValueError,
        ),
        ((1, Command.PROXY, Family.INET, Transport.STREAM, SOURCE4, None), {}, TypeError),
        (
            (1, Command.PROXY, Family.UNSPEC, Transport.STREAM, SOURCE4, DESTINATION4),
            {},
            ValueError,
        ),
        (
            (
                1,
                Command.PROXY,
                Family.INET,
                Transport.STREAM,
                InetAddress(IPv4Address("192.0.2.1"), 70000),
                DESTINATION4,
            ),
            {},
            ValueError,
        ),
        # Receivers ignore LOCAL's addresses, so they would not read back.
        ((2, Command.LOCAL, Family.INET, Transport.STREAM, SOURCE4, DESTINATION4), {}, ValueError),
        # UNSPEC's only family byte is 0x00: the transport reads back UNSPEC.
        ((2, Command.PROXY, Family.UNSPEC, Transport.STREAM, None, None), {}, ValueError),
        # A CRC32C TLV makes the header verified.
        (
            (2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC),
            {"tlvs": (TLV(TLVType.CRC32C, bytes(4)),)},
            ValueError,
        ),
        # The parser's rules apply: AUTHORITY must be UTF-8.
        (
            (2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC),
            {"tlvs": (TLV(TLVType.AUTHORITY, b"\xff"),)},
            ValueError,
        ),
    ],
)
def test_values_no_header_can_carry_are_refused(
    arguments: tuple[object, ...], keywords: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        ProxyHeader(*arguments, **keywords)  # type: ignore[arg-type]


@given(st.ip_addresses(), st.ip_addresses(), st.integers(0, 65535), st.integers(0, 65535))
def test_any_inet_pair_builds_for_both_versions(
    src: IPv4Address | IPv6Address, dst: IPv4Address | IPv6Address, sport: int, dport: int
) -> None:
    source = InetAddress(src, sport)
    destination = InetAddress(dst, dport)
    mapped = any(isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None for ip in (src, dst))
    for version in (1, 2):
        family = Family.INET if src.version == dst.version == 4 else Family.INET6
        if version == 2 and mapped and (src.version == 4 or dst.version == 4):
            # v2 can only write the IPv4 one v4-mapped, and then it reads back as IPv4
            # only if the other, v4-mapped one does too. (v1 writes it as IPv4 text.)
            with pytest.raises(ValueError, match="read back"):
                ProxyHeader(version, Command.PROXY, family, Transport.STREAM, source, destination)
            continue
        header = ProxyHeader(version, Command.PROXY, family, Transport.STREAM, source, destination)
        assert (header.source, header.destination) == (source, destination)
        reparsed = parse(header.raw, normalize_v4_mapped=not mapped, allow_v1_mixed_family=True)
        assert reparsed == header


def test_examples_of_the_public_constructor_use_keywords() -> None:
    header = ProxyHeader(
        version=2,
        command=Command.PROXY,
        family=Family.INET6,
        transport=Transport.STREAM,
        source=InetAddress(ipaddress.ip_address("2001:db8::7"), 51234),
        destination=InetAddress(ipaddress.ip_address("2001:db8::443"), 443),
        tlvs=(TLV(TLVType.ALPN, b"http/1.1"), TLV(TLVType.UNIQUE_ID, b"\x00\x01")),
        ssl=SSL,
    )
    assert header.alpn == b"http/1.1"
    assert header.unique_id == b"\x00\x01"
    assert header.ssl is not None
    assert header.ssl.cn == "alice"
