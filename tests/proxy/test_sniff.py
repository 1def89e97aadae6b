"""sniff: the cheap first look at a connection's bytes, and its agreement with the parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailedge.proxy import (
    V2_SIGNATURE,
    NotProxyHeaderError,
    ProxyProtocolError,
    Sniff,
    parse_header,
    sniff,
)


def test_empty_needs_more() -> None:
    assert sniff(b"") is Sniff.NEED_MORE


@pytest.mark.parametrize("size", range(1, 6))
def test_every_strict_prefix_of_the_v1_prefix_needs_more(size: int) -> None:
    assert sniff(b"PROXY "[:size]) is Sniff.NEED_MORE


@pytest.mark.parametrize("size", range(1, 12))
def test_every_strict_prefix_of_the_signature_needs_more(size: int) -> None:
    assert sniff(V2_SIGNATURE[:size]) is Sniff.NEED_MORE


@pytest.mark.parametrize("data", [b"PROXY ", b"PROXY TCP4 ", b"PROXY garbage"])
def test_v1(data: bytes) -> None:
    assert sniff(data) is Sniff.V1
    assert sniff(bytearray(data)) is Sniff.V1
    assert sniff(memoryview(data)) is Sniff.V1


@pytest.mark.parametrize("data", [V2_SIGNATURE, V2_SIGNATURE + b"\x21", V2_SIGNATURE + b"\xff" * 9])
def test_v2(data: bytes) -> None:
    assert sniff(data) is Sniff.V2
    assert sniff(bytearray(data)) is Sniff.V2
    assert sniff(memoryview(data)) is Sniff.V2


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO",
        b"\x16\x03",
        b"\x16",
        b"GET ",
        b"proxy ",
        b"PROXY\t",
        b"PROXX",
        b"PR0",
        b"\r\n\r\n\x00\r\nquit",
        b"\r\r",
        b"\n",
    ],
)
def test_not_proxy(data: bytes) -> None:
    assert sniff(data) is Sniff.NOT_PROXY
    with pytest.raises(NotProxyHeaderError):
        parse_header(data)


@pytest.mark.parametrize("first", range(256))
def test_every_first_byte(first: int) -> None:
    expected = Sniff.NEED_MORE if first in b"P\r" else Sniff.NOT_PROXY
    assert sniff(bytes([first])) is expected


def prefixes_and_noise() -> st.SearchStrategy[bytes]:
    starts = st.sampled_from([b"", b"PROXY "[:3], b"PROXY ", V2_SIGNATURE[:7], V2_SIGNATURE])
    return st.tuples(starts, st.binary(max_size=20)).map(b"".join)


@given(st.one_of(st.binary(max_size=20), prefixes_and_noise()))
def test_sniff_agrees_with_parse_header(data: bytes) -> None:
    verdict = sniff(data)
    try:
        result = parse_header(data)
    except NotProxyHeaderError:
        assert verdict is Sniff.NOT_PROXY
        return
    except ProxyProtocolError:
        assert verdict in (Sniff.V1, Sniff.V2)
        return
    if verdict is Sniff.NEED_MORE:
        assert result is None
    else:
        assert verdict in (Sniff.V1, Sniff.V2)
