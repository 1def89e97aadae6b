"""The encoders, and encode -> parse round trips for generated headers."""

from __future__ import annotations

import string
import struct
from ipaddress import IPv4Address, IPv6Address

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailedge.proxy import (
    TLV,
    V2_SIGNATURE,
    Address,
    ClientFlags,
    Command,
    DisallowedFamilyError,
    Family,
    InetAddress,
    SSLInfo,
    SSLSubType,
    TLVType,
    Transport,
    UnixAddress,
    encode_v1,
    encode_v2,
    parse_header,
)
from mailedge.proxy.encoder import ssl_value

SOURCE4 = InetAddress(IPv4Address("192.0.2.10"), 51234)
DESTINATION4 = InetAddress(IPv4Address("198.51.100.25"), 25)
SOURCE6 = InetAddress(IPv6Address("2001:db8::10"), 51234)
DESTINATION6 = InetAddress(IPv6Address("2001:db8::25"), 587)
OPTIONS = {"allow_unix": True, "allow_dgram": True, "normalize_v4_mapped": False}

# --- strategies -------------------------------------------------------------------------------

ports = st.integers(0, 65535)
inet4 = st.builds(InetAddress, st.ip_addresses(v=4), ports)
inet6 = st.builds(InetAddress, st.ip_addresses(v=6), ports)
unix = st.builds(UnixAddress, st.binary(max_size=108).map(lambda path: path.replace(b"\0", b"_")))
address_pairs: st.SearchStrategy[tuple[Address | None, Address | None]] = st.one_of(
    st.just((None, None)),
    st.tuples(inet4, inet4),
    st.tuples(inet6, inet6),
    st.tuples(unix, unix),
)
RULED_TYPES = {0x02, 0x03, 0x05, 0x20, 0x30}
tlvs = st.one_of(
    st.builds(TLV, st.just(0x01), st.binary(max_size=16)),
    st.builds(TLV, st.just(0x02), st.text(max_size=16).map(str.encode)),
    st.builds(TLV, st.just(0x04), st.binary(max_size=8)),
    st.builds(TLV, st.just(0x05), st.binary(max_size=128)),
    st.builds(TLV, st.just(0x30), st.text(string.printable, max_size=8).map(str.encode)),
    st.builds(
        TLV,
        st.integers(0, 255).filter(lambda type_: type_ not in RULED_TYPES),
        st.binary(max_size=16),
    ),
)
texts = st.none() | st.text(max_size=12)


@st.composite
def ssl_infos(draw: st.DrawFn) -> SSLInfo:
    client = draw(st.integers(0, 255))
    version = draw(texts)
    if client & ClientFlags.SSL and version is None:
        version = "TLSv1.3"
    return SSLInfo(
        ClientFlags(client),
        draw(st.integers(0, 2**32 - 1)),
        version,
        draw(texts),
        draw(texts),
        draw(texts),
        draw(texts),
        draw(texts),
        draw(texts),
        draw(st.none() | st.binary(max_size=40)),
    )


# --- v1 ---------------------------------------------------------------------------------------


def test_encode_v1() -> None:
    assert encode_v1() == b"PROXY UNKNOWN\r\n"
    assert encode_v1(SOURCE4, DESTINATION4) == b"PROXY TCP4 192.0.2.10 198.51.100.25 51234 25\r\n"
    assert encode_v1(SOURCE6, DESTINATION6) == b"PROXY TCP6 2001:db8::10 2001:db8::25 51234 587\r\n"


def test_encode_v1_misuse() -> None:
    with pytest.raises(ValueError, match="both"):
        encode_v1(SOURCE4)
    with pytest.raises(ValueError, match="differ in family"):
        encode_v1(SOURCE4, DESTINATION6)
    with pytest.raises(ValueError, match="port 65536"):
        encode_v1(SOURCE4, InetAddress(IPv4Address("192.0.2.1"), 65536))
    with pytest.raises(ValueError, match="zone id"):
        encode_v1(InetAddress(IPv6Address("fe80::1%eth0"), 1), DESTINATION6)
    with pytest.raises(TypeError):
        encode_v1(UnixAddress(b"/a"), UnixAddress(b"/b"))  # type: ignore[arg-type]


