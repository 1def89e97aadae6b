"""parse_header as a whole: dispatch, input types, the three outcomes, and fuzzing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mailedge.proxy
from mailedge.proxy import (
    TLV,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    AddressBlockTooShortError,
    Command,
    HeaderTooLongError,
    InetAddress,
    NotProxyHeaderError,
    ProxyHeader,
    ProxyProtocolError,
    TLVType,
    encode_v1,
    encode_v2,
    parse_header,
)

SOURCE = InetAddress(ipaddress.IPv4Address("192.0.2.10"), 51234)
DESTINATION = InetAddress(ipaddress.IPv4Address("198.51.100.25"), 25)
V1 = encode_v1(SOURCE, DESTINATION)
V2 = encode_v2(Command.PROXY, SOURCE, DESTINATION)
PERMISSIVE = {"allow_unix": True, "allow_dgram": True, "allow_v1_mixed_family": True}


def test_constants() -> None:
    assert V2_SIGNATURE == b"\r\n\r\n\x00\r\nQUIT\n"
    assert V1_MAX_LENGTH == 107
    assert mailedge.proxy.DEFAULT_MAX_V2_LENGTH == 4096


def test_the_literals_in_parse_header_are_the_named_constants() -> None:
    # parse_header spells these as literals, for speed; they must stay what the names say.
    from mailedge.proxy._v1 import V1_PREFIX
    from mailedge.proxy._v2 import INET4_END, INET6_END, PROXY_TCP4, PROXY_TCP6, V2_FIXED_LENGTH

    assert V2_FIXED_LENGTH == 16
    assert INET4_END == 28
    assert INET6_END == 52
    assert PROXY_TCP4 == 0x2111
    assert PROXY_TCP6 == 0x2121
    assert V2_SIGNATURE[0] == 0x0D
    assert V1_PREFIX[0] == 0x50
    assert V1_MAX_LENGTH == 107
    assert b"PROXY TCP4 "[9] == 0x34


@pytest.mark.parametrize(
    ("kind", "length"),
    # PROXY over TCP4 (a 12-byte block) and TCP6 (36): too short, exact, and one empty TLV.
    [(0x2111, n) for n in (0, 1, 11, 12, 15)] + [(0x2121, n) for n in (0, 12, 35, 36, 39)],
)
def test_a_fast_path_header_too_short_for_its_block_is_refused(kind: int, length: int) -> None:
    data = V2_SIGNATURE + kind.to_bytes(2, "big") + length.to_bytes(2, "big") + bytes(length)
    data += b"\0" * 64  # what follows, so that the header is complete whatever its length
    block = 12 if kind == 0x2111 else 36
    if length < block:
        with pytest.raises(AddressBlockTooShortError):
            parse_header(data)
    else:
        result = parse_header(data)
        assert result is not None
        assert result[1] == 16 + length


def test_public_api_is_exported() -> None:
    for name in (
        "parse_header",
        "sniff",
        "Sniff",
        "encode_v1",
        "encode_v2",
        "V2_SIGNATURE",
        "V1_MAX_LENGTH",
        "DEFAULT_MAX_V2_LENGTH",
    ):
        assert name in mailedge.proxy.__all__
        assert hasattr(mailedge.proxy, name)


def test_empty_input_waits() -> None:
    assert parse_header(b"") is None
    assert parse_header(bytearray()) is None
    assert parse_header(memoryview(b"")) is None


@pytest.mark.parametrize("first", range(256))
def test_the_first_byte_decides(first: int) -> None:
    data = bytes([first])
    if data in (b"P", b"\r"):
        assert parse_header(data) is None
    else:
        with pytest.raises(NotProxyHeaderError):
            parse_header(data)


@pytest.mark.parametrize("data", [V1, V2])
def test_every_input_type_gives_the_same_result(data: bytes) -> None:
    expected = parse_header(data)
    assert expected is not None
    assert parse_header(bytearray(data)) == expected
    assert parse_header(memoryview(data)) == expected
    assert parse_header(memoryview(bytearray(data + b"rest"))) == expected
    # A view in another format is read as its bytes.
    padded = data + bytes(-len(data) % 4)
    assert parse_header(memoryview(padded).cast("I")) == expected


def test_a_big_buffer_is_only_read_as_far_as_the_header() -> None:
    data = V2 + bytes(10_000_000)
    assert parse_header(memoryview(data)) == (parse_header(V2) or (None, 0))


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.example.org\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET / HTTP/1.1\r\n",
        b"\x00" * 16,
        b"QUIT\r\n",
    ],
)
def test_other_protocols_are_not_proxy_headers(data: bytes) -> None:
    with pytest.raises(NotProxyHeaderError) as caught:
        parse_header(data)
    assert caught.value.reason == "not_proxy_header"


def test_errors_carry_their_reason_and_message() -> None:
    with pytest.raises(ProxyProtocolError) as caught:
        parse_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 8_0 25\r\n")
    assert caught.value.reason == "bad_port"
    assert "'8_0'" in caught.value.message
    assert "bad_port" in repr(caught.value)


# --- properties -------------------------------------------------------------------------------


def check_outcome(data: bytes, **options: bool) -> tuple[ProxyHeader, int] | None:
    """Parse and assert the outcome is one of the three allowed ones."""
    try:
        result = parse_header(data, **options)
    except ProxyProtocolError:
        raise
    except Exception as error:  # pragma: no cover - the property under test
        raise AssertionError(f"{type(error).__name__} escaped for {data!r}") from error
    if result is not None:
        header, consumed = result
        assert isinstance(header, ProxyHeader)
        assert 0 < consumed <= len(data)
        # Whatever was accepted is accepted again on its own.
        assert parse_header(data[:consumed], **options) == result
    return result


def outcome(data: bytes, **options: bool) -> str | tuple[ProxyHeader, int] | None:
    try:
        return check_outcome(data, **options)
    except ProxyProtocolError as error:
        return error.reason


@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    outcome(data)
    outcome(data, **PERMISSIVE)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_the_v2_signature(data: bytes) -> None:
    outcome(V2_SIGNATURE + data)
    outcome(V2_SIGNATURE + data, **PERMISSIVE)


@given(
    st.sampled_from([0x20, 0x21]),
    st.sampled_from([0x00, 0x11, 0x21, 0x31, 0x12]),
    st.binary(max_size=300),
)
def test_arbitrary_bodies_after_a_valid_fixed_part(command: int, family: int, body: bytes) -> None:
    data = V2_SIGNATURE + bytes([command, family]) + len(body).to_bytes(2, "big") + body
    outcome(data)
    outcome(data, **PERMISSIVE)


v1_alphabet = st.sampled_from(
    [
        b"PROXY ",
        b"TCP4 ",
        b"TCP6 ",
        b"UNKNOWN",
        b" ",
        b"\r\n",
        b"\r",
        b"\n",
        b"1",
        b"0",
        b".",
        b":",
        b"::",
        b"ffff",
        b"255",
        b"65535",
        b"192.0.2.1",
        b"2001:db8::1",
        b"%",
        b"[",
        b"x",
    ]
)


@given(st.lists(v1_alphabet, max_size=20).map(b"".join))
def test_arbitrary_v1_like_lines(tail: bytes) -> None:
    outcome(b"PROXY " + tail)
    outcome(b"PROXY " + tail, **PERMISSIVE)


@given(st.binary(max_size=200), st.binary(min_size=1, max_size=50))
def test_once_bad_always_bad_and_once_good_always_the_same(data: bytes, extra: bytes) -> None:
    # More bytes never rescue a rejected prefix, and never change an accepted header.
    for candidate in (data, b"PROXY " + data, V2_SIGNATURE + data):
        first = outcome(candidate)
        later = outcome(candidate + extra)
        if isinstance(first, str):
            assert isinstance(later, str), (candidate, extra)
        elif first is not None:
            assert later == first


@pytest.mark.parametrize(
    "data",
    [
        V1,
        V2,
        encode_v1(),
        encode_v2(Command.LOCAL, crc32c=True),
        encode_v2(Command.PROXY, SOURCE, DESTINATION, crc32c=True),
    ],
)
def test_every_strict_prefix_of_a_valid_header_waits(data: bytes) -> None:
    for size in range(len(data)):
        assert parse_header(data[:size]) is None


@pytest.mark.parametrize("family_byte", [0x11, 0x21])
def test_a_complete_header_over_the_cap_is_refused_on_the_fast_path(family_byte: int) -> None:
    """A whole PROXY over TCP header, handed over as bytes (the fast path's input), longer
    than max_v2_length: refused even though every byte of it is there and valid."""
    source, destination = (
        (SOURCE, DESTINATION)
        if family_byte == 0x11
        else (
            InetAddress(ipaddress.IPv6Address("2001:db8::1"), 1),
            InetAddress(ipaddress.IPv6Address("2001:db8::2"), 2),
        )
    )
    header = encode_v2(Command.PROXY, source, destination, tlvs=[TLV(TLVType.NOOP, bytes(300))])
    assert header[13] == family_byte
    assert parse_header(header, max_v2_length=len(header)) is not None
    for cap in (len(header) - 1, 256):
        with pytest.raises(HeaderTooLongError):
            parse_header(header, max_v2_length=cap)
        with pytest.raises(HeaderTooLongError):
            parse_header(header + b"EHLO x\r\n", max_v2_length=cap)
