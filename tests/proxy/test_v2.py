"""v2 (binary) headers: the fixed part, address blocks, policy, limits and real headers."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import google_crc32c
import pytest
from codec_support import three_ways, values

from mailedge.proxy import (
    DEFAULT_MAX_V2_LENGTH,
    TLV,
    V2_SIGNATURE,
    AddressBlockTooShortError,
    ChecksumError,
    Command,
    DisallowedFamilyError,
    Family,
    HeaderTooLongError,
    InetAddress,
    InvalidCommandError,
    InvalidFamilyError,
    InvalidTLVError,
    InvalidVersionError,
    NotProxyHeaderError,
    ProxyProtocolError,
    Transport,
    UnixAddress,
    encode_v2,
    parse_header,
)

BLOCK = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}
VALID_FAMILY_BYTES = {0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32}
INET4_BLOCK = bytes([192, 0, 2, 10, 198, 51, 100, 25]) + struct.pack("!HH", 51234, 25)
SOURCE4 = InetAddress(IPv4Address("192.0.2.10"), 51234)
DESTINATION4 = InetAddress(IPv4Address("198.51.100.25"), 25)


def v2(command_byte: int, family_byte: int, body: bytes = b"", length: int | None = None) -> bytes:
    """A v2 header written by hand: signature, bytes 12 and 13, length, body."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([command_byte, family_byte]) + struct.pack("!H", size) + body


def block_for(family_byte: int) -> bytes:
    return bytes(BLOCK.get(family_byte >> 4, 0))


def test_signature_constant() -> None:
    assert bytes.fromhex("0D0A0D0A000D0A515549540A") == V2_SIGNATURE


def test_tcp4() -> None:
    data = v2(0x21, 0x11, INET4_BLOCK)
    header = three_ways(data)
    assert values(header) == (
        2,
        Command.PROXY,
        Family.INET,
        Transport.STREAM,
        SOURCE4,
        DESTINATION4,
        (),
        None,
        False,
    )
    assert header.raw == data


def test_tcp6() -> None:
    source = IPv6Address("2001:db8:85a3::8a2e:370:7334")
    destination = IPv6Address("2001:db8::25")
    body = source.packed + destination.packed + struct.pack("!HH", 51234, 587)
    header = three_ways(v2(0x21, 0x21, body))
    assert header.family is Family.INET6
    assert header.source == InetAddress(source, 51234)
    assert header.destination == InetAddress(destination, 587)


def test_tcp6_v4_mapped_is_normalised_but_family_stays_inet6() -> None:
    mapped = IPv6Address("::ffff:192.0.2.10")
    body = mapped.packed + IPv6Address("::1").packed + struct.pack("!HH", 1, 2)
    header = three_ways(v2(0x21, 0x21, body))
    assert header.family is Family.INET6
    assert header.source == InetAddress(IPv4Address("192.0.2.10"), 1)
    assert header.destination == InetAddress(IPv6Address("::1"), 2)
    kept = three_ways(v2(0x21, 0x21, body), normalize_v4_mapped=False)
    assert kept.source == InetAddress(mapped, 1)


def test_v4_compatible_is_not_v4_mapped() -> None:
    compatible = IPv6Address("::192.0.2.10")
    header = three_ways(v2(0x21, 0x21, compatible.packed * 2 + bytes(4)))
    assert header.source == InetAddress(compatible, 0)


def test_unix_with_opt_in() -> None:
    source = b"/run/haproxy/client.sock".ljust(108, b"\0")
    destination = b"d" * 108  # exactly 108 bytes: no NUL at all
    header = three_ways(v2(0x21, 0x31, source + destination), allow_unix=True)
    assert header.family is Family.UNIX
    assert header.source == UnixAddress(b"/run/haproxy/client.sock")
    assert header.destination == UnixAddress(b"d" * 108)


def test_unix_path_stops_at_the_first_nul() -> None:
    source = b"/a\0garbage".ljust(108, b"\0")
    header = three_ways(v2(0x21, 0x31, source + bytes(108)), allow_unix=True)
    assert header.source == UnixAddress(b"/a")
    assert header.destination == UnixAddress(b"")


def test_dgram_with_opt_in() -> None:
    header = three_ways(v2(0x21, 0x12, INET4_BLOCK), allow_dgram=True)
    assert header.transport is Transport.DGRAM
    assert header.source == SOURCE4


