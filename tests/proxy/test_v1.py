"""v1 (text) headers: the grammar, its boundaries, and the junk other parsers accept."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv6Address

import pytest
from codec_support import Values, three_ways, values
from hypothesis import given
from hypothesis import strategies as st

from mailedge.proxy import (
    V1_MAX_LENGTH,
    Command,
    DisallowedFamilyError,
    Family,
    HeaderTooLongError,
    InetAddress,
    InvalidAddressError,
    InvalidPortError,
    NotProxyHeaderError,
    ProxyProtocolError,
    Transport,
    V1SyntaxError,
    parse_header,
)
from mailedge.proxy._decode import ipv6_int
from mailedge.proxy._v1 import FAST_LINE, parse_v1

# What a header says, every lazily built attribute materialised. Tests compare these,
# never headers: two headers are equal only when their bytes are (and one of these lines
# can be written in many ways).


def parsed_values(data: bytes, **options: bool) -> tuple[Values, int] | None:
    result = parse_header(data, **options)
    return None if result is None else (values(result[0]), result[1])


def tcp(src: str, dst: str, sport: int, dport: int, family: Family = Family.INET) -> Values:
    return (
        1,
        Command.PROXY,
        family,
        Transport.STREAM,
        InetAddress(ipaddress.ip_address(src), sport),
        InetAddress(ipaddress.ip_address(dst), dport),
        (),
        None,
        False,
    )


UNKNOWN = (1, Command.PROXY, Family.UNSPEC, Transport.STREAM, None, None, (), None, False)

VALID = [
    (
        b"PROXY TCP4 192.0.2.10 198.51.100.25 51234 25\r\n",
        tcp("192.0.2.10", "198.51.100.25", 51234, 25),
    ),
    (
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        tcp("0.0.0.0", "255.255.255.255", 0, 65535),
    ),
    (b"PROXY TCP4 10.0.0.1 10.0.0.2 1 9\r\n", tcp("10.0.0.1", "10.0.0.2", 1, 9)),
    (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        tcp("255.255.255.255", "255.255.255.255", 65535, 65535),
    ),
    (
        b"PROXY TCP6 2001:db8:85a3::8a2e:370:7334 2001:db8::25 51234 587\r\n",
        tcp("2001:db8:85a3::8a2e:370:7334", "2001:db8::25", 51234, 587, Family.INET6),
    ),
    (b"PROXY TCP6 :: ::1 0 1\r\n", tcp("::", "::1", 0, 1, Family.INET6)),
    (b"PROXY TCP6 1:: fe80:: 2 3\r\n", tcp("1::", "fe80::", 2, 3, Family.INET6)),
    (
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 "
        b"ABCD:EF01:2345:6789:abcd:ef01:2345:6789 4 5\r\n",
        tcp("2001:db8::1", "abcd:ef01:2345:6789:abcd:ef01:2345:6789", 4, 5, Family.INET6),
    ),
    (
        b"PROXY TCP6 1:2:3:4:5:6:7:: ::2:3:4:5:6:7:8 6 7\r\n",
        tcp("1:2:3:4:5:6:7::", "0:2:3:4:5:6:7:8", 6, 7, Family.INET6),
    ),
    # The v4-compatible form (not v4-mapped) stays IPv6.
    (
        b"PROXY TCP6 ::1.2.3.4 1:2:3:4:5:6:1.2.3.4 8 9\r\n",
        tcp("::102:304", "1:2:3:4:5:6:102:304", 8, 9, Family.INET6),
    ),
    # HAProxy's mixed-family form: v4-mapped, normalised to IPv4 (family stays INET6).
    (
        b"PROXY TCP6 ::ffff:192.0.2.1 ::FFFF:c000:0202 10 11\r\n",
        tcp("192.0.2.1", "192.0.2.2", 10, 11, Family.INET6),
    ),
    (b"PROXY UNKNOWN\r\n", UNKNOWN),
    (b"PROXY UNKNOWN 192.0.2.1 192.0.2.2 1 2\r\n", UNKNOWN),
    (b"PROXY UNKNOWN \x00\xff anything but CR or LF\t\r\n", UNKNOWN),
    (b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n", UNKNOWN),
]


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_headers_parse_three_ways(data: bytes, expected: Values) -> None:
    header = three_ways(data)
    assert values(header) == expected
    assert header.raw == data
    assert header.version == 1
    assert header.command is Command.PROXY
    assert header.transport is Transport.STREAM
    assert header.tlvs == ()
    assert header.ssl is None
    assert header.crc32c_verified is False


def test_worst_case_tcp6_line_fits() -> None:
    group = "ffff:" * 7 + "ffff"
    data = f"PROXY TCP6 {group} {group} 65535 65535\r\n".encode()
    assert len(data) == 104
    assert parsed_values(data) == (tcp(group, group, 65535, 65535, Family.INET6), 104)


def test_unknown_padded_to_exactly_107_bytes_is_valid() -> None:
    data = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(data) == V1_MAX_LENGTH
    assert parsed_values(data) == (UNKNOWN, 107)


def test_unknown_of_108_bytes_is_too_long() -> None:
    data = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert len(data) == V1_MAX_LENGTH + 1
    with pytest.raises(HeaderTooLongError):
        parse_header(data)


@pytest.mark.parametrize("extra", [0, 1, 50, 4000])
def test_no_crlf_within_107_bytes_raises_at_once(extra: int) -> None:
    data = (b"PROXY UNKNOWN " + b"x" * 200)[: V1_MAX_LENGTH + extra]
    with pytest.raises(HeaderTooLongError):
        parse_header(data)
    # One byte short of the limit is still a valid prefix.
    assert parse_header(data[: V1_MAX_LENGTH - 1]) is None


def test_4000_bytes_without_crlf_raise() -> None:
    with pytest.raises(HeaderTooLongError):
        parse_header(b"PROXY UNKNOWN " + b"a" * 4000)


def test_crlf_after_107_bytes_does_not_rescue_the_line() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 100 + b"\r\nEHLO x\r\n"
    with pytest.raises(HeaderTooLongError):
        parse_header(line)


def test_cr_as_byte_107_is_too_long_not_waiting() -> None:
    data = b"PROXY UNKNOWN " + b"x" * 92 + b"\r"
    assert len(data) == V1_MAX_LENGTH
    with pytest.raises(HeaderTooLongError):
        parse_header(data)
    assert parse_header(data[: V1_MAX_LENGTH - 1]) is None


@pytest.mark.parametrize(
    ("port", "valid"),
    [
        (b"0", True),
        (b"1", True),
        (b"9", True),
        (b"10", True),
        (b"65535", True),
        (b"65536", False),
        (b"99999", False),
        (b"100000", False),
        (b"00", False),
        (b"01", False),
        (b"065535", False),
    ],
)
def test_port_boundaries(port: bytes, valid: bool) -> None:
    for data in (
        b"PROXY TCP4 192.0.2.1 192.0.2.2 " + port + b" 25\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 25 " + port + b"\r\n",
        b"PROXY TCP6 ::1 ::2 " + port + b" 25\r\n",
    ):
        if valid:
            result = parse_header(data)
            assert result is not None
            source, destination = result[0].source, result[0].destination
            assert isinstance(source, InetAddress)
            assert isinstance(destination, InetAddress)
            assert int(port) in (source.port, destination.port)
        else:
            with pytest.raises(InvalidPortError):
                parse_header(data)


JUNK = [
    # Ports that int() accepts but the spec does not.
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 +25 25\r\n", InvalidPortError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 25 -1\r\n", InvalidPortError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 2_5 25\r\n", InvalidPortError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 8_0 25\r\n", InvalidPortError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 25 \xef\xbc\x92\xef\xbc\x95\r\n", InvalidPortError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 025 25\r\n", InvalidPortError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 25\r\n", InvalidPortError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 0x19 25\r\n", InvalidPortError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 25.0 25\r\n", InvalidPortError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 25\t 25\r\n", InvalidPortError),
    # Spacing.
    (b"PROXY TCP4 192.0.2.1 192.0.2.2  25 25\r\n", V1SyntaxError),
    (b"PROXY TCP4  192.0.2.1 192.0.2.2 25 25\r\n", V1SyntaxError),
    (b"PROXY  TCP4 192.0.2.1 192.0.2.2 25 25\r\n", V1SyntaxError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 25 25 \r\n", V1SyntaxError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 25 25 26\r\n", V1SyntaxError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 25\r\n", V1SyntaxError),
    (b"PROXY TCP4\r\n", V1SyntaxError),
    (b"PROXY \r\n", V1SyntaxError),
    # Protocol token.
    (b"PROXY tcp4 192.0.2.1 192.0.2.2 25 25\r\n", V1SyntaxError),
    (b"PROXY TCPfoo4 192.0.2.1 192.0.2.2 25 25\r\n", V1SyntaxError),
    (b"PROXY TCP5 192.0.2.1 192.0.2.2 25 25\r\n", V1SyntaxError),
    (b"PROXY UDP4 192.0.2.1 192.0.2.2 25 25\r\n", V1SyntaxError),
    (b"PROXY unknown\r\n", V1SyntaxError),
    (b"PROXY UNKNOWNX\r\n", V1SyntaxError),
    # Line endings.
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 25 25\n", V1SyntaxError),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 25 25\r\r\n", V1SyntaxError),
    (b"PROXY TCP4 192.0.2.1\r192.0.2.2 25 25\r\n", V1SyntaxError),
    (b"PROXY TCP4 192.0.2.1\n192.0.2.2 25 25\r\n", V1SyntaxError),
    (b"PROXY UNKNOWN \n\r\n", V1SyntaxError),
    (b"PROXY UNKNOWN \r \r\n", V1SyntaxError),
    # Addresses.
    (b"PROXY TCP4 not-an-ip 192.0.2.2 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP4 192.0.2.01 192.0.2.2 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP4 192.0.02.1 192.0.2.2 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP4 256.0.2.1 192.0.2.2 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP4 192.0.2 192.0.2.2 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP4 192.0.2.1.5 192.0.2.2 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP4 1.2.3.4/24 192.0.2.2 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP4 192.0.2.1 3232235777 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP4 \xef\xbc\x91.2.3.4 192.0.2.2 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 fe80::1%eth0 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 fe80::1%25 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 [::1] ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 ::1 [2001:db8::1] 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 2001:db8:::1 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 2001::db8::1 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 1:2:3:4:5:6:7 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 12345::1 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 :1:2:3:4:5:6:7 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 1:2:3:4:5:6:7: ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 ::1:2:3:4:5:6:7:8 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 g::1 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 ::ffff:01.2.3.4 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 ::ffff:1.2.3 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 1.2.3.4::1 ::1 25 25\r\n", InvalidAddressError),
    (b"PROXY TCP6 not-an-ip ::1 25 25\r\n", InvalidAddressError),
    # nginx's mixed families, without the opt-in.
    (b"PROXY TCP6 2001:db8::1 127.0.0.1 51234 25\r\n", DisallowedFamilyError),
    (b"PROXY TCP4 127.0.0.1 2001:db8::1 51234 25\r\n", DisallowedFamilyError),
    # Not v1 at all.
    (b"proxy TCP4 192.0.2.1 192.0.2.2 25 25\r\n", NotProxyHeaderError),
    (b"PROXY\tTCP4 192.0.2.1 192.0.2.2 25 25\r\n", NotProxyHeaderError),
    (b"PROXYTCP4 192.0.2.1 192.0.2.2 25 25\r\n", NotProxyHeaderError),
    (b"PROXY\r\n", NotProxyHeaderError),
    (b"POST / HTTP/1.1\r\n", NotProxyHeaderError),
]


@pytest.mark.parametrize(("data", "error"), JUNK)
def test_junk_is_rejected(data: bytes, error: type[ProxyProtocolError]) -> None:
    with pytest.raises(error) as caught:
        parse_header(data)
    assert type(caught.value) is error
    # A CRLF never makes a bad line good: the same holds with application data after it.
    with pytest.raises(error):
        parse_header(data + b"EHLO x\r\n")


@pytest.mark.parametrize(("data", "error"), JUNK)
def test_junk_is_rejected_before_its_crlf(data: bytes, error: type[ProxyProtocolError]) -> None:
    # Fed a byte at a time, the line raises no later than at its end, and never returns a
    # header; before the first bad byte, it waits.
    raised_at = None
    for size in range(1, len(data) + 1):
        try:
            result = parse_header(data[:size])
        except ProxyProtocolError:
            raised_at = size
            break
        assert result is None
    assert raised_at is not None


@pytest.mark.parametrize(
    ("prefix", "error"),
    [
        (b"PROXY TCP5", V1SyntaxError),
        (b"PROXY TCP4X", V1SyntaxError),
        (b"PROXY UNKNOWNX", V1SyntaxError),
        (b"PROXY tcp", V1SyntaxError),
        (b"PROXY TCP4 ", None),
        (b"PROXY TCP4 2", None),
        (b"PROXY TCP4 256", DisallowedFamilyError),  # only "256::..." could follow
        (b"PROXY TCP4 256.", InvalidAddressError),
        (b"PROXY TCP4 01", DisallowedFamilyError),  # only "01::..." could follow
        (b"PROXY TCP4 01.", InvalidAddressError),
        (b"PROXY TCP4 1.2.3.4.", InvalidAddressError),
        (b"PROXY TCP4 1.2.3.4 ", None),
        (b"PROXY TCP4 1.2.3.4  ", V1SyntaxError),
        (b"PROXY TCP4 2001:", DisallowedFamilyError),
        (b"PROXY TCP4 x", InvalidAddressError),
        (b"PROXY TCP6 fe80::1%", InvalidAddressError),
        (b"PROXY TCP6 [", InvalidAddressError),
        (b"PROXY TCP6 :::", InvalidAddressError),
        (b"PROXY TCP6 :1", InvalidAddressError),
        (b"PROXY TCP6 12345", InvalidAddressError),
        (b"PROXY TCP6 1::2::", InvalidAddressError),
        (b"PROXY TCP6 1:2:3:4:5:6:7:8:", InvalidAddressError),
        (b"PROXY TCP6 ::ffff:1.2.3.4.", InvalidAddressError),
        (b"PROXY TCP6 127.0.0.1", DisallowedFamilyError),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 0", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 00", InvalidPortError),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +", InvalidPortError),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536", InvalidPortError),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 6553", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", V1SyntaxError),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", V1SyntaxError),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", V1SyntaxError),
        (b"PROXY TCP4 1.2.3.4\r", None),
        (b"PROXY TCP4 1.2.3.4\rX", V1SyntaxError),
        (b"PROXY UNKNOWN whatever", None),
    ],
)
def test_incomplete_lines_are_judged_on_what_is_there(
    prefix: bytes, error: type[ProxyProtocolError] | None
) -> None:
    if error is None:
        assert parse_header(prefix) is None
    else:
        with pytest.raises(error):
            parse_header(prefix)


def test_mixed_family_error_names_the_flag() -> None:
    with pytest.raises(DisallowedFamilyError, match="allow_v1_mixed_family=True"):
        parse_header(b"PROXY TCP6 2001:db8::1 127.0.0.1 51234 25\r\n")


@pytest.mark.parametrize(
    ("data", "source", "destination", "family"),
    [
        (
            b"PROXY TCP6 2001:db8::1 127.0.0.1 51234 25\r\n",
            "2001:db8::1",
            "127.0.0.1",
            Family.INET6,
        ),
        (
            b"PROXY TCP6 127.0.0.1 2001:db8::1 51234 25\r\n",
            "127.0.0.1",
            "2001:db8::1",
            Family.INET6,
        ),
        (b"PROXY TCP4 127.0.0.1 2001:db8::1 51234 25\r\n", "127.0.0.1", "2001:db8::1", Family.INET),
        (b"PROXY TCP4 ::ffff:10.0.0.1 10.0.0.2 51234 25\r\n", "10.0.0.1", "10.0.0.2", Family.INET),
    ],
)
def test_mixed_family_with_the_opt_in(
    data: bytes, source: str, destination: str, family: Family
) -> None:
    header = three_ways(data, allow_v1_mixed_family=True)
    assert values(header) == tcp(source, destination, 51234, 25, family)


def test_mixed_family_opt_in_still_rejects_junk() -> None:
    with pytest.raises(InvalidAddressError):
        parse_header(b"PROXY TCP6 2001:db8::1 127.0.0.01 1 2\r\n", allow_v1_mixed_family=True)


def test_v4_mapped_kept_when_not_normalising() -> None:
    header = three_ways(b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n", normalize_v4_mapped=False)
    assert header.source == InetAddress(IPv6Address("::ffff:192.0.2.1"), 1)


def test_messages_name_the_field_and_value() -> None:
    with pytest.raises(InvalidPortError) as caught:
        parse_header(b"PROXY TCP4 192.0.2.1 192.0.2.2 +25 25\r\n")
    assert (
        str(caught.value) == "v1 source port '+25' is not a decimal 0-65535 without leading zeros"
    )
    assert caught.value.reason == "bad_port"
    with pytest.raises(InvalidAddressError, match=r"destination address '1\.2\.3'"):
        parse_header(b"PROXY TCP4 192.0.2.1 1.2.3 25 25\r\n")
    with pytest.raises(V1SyntaxError, match="'TCPfoo4'"):
        parse_header(b"PROXY TCPfoo4 1 2 3 4\r\n")
    with pytest.raises(V1SyntaxError, match="lone LF at offset 18"):
        parse_header(b"PROXY TCP4 192.0.2\n")


def test_long_values_are_truncated_in_messages() -> None:
    with pytest.raises(InvalidAddressError) as caught:
        parse_header(b"PROXY TCP6 " + b"a" * 90 + b" ::1 1 2\r\n")
    assert len(str(caught.value)) < 200


# --- IPv6 text, checked against the standard library on the forms both accept -------------


@given(st.ip_addresses(v=6))
def test_ipv6_text_forms_agree_with_ipaddress(ip: IPv6Address) -> None:
    forms = {str(ip), ip.exploded, ip.exploded.upper(), ip.compressed.upper()}
    low = int(ip) & 0xFFFFFFFF
    forms.add(f"{ip.exploded[:30]}{IPv4Address(low)}")
    for form in forms:
        assert ipv6_int(form.encode()) == int(ip), form


@given(st.ip_addresses(v=6), st.integers(0, 65535), st.integers(0, 65535))
def test_any_ipv6_parses(ip: IPv6Address, sport: int, dport: int) -> None:
    data = f"PROXY TCP6 {ip} {ip.exploded} {sport} {dport}\r\n".encode()
    result = parsed_values(data, normalize_v4_mapped=False)
    assert result == (tcp(str(ip), str(ip), sport, dport, Family.INET6), len(data))


@given(st.ip_addresses(v=4), st.ip_addresses(v=4), st.integers(0, 65535), st.integers(0, 65535))
def test_any_ipv4_parses(src: IPv4Address, dst: IPv4Address, sport: int, dport: int) -> None:
    data = f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()
    assert parsed_values(data) == (tcp(str(src), str(dst), sport, dport), len(data))


def _every_text_form(ip: IPv6Address) -> set[str]:
    """Every RFC 4291 text of ``ip``: "::" in place of each run of zero groups (or none),
    groups with and without leading zeros, lower and upper case, and the dotted-quad tail."""
    groups = [f"{int(ip) >> (112 - 16 * index) & 0xFFFF:x}" for index in range(8)]
    layouts = [groups]
    for start in range(8):
        for stop in range(start + 1, 9):
            if all(group == "0" for group in groups[start:stop]):
                layouts.append([*groups[:start], "", *groups[stop:]])
    forms = set()
    for layout in layouts:
        text = ":".join(layout)
        if layout[0] == "":
            text = ":" + text
        if layout[-1] == "":
            text += ":"
        padded = ":".join(group.zfill(4) if group else "" for group in text.split(":"))
        forms |= {text, text.upper(), padded}
    low = int(ip) & 0xFFFFFFFF
    forms.add(f"{ip.exploded[:30]}{IPv4Address(low)}")
    return forms


@given(st.ip_addresses(v=6))
def test_every_ipv6_text_form_reads_back_as_its_address(ip: IPv6Address) -> None:
    # Reading a v1 source turns the text into a value with no check (the parser has
    # checked it): every form the parser accepts must give the very same address.
    for form in _every_text_form(ip):
        for data, side in ((f"{form} ::1", 0), (f"::1 {form}", 1)):
            result = parse_header(f"PROXY TCP6 {data} 1 2\r\n".encode(), normalize_v4_mapped=False)
            assert result is not None, data
            endpoint = (result[0].source, result[0].destination)[side]
            assert isinstance(endpoint, InetAddress)
            assert type(endpoint.ip) is IPv6Address, data
            assert endpoint.ip == ip, data
            assert str(endpoint.ip) == str(ip), data


def test_every_compressed_position_reads_back() -> None:
    # "::" standing for 1 to 8 zero groups, at every position, next to groups of 1 to 4 digits.
    for start in range(8):
        for stop in range(start + 1, 9):
            value = 0
            for index in range(8):
                group = 0 if start <= index < stop else 0xF00D >> (4 * (index % 4))
                value = value << 16 | group
            ip = IPv6Address(value)
            for form in _every_text_form(ip):
                header = parse_header(f"PROXY TCP6 {form} ::1 1 2\r\n".encode())
                assert header is not None, form
                assert isinstance(header[0].source, InetAddress)
                assert header[0].source.ip == ip, form


@given(st.text(alphabet="0123456789abcdefABCDEF:.", max_size=45))
def test_ipv6_text_never_accepts_what_ipaddress_rejects(text: str) -> None:
    value = ipv6_int(text.encode())
    try:
        expected: int | None = int(IPv6Address(text))
    except ValueError:
        expected = None
    if value is not None:
        assert value == expected, text


# --- the fast path: one regular expression, and nothing built until asked for ---------------


@given(st.text(alphabet="0123456789abcdefABCDEF:.", max_size=46))
def test_the_fast_ipv6_grammar_is_exactly_what_ipaddress_accepts(text: str) -> None:
    # ipaddress is the reference here: FAST_LINE takes a TCP6 line without checking its
    # addresses any further, so its grammar must accept all of RFC 4291's text and nothing
    # else (zone ids and brackets are outside the alphabet, and outside both).
    try:
        IPv6Address(text)
    except ValueError:
        valid = False
    else:
        valid = True
    line = f"PROXY TCP6 {text} ::1 1 2\r\n".encode()
    assert (FAST_LINE.fullmatch(line) is not None) == valid, text
    line = f"PROXY TCP6 ::1 {text} 1 2\r\n".encode()
    assert (FAST_LINE.fullmatch(line) is not None) == valid, text


@given(st.ip_addresses(v=6))
def test_the_fast_ipv6_grammar_takes_every_form_of_every_address(ip: IPv6Address) -> None:
    low = int(ip) & 0xFFFFFFFF
    groups = ip.exploded.split(":")
    forms = {
        str(ip),
        ip.exploded,
        ip.exploded.upper(),
        ":".join(group.lstrip("0") or "0" for group in groups),
        ":".join(groups[:6]) + f":{IPv4Address(low)}",
    }
    for form in forms:
        line = f"PROXY TCP6 {form} {form} 1 2\r\n".encode()
        assert FAST_LINE.fullmatch(line) is not None, form


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_the_field_by_field_parser_agrees_on_every_valid_line(
    data: bytes, expected: Values
) -> None:
    # parse_header runs FAST_LINE first; parse_v1 must accept the same lines on its own.
    for normalize in (False, True):
        result = parse_v1(data, False, normalize)
        assert result is not None
        assert result == parse_header(data, normalize_v4_mapped=normalize)
    result = parse_v1(data, False, True)
    assert result is not None
    assert values(result[0]) == expected


v1_field = st.sampled_from(
    [
        b"192.0.2.1",
        b"0.0.0.0",
        b"255.255.255.255",
        b"256.1.1.1",
        b"01.2.3.4",
        b"::1",
        b"::",
        b"2001:db8::1",
        b"::ffff:1.2.3.4",
        b"1:2:3:4:5:6:7:8",
        b"1:2:3:4:5:6:1.2.3.4",
        b"1::2::3",
        b"fe80::1%eth0",
        b"0",
        b"65535",
        b"65536",
        b"025",
        b"",
    ]
)


@given(
    st.sampled_from([b"TCP4", b"TCP6"]),
    st.lists(v1_field, min_size=3, max_size=5),
    st.booleans(),
)
def test_fast_and_field_by_field_paths_agree(
    protocol: bytes, fields: list[bytes], mixed: bool
) -> None:
    data = b"PROXY " + b" ".join([protocol, *fields]) + b"\r\n"
    try:
        fast: object = parse_header(data, allow_v1_mixed_family=mixed)
    except ProxyProtocolError as error:
        fast = error.reason
    try:
        slow: object = parse_v1(data, mixed, True)
    except ProxyProtocolError as error:
        slow = error.reason
    assert fast == slow, data


def test_the_header_keeps_the_line_and_builds_its_addresses_once() -> None:
    data = b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::25 51234 25\r\nEHLO x\r\n"
    result = parse_header(data)
    assert result is not None
    header, consumed = result
    assert header.raw == data[:consumed]
    assert header.source is header.source  # built on first read, then kept
    assert header.destination == InetAddress(IPv6Address("2001:db8::25"), 25)
    assert header.source == InetAddress(IPv4Address("192.0.2.1"), 51234)


def test_headers_are_equal_when_bytes_and_normalisation_are() -> None:
    data = b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n"
    first = parse_header(data)
    again = parse_header(data + b"more")
    other = parse_header(data, normalize_v4_mapped=False)
    spelled = parse_header(b"PROXY TCP6 ::FFFF:192.0.2.1 ::1 1 2\r\n")
    assert first is not None and again is not None
    assert other is not None and spelled is not None
    assert first[0] == again[0]
    assert hash(first[0]) == hash(again[0])
    assert first[0] != other[0]  # read as ::ffff:192.0.2.1, not as 192.0.2.1
    assert first[0] != spelled[0]  # different bytes, though the same values
    assert values(first[0]) == values(spelled[0])


def test_the_fast_port_grammar_is_exactly_0_to_65535_without_leading_zeros() -> None:
    for number in range(100_000):
        for text in (str(number), f"0{number}", f"00{number}"):
            valid = text == str(int(text)) and int(text) <= 65535
            line = f"PROXY TCP4 1.2.3.4 5.6.7.8 {text} 25\r\n".encode()
            assert (FAST_LINE.fullmatch(line) is not None) == valid, text


def test_the_fast_octet_grammar_is_exactly_0_to_255_without_leading_zeros() -> None:
    for number in range(1000):
        for text in (str(number), f"0{number}"):
            valid = text == str(int(text)) and int(text) <= 255
            line = f"PROXY TCP4 1.2.3.{text} 5.6.7.8 1 25\r\n".encode()
            assert (FAST_LINE.fullmatch(line) is not None) == valid, text
            line = f"PROXY TCP6 ::ffff:1.2.3.{text} ::1 1 25\r\n".encode()
            assert (FAST_LINE.fullmatch(line) is not None) == valid, text


def test_the_longest_tcp6_line_is_over_the_107_byte_cap() -> None:
    """Two 45-character IPv6 addresses (an embedded IPv4 each) and 5-digit ports make a
    116-byte line that the grammar alone accepts: only the length cap refuses it, whatever
    path (the fast bytes one, or the field-by-field one) reads it."""
    widest = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
    assert len(widest) == 45
    line = f"PROXY TCP6 {widest} {widest} 65535 65535\r\n".encode()
    assert len(line) == 116
    for data in (line, bytearray(line), memoryview(line), line + b"EHLO x\r\n"):
        with pytest.raises(HeaderTooLongError):
            parse_header(data)
    # At the boundary: 107 bytes parse, 108 do not.
    fits = f"PROXY TCP6 {widest} ffff:ffff:ffff:ffff:ffff:fff:1.2.3.4 65535 65535\r\n".encode()
    over = f"PROXY TCP6 {widest} ffff:ffff:ffff:ffff:ffff:ffff:1.2.3.4 65535 65535\r\n".encode()
    assert (len(fits), len(over)) == (107, 108)
    assert parse_header(fits) is not None
    with pytest.raises(HeaderTooLongError):
        parse_header(over)
