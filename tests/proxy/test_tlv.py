"""v2 TLVs: walking, per-type rules, the SSL TLV, CRC32C, and early rejection."""

from __future__ import annotations

import struct

import google_crc32c
import pytest
from codec_support import three_ways
from hypothesis import given
from hypothesis import strategies as st

from mailedge.proxy import (
    TLV,
    V2_SIGNATURE,
    ChecksumError,
    ClientFlags,
    InvalidTLVError,
    ProxyProtocolError,
    SSLInfo,
    SSLSubType,
    SSLTLVError,
    TLVType,
    parse_header,
)
from mailedge.proxy._tlv import check_tlvs, crc32c_of, first_problem

INET4_BLOCK = bytes([192, 0, 2, 10, 198, 51, 100, 25]) + struct.pack("!HH", 51234, 25)
CHECKED_TYPES = {0x02, 0x03, 0x05, 0x20, 0x30}


def tlv(type_: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack("!BH", type_, len(value) if length is None else length) + value


def header(tlvs: bytes, length: int | None = None) -> bytes:
    """PROXY TCP4 with the given raw TLV bytes after the address block."""
    body = INET4_BLOCK + tlvs
    size = len(body) if length is None else length
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", size) + body


def with_crc(before: bytes, after: bytes = b"") -> bytes:
    """A header whose TLVs are ``before``, a CRC32C TLV, then ``after``; the CRC is right."""
    zeroed = header(before + tlv(0x03, bytes(4)) + after)
    offset = 16 + 12 + len(before) + 3
    crc: int = google_crc32c.value(zeroed)  # over the zeroed form, computed independently
    return zeroed[:offset] + crc.to_bytes(4, "big") + zeroed[offset + 4 :]


def ssl_value(client: int, verify: int, subs: bytes = b"") -> bytes:
    return struct.pack("!BI", client, verify) + subs


# --- walking --------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", sorted(set(range(256)) - CHECKED_TYPES))
def test_types_without_rules_are_kept_raw(type_: int) -> None:
    value = b"\xff\xfe\x00 any bytes"
    parsed = three_ways(header(tlv(type_, value) + tlv(type_, b"")))
    assert parsed.tlvs == (TLV(type_, value), TLV(type_, b""))


def test_tlvs_are_kept_in_wire_order() -> None:
    raw = (
        tlv(0xEF, b"custom") + tlv(0x01, b"h2") + tlv(0x04, b"") + tlv(0xF8, b"r") + tlv(0x01, b"x")
    )
    parsed = three_ways(header(raw))
    assert [t.type for t in parsed.tlvs] == [0xEF, 0x01, 0x04, 0xF8, 0x01]
    assert parsed.alpn == b"h2"  # the first of a type


@pytest.mark.parametrize("leftover", [b"\x01", b"\x01\x00"])
def test_a_cut_short_tlv_header_is_rejected(leftover: bytes) -> None:
    with pytest.raises(InvalidTLVError, match="cut short"):
        parse_header(header(tlv(0x01, b"h2") + leftover))


def test_a_tlv_that_overruns_the_header_is_rejected() -> None:
    data = header(tlv(0x01, b"h2", length=3))
    with pytest.raises(InvalidTLVError, match=r"ALPN TLV .*claims 3 bytes but only 2"):
        parse_header(data)
    with pytest.raises(InvalidTLVError):
        parse_header(data + b"EHLO x\r\n")  # bytes after the header do not count


def test_an_overrun_is_rejected_before_the_rest_arrives() -> None:
    data = header(tlv(0xE0, b"", length=500), length=12 + 3 + 100)
    assert len(data) == 31
    with pytest.raises(InvalidTLVError):
        parse_header(data)


# --- per-type rules ---------------------------------------------------------------------------


def test_authority_must_be_utf8() -> None:
    parsed = three_ways(header(tlv(0x02, "bücher.example".encode())))
    assert parsed.authority == "bücher.example"
    with pytest.raises(InvalidTLVError, match="AUTHORITY"):
        parse_header(header(tlv(0x02, b"mail.\xff.example")))


def test_netns_must_be_ascii() -> None:
    assert three_ways(header(tlv(0x30, b"blue"))).netns == "blue"
    with pytest.raises(InvalidTLVError, match="NETNS"):
        parse_header(header(tlv(0x30, "grün".encode())))


@pytest.mark.parametrize(
    ("size", "valid"), [(0, True), (1, True), (128, True), (129, False), (4000, False)]
)
def test_unique_id_length(size: int, valid: bool) -> None:
    data = header(tlv(0x05, b"u" * size))
    if valid:
        result = parse_header(data)
        assert result is not None
        assert result[0].unique_id == b"u" * size
    else:
        with pytest.raises(InvalidTLVError, match=f"UNIQUE_ID TLV length {size}"):
            parse_header(data)
        # Known from the TLV's own header, before its value arrives.
        with pytest.raises(InvalidTLVError):
            parse_header(data[: 16 + 12 + 3])


def test_noop_is_ignored_but_kept() -> None:
    parsed = three_ways(header(tlv(0x04, bytes(10)) + tlv(0x01, b"smtp")))
    assert parsed.alpn == b"smtp"
    assert parsed.tlvs[0] == TLV(TLVType.NOOP, bytes(10))


# --- CRC32C -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"", b""),
        (b"", tlv(0x01, b"h2") + tlv(0xEA, b"\x01vpce-1")),
        (tlv(0x05, b"id") + tlv(0x01, b"h2"), b""),
        # Deliberately not in type order: computed as received, never re-sorted.
        (tlv(0xEA, b"z") + tlv(0x20, ssl_value(0, 0)), tlv(0x02, b"a.example") + tlv(0x01, b"x")),
    ],
)
def test_crc32c_anywhere_is_verified(before: bytes, after: bytes) -> None:
    parsed = three_ways(with_crc(before, after))
    assert parsed.crc32c_verified is True


