"""The shared syntax rules: DNS host names and enhanced status codes."""

from __future__ import annotations

import pytest

from mailedge.names import ENHANCED_STATUS, HOSTNAME, MAX_HOSTNAME_LENGTH, is_hostname

LABEL = "a" * 63


@pytest.mark.parametrize(
    "name",
    [
        "mx.example",
        "mx.example.",
        "localhost",
        "1.example",
        "x-1.example",
        LABEL + ".example",
        ".".join([LABEL] * 3 + ["b" * 61]),
        ".".join([LABEL] * 3 + ["b" * 61]) + ".",
    ],
)
def test_host_names(name: str) -> None:
    assert is_hostname(name)
    assert HOSTNAME.fullmatch(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        ".mx.example",
        "-mx.example",
        "mx-.example",
        "mx..example",
        "mx.example..",
        "mx example",
        "mx_1.example",
        "mx.example\r\nX-Evil: 1",
        "mx.example\n",
        "mx.example; dmarc=pass",
        "b\u00fccher.example",
        "a" * 64 + ".example",
        ".".join([LABEL] * 3 + ["b" * 62]),
    ],
)
def test_not_host_names(name: str) -> None:
    assert not is_hostname(name)


def test_the_length_limit_counts_the_dotted_form_without_the_final_dot() -> None:
    longest = ".".join([LABEL] * 3 + ["b" * 61])
    assert len(longest) == MAX_HOSTNAME_LENGTH
    assert is_hostname(longest) and not is_hostname(longest + "b")


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        ("2.0.0", True),
        ("4.7.1", True),
        ("5.7.23", True),
        ("5.999.999", True),
        ("3.0.0", False),
        ("5.1000.0", False),
        ("5.7", False),
        ("5.7.1 ", False),
        ("x.1.1", False),
    ],
)
def test_enhanced_status_codes(code: str, valid: bool) -> None:
    assert (ENHANCED_STATUS.fullmatch(code) is not None) is valid
