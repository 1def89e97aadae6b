"""Reading a captured header for ``mailedge decode``: hex streams, hex dumps, or raw bytes.

:func:`decode_hex` reads what capture tools print (Wireshark's hex stream and hex dump,
``tcpdump -X``, ``xxd``, ``hexdump -C``, C arrays); :func:`read_input` decides between hex
and raw for the ``--hex``, ``--raw`` and automatic input formats.
"""

from __future__ import annotations

import re
import string

__all__ = ["DumpFormatError", "InputFormatError", "decode_hex", "read_input"]


class InputFormatError(ValueError):
    """Input that was declared hex (``--hex``) but is not."""


class DumpFormatError(InputFormatError):
    """A hex dump (lines with offsets) that cannot be read back into bytes."""


_HEX_DIGITS = frozenset(string.hexdigits)
# A hex dump's offset column: "0x0000:" (tcpdump -X), "00000000:" (xxd), "0000" (Wireshark),
# "00000000" (hexdump -C).
_OFFSET = re.compile(r"(?:0[xX])?([0-9a-fA-F]{4,8}):?")
_GAP = re.compile(r"[ \t]{2,}")
_STREAM_SEPARATORS = re.compile(r"[\s:,]+")


def _is_hex_group(token: str) -> bool:
    return len(token) % 2 == 0 and bool(token) and all(c in _HEX_DIGITS for c in token)


def _dump_line_bytes(rest: str) -> bytes:
    """The bytes of one hex dump line, after its offset: hex groups, then a text column."""
    rest = rest.split("|", 1)[0]  # hexdump -C puts its text column between bars
    segments = [segment for segment in _GAP.split(rest.strip()) if segment]
    hex_segments: list[bytes] = []
    for segment in segments:
        tokens = segment.split()
        if not all(_is_hex_group(token) for token in tokens):
            break  # the text column
        hex_segments.append(bytes.fromhex("".join(tokens)))
    # A text column made only of hex-looking characters (say "12") would pass as hex. It has
    # exactly one character per byte of the line, which the hex groups never have.
    if len(hex_segments) >= 2:
        before = sum(len(chunk) for chunk in hex_segments[:-1])
        last = segments[len(hex_segments) - 1]
        if len(last) == before:
            hex_segments.pop()
    return b"".join(hex_segments)


def _split_offset(line: str) -> tuple[int | None, str]:
    """A dump line's offset (None if it has none) and the rest of the line."""
    parts = line.strip().split(None, 1)
    match = _OFFSET.fullmatch(parts[0]) if parts else None
    if match is None:
        return None, line
    return int(match.group(1), 16), parts[1] if len(parts) > 1 else ""


def _decode_dump(lines: list[str]) -> bytes:
    """The bytes of a hex dump whose first line (``lines[0]``) has offset 0.

    Every line must start with an offset equal to the number of bytes before it, which
    also catches a text column misread as hex on any line but the last. The dump ends at
    the first line without an offset, and nothing but blank lines may follow it.
    """
    out = bytearray()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        offset, rest = _split_offset(line)
        if offset is None:
            if any(later.strip() for later in lines[number:]):
                raise DumpFormatError(
                    "text after the hex dump (a second packet?): keep only the dump of the "
                    "packet that carries the header"
                )
            break
        if offset != len(out):
            raise DumpFormatError(
                f"hex dump line offset 0x{offset:x} where 0x{len(out):x} was expected"
            )
        out += _dump_line_bytes(rest.replace("\t", "  "))
    return bytes(out)


def decode_hex(text: str) -> bytes:
    """Captured hex as bytes; raises :class:`InputFormatError` when it is not hex.

    Accepted: a plain hex stream with any whitespace, ``:`` or ``,`` between bytes and an
    optional ``0x`` or ``\\x`` before each group (Wireshark's "Copy as Hex Stream", C arrays,
    ``xxd -p``); or one hex dump with an offset column, whose text column is ignored
    (``tcpdump -X``, ``xxd``, ``hexdump -C``, Wireshark's "Copy as Hex Dump"). A dump starts
    at the first line with offset 0; lines before it (tcpdump's packet line) are ignored.
    """
    lines = text.splitlines()
    for number, line in enumerate(lines):
        offset, rest = _split_offset(line)
        if offset == 0 and rest:
            return _decode_dump(lines[number:])
    digits: list[str] = []
    for token in _STREAM_SEPARATORS.split(text.replace("\\x", " ").replace("\\X", " ")):
        if token[:2] in ("0x", "0X"):
            token = token[2:]
        if not all(c in _HEX_DIGITS for c in token):
            raise InputFormatError(f"not hex: {token[:20]!r}")
        digits.append(token)
    joined = "".join(digits)
    if not joined:
        raise InputFormatError("the input has no hex digits")
    if len(joined) % 2:
        raise InputFormatError(f"an odd number of hex digits ({len(joined)})")
    return bytes.fromhex(joined)


def read_input(data: bytes, form: str) -> tuple[bytes, str]:
    """The header bytes and the format they were read in ("hex" or "raw").

    In auto mode, input that is not hex is taken as raw, except a broken hex dump: text
    with an offset column is never a raw header, so its error is reported instead.
    """
    if form == "raw":
        return data, "raw"
    try:
        text = data.decode("ascii")
        return decode_hex(text), "hex"
    except DumpFormatError:
        raise
    except (UnicodeDecodeError, InputFormatError) as error:
        if form == "hex":
            detail = error.reason if isinstance(error, UnicodeDecodeError) else str(error)
            raise InputFormatError(f"--hex: the input is not hex ({detail})") from None
        return data, "raw"