def test_crc32c_verified_is_false_without_a_crc_tlv() -> None:
    assert three_ways(header(tlv(0x01, b"h2"))).crc32c_verified is False


def test_crc32c_mismatch_names_both_values() -> None:
    data = bytearray(with_crc(tlv(0x01, b"h2")))
    data[-1] ^= 0x80
    with pytest.raises(ChecksumError, match=r"0x[0-9a-f]{8} does not match .* 0x[0-9a-f]{8}"):
        parse_header(bytes(data))


def test_no_single_bit_flip_of_a_crc_header_is_accepted() -> None:
    data = with_crc(tlv(0x01, b"h2"), tlv(0xE5, b"value"))
    crc_type_at = 16 + 12 + 5
    for index in range(len(data)):
        for bit in range(8):
            corrupt = bytearray(data)
            corrupt[index] ^= 1 << bit
            try:
                result = parse_header(bytes(corrupt), allow_unix=True, allow_dgram=True)
            except ProxyProtocolError:
                continue
            if result is None:
                continue  # a longer length just waits for more bytes
            # Only turning the CRC32C TLV into another type gets through, and then the
            # header says, truthfully, that no checksum was verified.
            assert index == crc_type_at, (index, bit)
            assert result[0].crc32c_verified is False


@pytest.mark.parametrize("size", [0, 3, 5, 8])
def test_crc32c_value_must_be_4_bytes(size: int) -> None:
    data = header(tlv(0x03, bytes(size)))
    with pytest.raises(InvalidTLVError, match=f"CRC32C TLV length {size}"):
        parse_header(data)
    with pytest.raises(InvalidTLVError):
        parse_header(data[: 16 + 12 + 3])  # from the TLV header alone


def test_two_crc32c_tlvs_are_rejected() -> None:
    data = header(tlv(0x03, bytes(4)) + tlv(0x03, bytes(4)))
    with pytest.raises(InvalidTLVError, match="second CRC32C"):
        parse_header(data)
    with pytest.raises(InvalidTLVError, match="second CRC32C"):
        parse_header(data[:-4])


def test_crc32c_of_matches_a_direct_computation() -> None:
    data = with_crc(tlv(0x01, b"h2"))
    offset = 16 + 12 + 3
    zeroed = data[:offset] + bytes(4) + data[offset + 4 :]
    assert crc32c_of(data + b"trailing", offset, len(data)) == google_crc32c.value(zeroed)


# --- SSL ----------------------------------------------------------------------------------------


