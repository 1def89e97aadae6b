"""Tests for mailedge/cli/probe_command.py: ``mailedge probe``'s arguments and exit status."""

from __future__ import annotations

import pytest

from mailedge.cli import main


def exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else -1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--v1", "--ssl"], "--ssl: a v1 header has no TLVs; use --v2 or --local"),
        (["--v1", "--authority", "mx.example"], "--authority: a v1 header has no TLVs"),
        (["--v1", "--alpn", "h2", "--crc32c"], "--alpn, --crc32c: a v1 header has no TLVs"),
        (["--v1", "--unique-id", "x"], "--unique-id: a v1 header has no TLVs"),
        (["--no-header", "--ssl"], "--ssl: no header is sent"),
        (["--no-header", "--client", "192.0.2.1:1"], "--client: without a header the probe sends"),
        (["--local", "--server", "192.0.2.1:1"], "--server: a LOCAL header carries no addresses"),
        (["--cn", "client"], "--cn: these describe the SSL TLV; add --ssl"),
        (["--tls-version", "TLSv1.2"], "--tls-version: these describe the SSL TLV; add --ssl"),
        (["--cert-verified"], "--cert-verified: these describe the SSL TLV; add --ssl"),
        (["--unique-id", "x" * 129], "--unique-id is 129 bytes"),
        (["--alpn", "h\u00e9"], "--alpn"),
    ],
)
def test_conflicting_options_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert exit_status(["probe", "smtp", "127.0.0.1:9", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("mailedge probe: error: ")
    assert message in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pop3", "127.0.0.1:110"], "invalid choice: 'pop3'"),
        (["smtp", "::1:25"], "put an IPv6 address in brackets"),
        (["smtp", "127.0.0.1"], "has no port"),
        (["smtp"], "the following arguments are required: HOST:PORT"),
        (["smtp", "127.0.0.1:25", "--v1", "--v2"], "not allowed with argument"),
        (["smtp", "127.0.0.1:25", "--client", "203.0.113.7"], "--client '203.0.113.7' has no port"),
        (["smtp", "127.0.0.1:25", "--timeout", "0"], "must be more than 0 seconds"),
        (["smtp", "127.0.0.1:25", "--timeout", "nan"], "must be more than 0 seconds"),
        (["smtp", "127.0.0.1:25", "--timeout", "soon"], "not a number of seconds"),
    ],
)
def test_argument_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert exit_status(["probe", *argv]) == 2
    err = capsys.readouterr().err
    assert "usage: mailedge probe" in err
    assert message in err