def test_proxy_unspec_is_accepted_without_addresses() -> None:
    header = three_ways(v2(0x21, 0x00))
    assert values(header) == (
        2,
        Command.PROXY,
        Family.UNSPEC,
        Transport.UNSPEC,
        None,
        None,
        (),
        None,
        False,
    )


def test_proxy_unspec_skips_any_bytes_as_tlvs() -> None:
    header = three_ways(v2(0x21, 0x00, b"\x04\x00\x02ab"))
    assert header.source is None
    assert header.tlvs == (TLV(0x04, b"ab"),)


def test_local_ignores_the_addresses_and_is_consumed_exactly() -> None:
    data = v2(0x20, 0x11, INET4_BLOCK + b"\xe0\x00\x01x")
    header = three_ways(data)
    assert values(header) == (
        2,
        Command.LOCAL,
        Family.INET,
        Transport.STREAM,
        None,
        None,
        (TLV(0xE0, b"x"),),
        None,
        False,
    )
    assert header.raw == data  # the ignored addresses included


@pytest.mark.parametrize("family_byte", range(256))
def test_every_family_byte_under_proxy(family_byte: int) -> None:
    data = v2(0x21, family_byte, block_for(family_byte))
    if family_byte not in VALID_FAMILY_BYTES:
        expected: type[ProxyProtocolError] | None = InvalidFamilyError
    elif family_byte in (0x00, 0x11, 0x21):
        expected = None
    else:
        expected = DisallowedFamilyError  # AF_UNIX or DGRAM under PROXY
    if expected is None:
        result = parse_header(data)
        assert result is not None
        assert result[1] == len(data)
        assert result[0].family == family_byte >> 4
        assert result[0].transport == family_byte & 0xF
    else:
        with pytest.raises(expected):
            parse_header(data)
        # Known as soon as byte 13 is in: no waiting for the length or the block.
        with pytest.raises(expected):
            parse_header(data[:14])
    # With both opt-ins, exactly the seven valid values pass.
    if family_byte in VALID_FAMILY_BYTES:
        assert parse_header(data, allow_unix=True, allow_dgram=True) is not None
    else:
        with pytest.raises(InvalidFamilyError):
            parse_header(data, allow_unix=True, allow_dgram=True)


# The lengths a LOCAL header is tried with, for a family whose address block is ``block``
# bytes: none, one short, exactly the block, and the block followed by a NOOP TLV.
def _local_bodies(block: int) -> list[tuple[bytes, bool]]:
    """(body, whether the TLVs after a known family's block are read)."""
    noop = b"\x04\x00\x02ok"
    bodies = [(b"", block == 0), (bytes(block), True), (bytes(block) + noop, True)]
    if block:
        bodies.append((bytes(block - 1), False))
    return bodies


@pytest.mark.parametrize("family_byte", range(256))
def test_every_family_byte_under_local_is_ignored(family_byte: int) -> None:
    """Spec 2.2: for LOCAL the receiver uses the real endpoints and "discards the protocol
    block including the family which is ignored": no family byte and no length is an error."""
    known = family_byte in VALID_FAMILY_BYTES
    block = len(block_for(family_byte)) if known else 0
    # An unknown family byte's block is skipped whatever it holds.
    garbage = [] if known else [(b"\xff" * 7, False)]
    for body, readable in [*_local_bodies(block), *garbage]:
        data = v2(0x20, family_byte, body) + b"EHLO x\r\n"
        readable = readable and known
        for options in ({}, {"allow_unix": True, "allow_dgram": True}):
            result = parse_header(data, **options)
            assert result is not None, (family_byte, body)
            header, consumed = result
            assert consumed == 16 + len(body)
            assert header.command is Command.LOCAL
            assert header.source is None and header.destination is None
            if readable:
                assert (header.family, header.transport) == (family_byte >> 4, family_byte & 0xF)
                assert header.tlvs == ((TLV(0x04, b"ok"),) if body.endswith(b"ok") else ())
            else:
                assert (header.family, header.transport) == (Family.UNSPEC, Transport.UNSPEC)
                assert header.tlvs == ()
                assert header.crc32c_verified is False
        # Every strict prefix is "need more", never an error.
        for cut in range(len(data) - len(b"EHLO x\r\n")):
            assert parse_header(data[:cut]) is None, (family_byte, body, cut)