def ssl_subs(*pairs: tuple[int, bytes]) -> bytes:
    return b"".join(tlv(type_, value) for type_, value in pairs)


def test_ssl_as_haproxy_sends_it() -> None:
    subs = ssl_subs(
        (0x21, b"TLSv1.3"),
        (0x22, b"client.example.org"),
        (0x25, b"RSA2048"),
        (0x24, b"SHA256"),
        (0x23, b"TLS_AES_256_GCM_SHA384"),
    )
    parsed = three_ways(
        header(tlv(0x02, b"mail.example.com") + tlv(0x20, ssl_value(0x07, 0, subs)))
    )
    ssl = parsed.ssl
    assert ssl is not None
    assert ssl.client == ClientFlags.SSL | ClientFlags.CERT_CONN | ClientFlags.CERT_SESS
    assert ssl.client_ssl
    assert ssl.verified
    assert ssl.verify == 0
    assert (ssl.version, ssl.cn, ssl.cipher, ssl.sig_alg, ssl.key_alg) == (
        "TLSv1.3",
        "client.example.org",
        "TLS_AES_256_GCM_SHA384",
        "SHA256",
        "RSA2048",
    )
    assert ssl.group is None
    assert ssl.sig_scheme is None
    assert ssl.client_cert is None
    assert [sub.type for sub in ssl.tlvs] == [0x21, 0x22, 0x25, 0x24, 0x23]
    assert parsed.authority == "mail.example.com"


def test_ssl_newer_sub_types_and_the_certificate() -> None:
    der = b"\x30\x82\x01\x0a" + bytes(range(256))
    subs = ssl_subs(
        (0x21, b"TLSv1.3"), (0x26, b"X25519"), (0x27, b"ecdsa_secp256r1_sha256"), (0x28, der)
    )
    ssl = three_ways(header(tlv(0x20, ssl_value(0x03, 0, subs)))).ssl
    assert ssl is not None
    assert ssl.group == "X25519"
    assert ssl.sig_scheme == "ecdsa_secp256r1_sha256"
    assert ssl.client_cert == der


def test_plaintext_frontend_ssl_tlv_is_not_tls() -> None:
    # HAProxy's send-proxy-v2-ssl on a plaintext frontend: client 0, verify 0, no sub-TLVs.
    ssl = three_ways(header(tlv(0x20, ssl_value(0x00, 0)))).ssl
    assert ssl == SSLInfo(ClientFlags(0), 0)
    assert not ssl.client_ssl
    assert not ssl.verified  # verify 0 means nothing without a certificate


def test_ssl_without_certificate_is_not_verified() -> None:
    ssl = three_ways(header(tlv(0x20, ssl_value(0x01, 0, ssl_subs((0x21, b"TLSv1.2")))))).ssl
    assert ssl is not None
    assert ssl.client_ssl
    assert not ssl.cert_presented
    assert not ssl.verified


def test_ssl_keeps_unknown_client_bits_and_sub_tlvs() -> None:
    subs = ssl_subs(
        (0x21, b"TLSv1.3"), (0x29, b"future"), (0x21, b"TLSv1.0"), (0x22, b"\xff raw"[:0])
    )
    ssl = three_ways(header(tlv(0x20, ssl_value(0xF9, 0xDEADBEEF, subs)))).ssl
    assert ssl is not None
    assert int(ssl.client) == 0xF9
    assert ssl.client & ClientFlags.SSL
    assert ssl.verify == 0xDEADBEEF
    assert ssl.version == "TLSv1.3"  # the first of a sub-type wins
    assert ssl.cn == ""
    assert ssl.tlvs[1] == TLV(0x29, b"future")


@pytest.mark.parametrize("size", range(5))
def test_ssl_value_shorter_than_client_and_verify(size: int) -> None:
    # aiosmtpd raises IndexError on an empty SSL TLV; this is our own error.
    data = header(tlv(0x20, b"\x01" * size))
    with pytest.raises(SSLTLVError, match=f"SSL TLV length {size}"):
        parse_header(data)
    with pytest.raises(SSLTLVError):
        parse_header(data[: 16 + 12 + 3])  # from the length alone


def test_ssl_client_ssl_bit_needs_a_version() -> None:
    with pytest.raises(SSLTLVError, match="CLIENT_SSL set but no VERSION"):
        parse_header(header(tlv(0x20, ssl_value(0x01, 0, ssl_subs((0x22, b"cn"))))))