def test_encode_v1_writes_haproxy_mixed_families_with_family_inet6() -> None:
    client = InetAddress(IPv4Address("203.0.113.7"), 40000)
    server = InetAddress(IPv6Address("2001:db8::1"), 25)
    data = encode_v1(client, server, family=Family.INET6)
    assert data == b"PROXY TCP6 ::ffff:203.0.113.7 2001:db8::1 40000 25\r\n"
    assert encode_v1(server, client, family=Family.INET6) == (
        b"PROXY TCP6 2001:db8::1 ::ffff:203.0.113.7 25 40000\r\n"
    )
    # A strict receiver takes it, and reads the IPv4 address back as IPv4.
    result = parse_header(data)
    assert result is not None
    assert (result[0].family, result[0].source, result[0].destination) == (
        Family.INET6,
        client,
        server,
    )
    # Two IPv4 addresses under TCP6 are both written v4-mapped.
    assert encode_v1(SOURCE4, DESTINATION4, family=Family.INET6) == (
        b"PROXY TCP6 ::ffff:192.0.2.10 ::ffff:198.51.100.25 51234 25\r\n"
    )
    # The family a pair of one family implies changes nothing.
    assert encode_v1(SOURCE4, DESTINATION4, family=Family.INET) == encode_v1(SOURCE4, DESTINATION4)
    assert encode_v1(SOURCE6, DESTINATION6, family=Family.INET6) == encode_v1(SOURCE6, DESTINATION6)
    assert encode_v1(family=Family.UNSPEC) == b"PROXY UNKNOWN\r\n"


def _probe_v1_mixed(client: InetAddress, server: InetAddress) -> bytes:
    """What mailedge.probe wrote for a mixed pair before it used encode_v1 (its own code)."""

    def text(ip: IPv4Address | IPv6Address) -> str:
        return f"::ffff:{ip}" if ip.version == 4 else str(ip)

    line = f"PROXY TCP6 {text(client.ip)} {text(server.ip)} {client.port} {server.port}\r\n"
    return line.encode("ascii")


@given(st.one_of(st.tuples(inet4, inet6), st.tuples(inet6, inet4)))
def test_encode_v1_family_inet6_is_what_the_probe_wrote_for_mixed_pairs(
    pair: tuple[InetAddress, InetAddress],
) -> None:
    client, server = pair
    assert encode_v1(client, server, family=Family.INET6) == _probe_v1_mixed(client, server)


def test_encode_v1_writes_nginx_mixed_families_with_mixed() -> None:
    assert encode_v1(SOURCE4, DESTINATION6, family=Family.INET6, mixed=True) == (
        b"PROXY TCP6 192.0.2.10 2001:db8::25 51234 587\r\n"
    )
    data = encode_v1(SOURCE6, DESTINATION4, family=Family.INET, mixed=True)
    assert data == b"PROXY TCP4 2001:db8::10 198.51.100.25 51234 25\r\n"
    # Receivers take nginx's form only when they allow mixed families.
    with pytest.raises(DisallowedFamilyError):
        parse_header(data)
    result = parse_header(data, allow_v1_mixed_family=True)
    assert result is not None
    assert (result[0].source, result[0].destination) == (SOURCE6, DESTINATION4)
    # For a pair of the line's own family, mixed changes nothing.
    assert encode_v1(SOURCE4, DESTINATION4, family=Family.INET, mixed=True) == encode_v1(
        SOURCE4, DESTINATION4
    )


def test_encode_v1_family_misuse() -> None:
    with pytest.raises(ValueError, match="mixed=True"):
        encode_v1(SOURCE6, DESTINATION4, family=Family.INET)
    with pytest.raises(ValueError, match="needs the line's family"):
        encode_v1(SOURCE4, DESTINATION6, mixed=True)
    with pytest.raises(ValueError, match="no UNIX form"):
        encode_v1(SOURCE4, DESTINATION4, family=Family.UNIX)
    with pytest.raises(ValueError, match="no UNSPEC form"):
        encode_v1(SOURCE4, DESTINATION4, family=Family.UNSPEC)
    with pytest.raises(ValueError, match="needs a source"):
        encode_v1(family=Family.INET6)
    with pytest.raises(ValueError, match="zone id"):
        encode_v1(SOURCE4, InetAddress(IPv6Address("fe80::1%eth0"), 1), family=Family.INET6)


@given(st.one_of(st.just((None, None)), st.tuples(inet4, inet4), st.tuples(inet6, inet6)))
def test_v1_round_trip(pair: tuple[InetAddress | None, InetAddress | None]) -> None:
    source, destination = pair
    data = encode_v1(source, destination)
    family = (
        Family.UNSPEC
        if source is None
        else (Family.INET if source.ip.version == 4 else Family.INET6)
    )
    result = parse_header(data, normalize_v4_mapped=False)
    assert result is not None
    header, consumed = result
    assert consumed == len(data)
    assert header.raw == data
    assert (header.version, header.command, header.family, header.transport) == (
        1,
        Command.PROXY,
        family,
        Transport.STREAM,
    )
    assert (header.source, header.destination) == (source, destination)
    assert (header.tlvs, header.ssl, header.crc32c_verified) == ((), None, False)
    for size in range(len(data)):
        assert parse_header(data[:size]) is None
    normalised, _ = parse_header(data + b"EHLO x\r\n") or (None, 0)
    assert normalised is not None
    if isinstance(source, InetAddress) and isinstance(source.ip, IPv6Address):
        mapped = source.ip.ipv4_mapped
        assert normalised.source == InetAddress(mapped or source.ip, source.port)


