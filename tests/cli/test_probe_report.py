"""Tests for mailedge/cli/probe_report.py: what a probe result means, as text and as JSON."""

from __future__ import annotations

import ipaddress
import json

from mailedge.cli.probe import Outcome, ProbeResult
from mailedge.cli.probe_options import HeaderMode, ProbeOptions, Target, build_header
from mailedge.cli.probe_report import explain, format_result, result_to_json
from mailedge.proxy import InetAddress
from mailedge.settings import ListenerProtocol

SERVER = InetAddress(ipaddress.IPv4Address("127.0.0.1"), 3525)


def result(mode: HeaderMode = HeaderMode.V2, **fields: object) -> ProbeResult:
    options = ProbeOptions(ListenerProtocol.SMTP, Target("127.0.0.1", 3525), mode=mode)
    return ProbeResult(
        options,
        fields.pop("outcome", Outcome.COMPLETED),  # type: ignore[arg-type]
        build_header(options, SERVER),
        local="127.0.0.1:50000",
        **fields,  # type: ignore[arg-type]
    )


def test_a_match_is_the_verdict() -> None:
    matched = result(client_seen="203.0.113.7", matched=True)
    assert explain(matched) == [
        "MATCH: the server sees the client the header claimed, 203.0.113.7."
    ]


def test_a_mismatch_with_the_probes_own_address_says_the_header_was_not_used() -> None:
    lines = explain(result(client_seen="127.0.0.1", matched=False))
    assert lines[0] == "MISMATCH: the header claimed 203.0.113.7, but the server sees 127.0.0.1."
    assert lines[1] == "That is the probe's own address: the header was not used."
    assert "peer=127.0.0.1:50000" in lines[2]


def test_a_close_without_a_header_points_at_proxy_header_mode() -> None:
    closed = result(HeaderMode.NONE, outcome=Outcome.CLOSED, detail="the server closed")
    lines = explain(closed)
    assert lines[0] == "the server closed"
    assert 'proxyHeaderMode = "optional"' in lines[1]


def test_format_result_shows_the_header_and_the_transcript() -> None:
    text = format_result(
        result(
            HeaderMode.V1,
            transcript=(("received", "220 mx"), ("sent", "EHLO probe.mailedge.test")),
            client_seen="203.0.113.7",
            matched=True,
        )
    ).splitlines()
    assert text[0] == "probe smtp 127.0.0.1:3525 from 127.0.0.1:50000"
    assert text[1] == (
        "header sent (45 bytes): v1: PROXY TCP4 203.0.113.7 127.0.0.1 40000 3525\\r\\n"
    )
    header = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 3525\r\n".hex()
    assert text[2:4] == [f"  {header[:64]}", f"  {header[64:]}"]  # 32 bytes a line
    assert text[4:6] == ["< 220 mx", "> EHLO probe.mailedge.test"]
    assert text[-2:] == [
        "server sees client: 203.0.113.7",
        "MATCH: the server sees the client the header claimed, 203.0.113.7.",
    ]
    assert "header sent: none (--no-header)" in format_result(result(HeaderMode.NONE))


def test_result_to_json_is_plain_json_with_the_explanation() -> None:
    completed = result(client_seen="203.0.113.7", matched=True)
    data = result_to_json(completed)
    assert json.loads(json.dumps(data)) == data
    assert data["header"]["decoded"]["family"] == "INET"  # type: ignore[index]
    assert data["explanation"] == explain(completed)
    assert data["exit_code"] == 0
    assert json.loads(format_result(completed, json=True)) == data