@pytest.mark.parametrize("sub_type", [0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27])
def test_ssl_text_sub_tlvs_must_be_utf8(sub_type: int) -> None:
    subs = ssl_subs((0x21, b"TLSv1.3")) + tlv(sub_type, b"\xc3\x28")
    with pytest.raises(SSLTLVError, match=SSLSubType(sub_type).name):
        parse_header(header(tlv(0x20, ssl_value(0x01, 0, subs))))


def test_ssl_sub_tlv_overrun_and_cut_short() -> None:
    with pytest.raises(SSLTLVError, match="claims 9 bytes"):
        parse_header(header(tlv(0x20, ssl_value(0, 0, tlv(0x21, b"TLS", length=9)))))
    with pytest.raises(SSLTLVError, match="cut short"):
        parse_header(header(tlv(0x20, ssl_value(0, 0, b"\x21\x00"))))


def test_two_ssl_tlvs_are_rejected() -> None:
    data = header(tlv(0x20, ssl_value(0, 0)) + tlv(0x20, ssl_value(0, 0)))
    with pytest.raises(SSLTLVError, match="second SSL"):
        parse_header(data)
    with pytest.raises(SSLTLVError, match="second SSL"):
        parse_header(data[:-1])


def test_ssl_errors_are_tlv_errors() -> None:
    assert issubclass(SSLTLVError, InvalidTLVError)
    assert SSLTLVError.reason == "bad_ssl_tlv"


def test_ssl_sub_tlv_problems_are_found_while_the_rest_arrives() -> None:
    subs = tlv(0x21, b"TLSv1.3") + tlv(0x22, b"\xff\xfe") + tlv(0x23, b"x" * 50)
    data = header(tlv(0x20, ssl_value(0x01, 0, subs)))
    cut = 16 + 12 + 3 + 5 + 10 + 5 + 3  # through the bad CN, not the cipher
    with pytest.raises(SSLTLVError, match="CN"):
        parse_header(data[:cut])
    overrun = header(tlv(0x20, ssl_value(0, 0, tlv(0x22, b"", length=70))) + bytes(60))
    with pytest.raises(SSLTLVError, match="claims 70"):
        parse_header(overrun[: 16 + 12 + 3 + 5 + 3])


def test_bad_values_are_found_while_the_rest_arrives() -> None:
    data = header(tlv(0x02, b"\xff") + tlv(0xE0, b"y" * 100))
    with pytest.raises(InvalidTLVError, match="AUTHORITY"):
        parse_header(data[: 16 + 12 + 4 + 3])


# --- the fast walk and the explaining walk agree ------------------------------------------------

tlv_piece = st.one_of(
    st.builds(
        tlv,
        st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0x30, 0xEA]),
        st.one_of(
            st.sampled_from([b"", b"h2", b"mail.example", "bücher".encode(), b"\xff", bytes(4)]),
            st.binary(max_size=12),
        ),
    ),
    st.builds(
        lambda client, subs: tlv(0x20, ssl_value(client, 0, subs)),
        st.sampled_from([0x00, 0x01, 0x07]),
        st.lists(
            st.builds(
                tlv,
                st.sampled_from([0x21, 0x22, 0x28, 0x29]),
                st.sampled_from([b"TLSv1.3", b"\xc3\x28", b"", b"\x30\x82"]),
            ),
            max_size=3,
        ).map(b"".join),
    ),
    st.binary(max_size=4),  # stray bytes: cut-short or overrunning TLVs
)


@given(st.lists(tlv_piece, max_size=5).map(b"".join), st.booleans())
def test_check_tlvs_raises_exactly_what_first_problem_names(area: bytes, trailing: bool) -> None:
    data = header(area) + (b"EHLO x\r\n" if trailing else b"")
    end = 16 + 12 + len(area)
    expected = first_problem(data, 16 + 12, end)
    if expected is None:
        check_tlvs(data, 16 + 12, end)
    else:
        with pytest.raises(type(expected)) as caught:
            check_tlvs(data, 16 + 12, end)
        assert type(caught.value) is type(expected)
        assert caught.value.message == expected.message