def test_local_still_checks_the_tlvs_after_a_known_block() -> None:
    """A CRC32C after a LOCAL header's block (HAProxy's checks send one) must match."""
    good = encode_v2(Command.LOCAL, crc32c=True)
    result = parse_header(good)
    assert result is not None and result[0].crc32c_verified
    bad = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(ChecksumError):
        parse_header(bad)
    with pytest.raises(InvalidTLVError):
        parse_header(v2(0x20, 0x11, bytes(12) + b"\x04\x00\x09ab"))


@pytest.mark.parametrize("command_byte", range(256))
def test_every_version_command_byte(command_byte: int) -> None:
    data = v2(command_byte, 0x11, INET4_BLOCK)
    if command_byte in (0x20, 0x21):
        result = parse_header(data)
        assert result is not None
        assert result[0].command == command_byte & 0xF
        return
    expected = InvalidVersionError if command_byte >> 4 != 2 else InvalidCommandError
    with pytest.raises(expected):
        parse_header(data)
    with pytest.raises(expected):
        parse_header(data[:13])  # as soon as byte 12 is in


def test_messages_name_the_byte() -> None:
    with pytest.raises(InvalidVersionError, match=r"version nibble 1 .*0x11"):
        parse_header(v2(0x11, 0x11))
    with pytest.raises(InvalidCommandError, match=r"command nibble 2 .*0x22"):
        parse_header(v2(0x22, 0x11))
    with pytest.raises(InvalidFamilyError, match="0x13"):
        parse_header(v2(0x21, 0x13))
    with pytest.raises(DisallowedFamilyError, match="allow_unix=True"):
        parse_header(v2(0x21, 0x31))
    with pytest.raises(DisallowedFamilyError, match="allow_dgram=True"):
        parse_header(v2(0x21, 0x22))


@pytest.mark.parametrize("position", range(12))
def test_signature_mismatch_at_every_position(position: int) -> None:
    data = bytearray(v2(0x21, 0x11, INET4_BLOCK))
    data[position] ^= 0x40
    if position == 0:
        # The first byte decides between v1, v2 and neither.
        with pytest.raises(NotProxyHeaderError):
            parse_header(bytes(data))
        return
    with pytest.raises(NotProxyHeaderError):
        parse_header(bytes(data))
    with pytest.raises(NotProxyHeaderError):
        parse_header(bytes(data[: position + 1]))  # as soon as the bad byte is in
    assert parse_header(bytes(data[:position])) is None


@pytest.mark.parametrize(
    ("family_byte", "block"), [(0x11, 12), (0x21, 36), (0x31, 216), (0x12, 12), (0x32, 216)]
)
def test_address_block_too_short_under_proxy(family_byte: int, block: int) -> None:
    options = {"allow_unix": True, "allow_dgram": True}
    data = v2(0x21, family_byte, bytes(block - 1))
    with pytest.raises(AddressBlockTooShortError, match=f"{block}-byte"):
        parse_header(data, **options)
    with pytest.raises(AddressBlockTooShortError):
        parse_header(data[:16], **options)  # known from the length alone
    assert parse_header(v2(0x21, family_byte, bytes(block)), **options) is not None


def test_length_cap_counts_the_whole_header() -> None:
    noop = 4096 - 16 - 12 - 3
    body = INET4_BLOCK + b"\x04" + struct.pack("!H", noop) + bytes(noop)
    exactly = v2(0x21, 0x11, body)
    assert len(exactly) == DEFAULT_MAX_V2_LENGTH
    result = parse_header(exactly)
    assert result is not None
    assert result[1] == DEFAULT_MAX_V2_LENGTH
    over = v2(0x21, 0x11, length=DEFAULT_MAX_V2_LENGTH - 16 + 1)
    assert len(over) == 16
    with pytest.raises(HeaderTooLongError, match="4097-byte header"):
        parse_header(over)
    assert parse_header(over[:15]) is None


def test_length_cap_is_configurable() -> None:
    data = v2(0x21, 0x11, INET4_BLOCK)
    assert parse_header(data, max_v2_length=28) is not None
    with pytest.raises(HeaderTooLongError):
        parse_header(data[:16], max_v2_length=27)
    huge = v2(0x21, 0x11, length=0xFFFF)
    with pytest.raises(HeaderTooLongError):
        parse_header(huge)
    assert parse_header(huge, max_v2_length=16 + 0xFFFF) is None  # waits: within the cap


