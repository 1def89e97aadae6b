"""build_header: a header from values, encoded and parsed back; and the deprecated spelling."""

from __future__ import annotations

import ipaddress
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
    Transport,
    UnixAddress,
    build_header,
)


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
    header = build_header(*arguments)  # type: ignore[arg-type]
    assert values(header)[:6] == arguments
    assert values(header)[6:] == ((), None, False)
    # ... and are what parsing their bytes gives.
    assert values(parse(header.raw, **options)) == values(header)


def test_a_v4_mapped_ipv6_address_is_kept_as_given() -> None:
    mapped = InetAddress(IPv6Address("::ffff:192.0.2.1"), 1)
    for version in (1, 2):
        header = build_header(
            version, Command.PROXY, Family.INET6, Transport.STREAM, mapped, DESTINATION6
        )
        assert header.source == mapped
        assert header == parse(header.raw, normalize_v4_mapped=False)


def test_built_tlvs_ssl_and_crc32c() -> None:
    tlvs = (TLV(TLVType.ALPN, b"h2"), TLV(0xEA, b"\x01vpce-1"))
    header = build_header(
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
    again = build_header(*values(header))  # type: ignore[arg-type]
    assert again == header


def test_a_crc32c_tlv_among_the_given_ones_gets_the_right_checksum() -> None:
    tlvs = (TLV(TLVType.CRC32C, b"\xff" * 4), TLV(TLVType.ALPN, b"h2"))
    header = build_header(
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
        build_header(*arguments, **keywords)  # type: ignore[arg-type]


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
                build_header(version, Command.PROXY, family, Transport.STREAM, source, destination)
            continue
        header = build_header(version, Command.PROXY, family, Transport.STREAM, source, destination)
        assert (header.source, header.destination) == (source, destination)
        reparsed = parse(header.raw, normalize_v4_mapped=not mapped, allow_v1_mixed_family=True)
        assert reparsed == header


def test_examples_of_the_public_constructor_use_keywords() -> None:
    header = build_header(
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


# --- the deprecated spelling: ProxyHeader(...) from values -----------------------------------


@pytest.mark.parametrize(
    ("arguments", "keywords"),
    [
        ((1, Command.PROXY, Family.INET6, Transport.STREAM, SOURCE4, DESTINATION6), {}),
        ((1, Command.PROXY, Family.UNSPEC, Transport.STREAM), {}),
        (
            (2, Command.PROXY, Family.INET6, Transport.STREAM, SOURCE6, DESTINATION6),
            {"tlvs": [TLV(TLVType.ALPN, b"h2")], "ssl": SSL, "crc32c_verified": True},
        ),
        ((2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC), {}),
    ],
)
def test_proxy_header_from_values_warns_and_gives_the_same_header(
    arguments: tuple[object, ...], keywords: dict[str, object]
) -> None:
    with pytest.warns(DeprecationWarning, match="build_header") as caught:
        old = ProxyHeader(*arguments, **keywords)  # type: ignore[arg-type]
    assert len(caught) == 1
    assert caught[0].filename == __file__  # the warning points at the caller
    new = build_header(*arguments, **keywords)  # type: ignore[arg-type]
    assert type(old) is ProxyHeader
    assert old == new
    assert old.raw == new.raw
    assert values(old) == values(new)


def test_proxy_header_from_values_still_refuses_what_build_header_refuses() -> None:
    with (
        pytest.warns(DeprecationWarning, match="build_header"),
        pytest.raises(ValueError, match="neither 1 nor 2"),
    ):
        ProxyHeader(3, Command.PROXY, Family.INET, Transport.STREAM, SOURCE4, DESTINATION4)
