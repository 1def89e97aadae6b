"""Tests for mailedge/cli/hexinput.py: captured hex streams and dumps back into bytes."""

from __future__ import annotations

import re

import pytest

from mailedge.cli.hexinput import DumpFormatError, InputFormatError, decode_hex, read_input

# A v2 PROXY header over TCP4, 192.0.2.10:51234 -> 198.51.100.25:25: the signature, then
# version and command, family and transport, the length (12), the addresses and the ports.
HAND_V2 = bytes.fromhex("0d0a0d0a000d0a515549540a 21 11 000c c000020a c6336419 c822 0019")


def test_decode_hex_formats() -> None:
    expected = HAND_V2
    # Wireshark "Copy as Hex Stream", and with colons.
    assert decode_hex(HAND_V2.hex()) == expected
    assert decode_hex(":".join(f"{b:02X}" for b in expected)) == expected
    # C array and escaped string.
    assert decode_hex(", ".join(f"0x{b:02x}" for b in expected)) == expected
    assert decode_hex("".join(f"\\x{b:02x}" for b in expected)) == expected
    # hexdump -C, whose last line is the bare total length.
    hexdump = (
        "00000000  0d 0a 0d 0a 00 0d 0a 51  55 49 54 0a 21 11 00 0c  |.......QUIT.!...|\n"
        '00000010  c0 00 02 0a c6 33 64 19  c8 22 00 19              |.....3d.."..|\n'
        "0000001c\n"
    )
    assert decode_hex(hexdump) == expected
    # xxd, whose text column on the last line looks like hex ("12").
    xxd = (
        "00000000: 5052 4f58 5920 5443 5034 2031 2e32 2e33  PROXY TCP4 1.2.3\n"
        "00000010: 2e34 2035 2e36 2e37 2e38 2031 2032 0d0a  .4 5.6.7.8 1 2..\n"
        "00000020: 3132                                     12\n"
    )
    assert decode_hex(xxd) == b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n12"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the input has no hex digits"),
        ("0d0a0", "an odd number of hex digits (5)"),
        ("0d 0a zz", "not hex: 'zz'"),
    ],
)
def test_decode_hex_rejects(text: str, message: str) -> None:
    with pytest.raises(InputFormatError, match=re.escape(message)):
        decode_hex(text)


def test_a_dump_with_a_wrong_offset_is_a_dump_error() -> None:
    dump = "00000000  0d 0a 0d 0a\n00000008  00 0d\n"
    with pytest.raises(DumpFormatError, match="offset 0x8 where 0x4 was expected"):
        decode_hex(dump)


def test_read_input_auto_hex_and_raw() -> None:
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    assert read_input(HAND_V2.hex().encode(), "auto") == (HAND_V2, "hex")
    assert read_input(line, "auto") == (line, "raw")
    assert read_input(HAND_V2, "auto") == (HAND_V2, "raw")
    assert read_input(b"0d0a", "raw") == (b"0d0a", "raw")
    with pytest.raises(InputFormatError, match="--hex: the input is not hex"):
        read_input(line, "hex")


def test_read_input_reports_a_broken_dump_even_in_auto_mode() -> None:
    with pytest.raises(DumpFormatError):
        read_input(b"00000000  0d 0a\n00000009  0d 0a\n", "auto")