# --- v2 ---------------------------------------------------------------------------------------


def test_encode_v2_local_is_the_health_check_form() -> None:
    assert encode_v2(Command.LOCAL) == V2_SIGNATURE + b"\x20\x00\x00\x00"


def test_encode_v2_tcp4_bytes() -> None:
    assert encode_v2(Command.PROXY, SOURCE4, DESTINATION4) == (
        V2_SIGNATURE + bytes.fromhex("2111000cc000020ac6336419c8220019")
    )


@pytest.mark.parametrize(
    ("source", "destination", "family_byte"),
    [
        (None, None, 0x00),
        (SOURCE4, DESTINATION4, 0x11),
        (SOURCE6, DESTINATION6, 0x21),
        (UnixAddress(b"/a"), UnixAddress(b"/b"), 0x31),
    ],
)
@pytest.mark.parametrize("command", [Command.LOCAL, Command.PROXY])
def test_encode_v2_all_families(
    command: Command, source: Address | None, destination: Address | None, family_byte: int
) -> None:
    data = encode_v2(command, source, destination)
    assert data[12] == 0x20 | command
    assert data[13] == family_byte
    result = parse_header(data, allow_unix=True)
    assert result is not None
    header, consumed = result
    assert consumed == len(data)
    assert header.family == family_byte >> 4
    if command is Command.PROXY:
        assert (header.source, header.destination) == (source, destination)
    else:
        assert (header.source, header.destination) == (None, None)


def test_encode_v2_dgram() -> None:
    data = encode_v2(Command.PROXY, SOURCE4, DESTINATION4, transport=Transport.DGRAM)
    assert data[13] == 0x12


def test_encode_v2_writes_ipv4_v4_mapped_under_inet6() -> None:
    data = encode_v2(Command.PROXY, SOURCE4, DESTINATION6, family=Family.INET6)
    assert data[13] == 0x21
    assert data[16:32] == IPv6Address("::ffff:192.0.2.10").packed
    result = parse_header(data)
    assert result is not None
    assert result[0].source == SOURCE4  # normalised back
    assert result[0].family is Family.INET6


def test_encode_v2_keeps_the_tlv_order_and_appends_ssl_then_crc() -> None:
    given_tlvs = [TLV(0xEA, b"\x01vpce-1"), TLV(TLVType.ALPN, b"smtp"), TLV(TLVType.NOOP, b"")]
    ssl = SSLInfo(ClientFlags.SSL, 0, version="TLSv1.3")
    data = encode_v2(Command.PROXY, SOURCE4, DESTINATION4, tlvs=given_tlvs, ssl=ssl, crc32c=True)
    result = parse_header(data)
    assert result is not None
    header = result[0]
    assert [tlv.type for tlv in header.tlvs] == [0xEA, 0x01, 0x04, 0x20, 0x03]
    assert header.tlvs[:3] == tuple(given_tlvs)
    assert header.crc32c_verified
    assert header.ssl == SSLInfo(
        ClientFlags.SSL, 0, version="TLSv1.3", tlvs=(TLV(0x21, b"TLSv1.3"),)
    )


def test_ssl_sub_tlvs_from_the_named_fields_in_sub_type_order() -> None:
    ssl = SSLInfo(
        ClientFlags.SSL | ClientFlags.CERT_CONN,
        0,
        version="TLSv1.3",
        cn="c",
        cipher="x",
        sig_alg="s",
        key_alg="k",
        group="g",
        sig_scheme="ss",
        client_cert=b"\x30\x00",
    )
    value = ssl_value(ssl)
    assert value[:5] == b"\x03\x00\x00\x00\x00"
    result = parse_header(encode_v2(Command.PROXY, SOURCE4, DESTINATION4, ssl=ssl))
    assert result is not None
    parsed = result[0].ssl
    assert parsed is not None
    assert [sub.type for sub in parsed.tlvs] == list(SSLSubType)
    assert attrs.evolve(parsed, tlvs=()) == ssl


def test_ssl_tlvs_when_given_are_written_verbatim() -> None:
    raw = (TLV(0x22, b"cn-first"), TLV(0x21, b"TLSv1.2"), TLV(0x7F, b"opaque"))
    ssl = SSLInfo(ClientFlags.SSL, 5, version="ignored", tlvs=raw)
    assert ssl_value(ssl) == b"\x01\x00\x00\x00\x05" + b"".join(
        struct.pack("!BH", sub.type, len(sub.value)) + sub.value for sub in raw
    )
    result = parse_header(encode_v2(Command.PROXY, SOURCE4, DESTINATION4, ssl=ssl))
    assert result is not None
    parsed = result[0].ssl
    assert parsed is not None
    assert parsed.tlvs == raw
    assert (parsed.version, parsed.cn, parsed.verify) == ("TLSv1.2", "cn-first", 5)


