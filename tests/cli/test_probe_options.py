"""The probe's options: targets and addresses as typed, and the header they make."""

from __future__ import annotations

import pytest

from mailedge.cli.probe_options import (
    DEFAULT_CLIENT,
    HeaderMode,
    ProbeOptions,
    ProbeUsageError,
    Target,
    build_header,
    parse_inet_address,
    parse_target,
)
from mailedge.proxy import Family, parse_header
from mailedge.settings import ListenerProtocol


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:3525", Target("127.0.0.1", 3525)),
        ("[::1]:3525", Target("::1", 3525)),
        ("mx.example:25", Target("mx.example", 25)),
        ("localhost:25", Target("localhost", 25)),
    ],
)
def test_parse_target(text: str, expected: Target) -> None:
    assert parse_target(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "::1:25",
        "[::1]25",
        "[::1]",
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:025",
        "[127.0.0.1]:25",
        "bad_name:25",
        ":25",
    ],
)
def test_parse_target_rejects(text: str) -> None:
    with pytest.raises(ProbeUsageError, match="HOST:PORT"):
        parse_target(text)


@pytest.mark.parametrize(
    "text", ["mx.example:25", "[127.0.0.1]:25", "[fe80::1%eth0]:25", "1.2.3.4"]
)
def test_parse_inet_address_rejects(text: str) -> None:
    with pytest.raises(ProbeUsageError, match="--client"):
        parse_inet_address(text, "--client")


def test_build_header_v2_mixed_families_is_v4_mapped_inet6() -> None:
    opts = ProbeOptions(ListenerProtocol.SMTP, Target("::1", 25))
    server = parse_inet_address("[::1]:25")
    parsed = parse_header(build_header(opts, server))
    assert parsed is not None
    assert parsed[0].family is Family.INET6
    assert parsed[0].source == DEFAULT_CLIENT
    assert parsed[0].destination == server


def test_build_header_uses_server_option() -> None:
    server = parse_inet_address("192.0.2.25:25")
    opts = ProbeOptions(
        ListenerProtocol.SMTP, Target("127.0.0.1", 3525), mode=HeaderMode.V1, server=server
    )
    assert build_header(opts, parse_inet_address("127.0.0.1:3525")) == (
        b"PROXY TCP4 203.0.113.7 192.0.2.25 40000 25\r\n"
    )


def test_a_zone_id_stays_out_of_the_header() -> None:
    target = parse_target("[fe80::1%lo]:9")
    assert str(target) == "[fe80::1%lo]:9"
    assert target.header_address == parse_inet_address("[fe80::1]:9")
    assert parse_target("[::ffff:127.0.0.1]:9").header_address == parse_inet_address("127.0.0.1:9")
    assert parse_target("mx.example:25").header_address is None


def test_build_header_none() -> None:
    opts = ProbeOptions(ListenerProtocol.HTTP, Target("127.0.0.1", 80), mode=HeaderMode.NONE)
    assert build_header(opts, parse_inet_address("127.0.0.1:80")) == b""