def test_max_v2_length_below_the_fixed_part_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="max_v2_length"):
        parse_header(b"PROXY ", max_v2_length=15)


def test_strict_prefixes_wait_and_the_rest_is_untouched() -> None:
    data = v2(0x21, 0x11, INET4_BLOCK + b"\x01\x00\x02h2")
    for size in range(len(data)):
        assert parse_header(data[:size]) is None
    stream = data + b"\x16\x03\x01\x00\x05hello"
    result = parse_header(stream)
    assert result is not None
    assert stream[result[1] :] == b"\x16\x03\x01\x00\x05hello"


# --- real headers, written out byte for byte ------------------------------------------------


def splice_crc(zeroed: bytes, offset: int) -> bytes:
    """Put the CRC32C of ``zeroed`` (whose CRC value at ``offset`` is 0) in its place."""
    crc: int = google_crc32c.value(zeroed)
    return zeroed[:offset] + crc.to_bytes(4, "big") + zeroed[offset + 4 :]


# bytes.fromhex skips spaces, so each field is written apart.
HAPROXY_HEALTH_CHECK_ZEROED = bytes.fromhex(
    "0d0a0d0a000d0a515549540a"  # signature
    " 20"  # v2, LOCAL
    " 00"  # UNSPEC, UNSPEC
    " 0007"  # length 7: just the CRC32C TLV
    " 03 0004 00000000"  # CRC32C, its value zeroed
)


def test_haproxy_health_check_local_with_crc32c() -> None:
    data = splice_crc(HAPROXY_HEALTH_CHECK_ZEROED, 19)
    assert data != HAPROXY_HEALTH_CHECK_ZEROED
    header = three_ways(data)
    assert header.command is Command.LOCAL
    assert header.family is Family.UNSPEC
    assert header.source is None
    assert header.destination is None
    assert header.crc32c_verified is True
    assert header.tlvs == (TLV(0x03, data[19:23]),)


def test_haproxy_health_check_with_a_wrong_crc_is_rejected() -> None:
    from mailedge.proxy import ChecksumError

    data = bytearray(splice_crc(HAPROXY_HEALTH_CHECK_ZEROED, 19))
    data[22] ^= 0x01
    with pytest.raises(ChecksumError):
        parse_header(bytes(data))


AWS_VPCE_ID = b"vpce-0123456789abcdef0"
AWS_NLB_ZEROED = bytes.fromhex(
    "0d0a0d0a000d0a515549540a"  # signature
    " 21"  # v2, PROXY
    " 11"  # INET, STREAM
    " 0032"  # length 50 = 12 (addresses) + 7 (CRC32C) + 26 (0xEA) + 5 (NOOP)
    " c0000264"  # source 192.0.2.100
    " 0a000105"  # destination 10.0.1.5
    " d431"  # source port 54321
    " 0019"  # destination port 25
    " 03 0004 00000000"  # CRC32C, its value zeroed
    " ea 0017 01"  # AWS's TLV 0xEA, 23 bytes: subtype 0x01 (VPC endpoint id), then ASCII:
    " 7670 6365 2d30 3132 3334 3536 3738 3961 6263 6465 6630"  # "vpce-0123456789abcdef0"
    " 04 0002 0000"  # NOOP padding
)


def test_aws_nlb_header_with_crc32c_and_vpce_tlv() -> None:
    assert len(AWS_NLB_ZEROED) == 16 + 0x32
    data = splice_crc(AWS_NLB_ZEROED, 31)
    header = three_ways(data)
    assert header.command is Command.PROXY
    assert header.source == InetAddress(IPv4Address("192.0.2.100"), 54321)
    assert header.destination == InetAddress(IPv4Address("10.0.1.5"), 25)
    assert header.crc32c_verified is True
    assert header.tlvs == (
        TLV(0x03, data[31:35]),
        TLV(0xEA, b"\x01" + AWS_VPCE_ID),
        TLV(0x04, b"\x00\x00"),
    )
    vpce = header.tlvs[1].value
    assert vpce[0] == 0x01
    assert vpce[1:].decode("ascii") == "vpce-0123456789abcdef0"