def test_crc32c_verifies_with_local_too() -> None:
    data = encode_v2(Command.LOCAL, crc32c=True)
    assert len(data) == 16 + 7
    result = parse_header(data)
    assert result is not None
    assert result[0].crc32c_verified


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"source": SOURCE4}, ValueError, "both source and destination"),
        ({"source": SOURCE4, "destination": DESTINATION6}, ValueError, "family=Family.INET6"),
        ({"source": SOURCE4, "destination": UnixAddress(b"/a")}, TypeError, "Inet or both Unix"),
        ({"family": Family.INET}, ValueError, "needs a source"),
        (
            {"source": SOURCE4, "destination": DESTINATION4, "family": Family.UNSPEC},
            ValueError,
            "no addresses",
        ),
        (
            {"source": SOURCE6, "destination": DESTINATION6, "family": Family.INET},
            ValueError,
            "does not fit",
        ),
        (
            {"source": SOURCE4, "destination": DESTINATION4, "transport": Transport.UNSPEC},
            ValueError,
            "STREAM or DGRAM",
        ),
        (
            {"source": UnixAddress(b"x" * 109), "destination": UnixAddress(b"/b")},
            ValueError,
            "over 108",
        ),
        ({"source": UnixAddress(b"/a\0b"), "destination": UnixAddress(b"/b")}, ValueError, "NUL"),
        ({"tlvs": [TLV(0x100, b"")]}, ValueError, "one byte"),
        ({"tlvs": [TLV(0xE0, bytes(65536))]}, ValueError, "over 65535"),
        ({"tlvs": [TLV(0xE0, bytes(40000)), TLV(0xE1, bytes(40000))]}, ValueError, "length holds"),
        ({"tlvs": [TLV(0x20, b"")], "ssl": SSLInfo(ClientFlags(0), 0)}, ValueError, "one"),
        ({"tlvs": [TLV(0x03, bytes(4))], "crc32c": True}, ValueError, "one"),
        ({"ssl": SSLInfo(ClientFlags(0), 2**32)}, ValueError, "4 bytes"),
    ],
)
def test_encode_v2_misuse(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        encode_v2(Command.PROXY, **kwargs)  # type: ignore[arg-type]


@given(
    st.sampled_from(Command),
    address_pairs,
    st.sampled_from([Transport.STREAM, Transport.DGRAM]),
    st.lists(tlvs, max_size=4),
    st.none() | ssl_infos(),
    st.booleans(),
)
def test_v2_round_trip(
    command: Command,
    pair: tuple[Address | None, Address | None],
    transport: Transport,
    tlv_list: list[TLV],
    ssl: SSLInfo | None,
    crc32c: bool,
) -> None:
    source, destination = pair
    data = encode_v2(
        command, source, destination, transport=transport, tlvs=tlv_list, ssl=ssl, crc32c=crc32c
    )
    result = parse_header(data + b"\x16\x03\x01", **OPTIONS)
    assert result is not None
    header, consumed = result
    assert consumed == len(data)
    if source is None:
        family, wire_transport = Family.UNSPEC, Transport.UNSPEC
    else:
        family = (
            Family.UNIX
            if isinstance(source, UnixAddress)
            else (Family.INET if source.ip.version == 4 else Family.INET6)
        )
        wire_transport = transport
    proxied = command is Command.PROXY and family is not Family.UNSPEC
    assert header.version == 2
    assert header.command is command
    assert header.family is family
    assert header.transport is wire_transport
    assert (header.source, header.destination) == (
        (source, destination) if proxied else (None, None)
    )
    extra = ([TLV(0x20, ssl_value(ssl))] if ssl is not None else []) + (
        [TLV(0x03, data[-4:])] if crc32c else []
    )
    assert header.tlvs == (*tlv_list, *extra)
    assert header.crc32c_verified is crc32c
    if ssl is None:
        assert header.ssl is None
    else:
        assert header.ssl is not None
        assert attrs.evolve(header.ssl, tlvs=()) == ssl
    for size in range(len(data)):
        assert parse_header(data[:size], **OPTIONS) is None
    # Re-encoding the parsed header gives the very same bytes.
    again = encode_v2(
        header.command,
        source,
        destination,
        transport=transport,
        tlvs=[tlv for tlv in header.tlvs if tlv.type not in (0x03, 0x20)],
        ssl=header.ssl,
        crc32c=header.crc32c_verified,
    )
    assert again == data
