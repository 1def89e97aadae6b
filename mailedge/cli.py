"""The ``mailedge`` command line: tools for debugging a proxy in front of a mail server.

``mailedge decode`` reads one captured PROXY protocol header, in hex or raw, and prints
what mailedge's parser makes of it as JSON. See docs/decode.md.

``mailedge probe`` connects to a listener as a proxy would, sends a PROXY header, and shows
which client the server then sees (:mod:`mailedge.probe`). See docs/probe.md.

The command is a set of subcommands: each is a :class:`Subcommand` (its arguments and the
function that runs it) listed in :func:`subcommands`. :func:`header_to_json` turns a parsed
header into plain JSON values; it is meant to be shared by every tool that shows a header.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from mailedge.events import escape_bytes
from mailedge.proxy import (
    DEFAULT_MAX_V2_LENGTH,
    TLV,
    V2_SIGNATURE,
    Address,
    ClientFlags,
    InetAddress,
    ProxyHeader,
    ProxyProtocolError,
    SSLInfo,
    SSLSubType,
    TLVType,
    UnixAddress,
    parse_header,
)

__all__ = [
    "JSONObject",
    "Subcommand",
    "address_to_json",
    "decode_command",
    "decode_hex",
    "header_to_json",
    "main",
    "ssl_to_json",
    "subcommands",
    "tlv_to_json",
]

JSONObject = dict[str, object]

# The largest v2 header the wire format can describe: 16 bytes plus a 16-bit length.
_V2_ABSOLUTE_MAX = 16 + 0xFFFF
# How much of the bytes after the header ``trailing_bytes`` shows.
_TRAILING_PREVIEW = 64


# --- JSON conversion, shared by the tools that show a header ---------------------------------


def _printable_text(data: bytes) -> str | None:
    """The value as text when it is non-empty, valid UTF-8 and entirely printable."""
    if not data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def _tlv_type_name(type_: int) -> str:
    try:
        return TLVType(type_).name
    except ValueError:
        pass
    if 0xE0 <= type_ <= 0xEF:
        return "CUSTOM"
    if 0xF0 <= type_ <= 0xF7:
        return "EXPERIMENTAL"
    if type_ >= 0xF8:
        return "FUTURE"
    return "UNASSIGNED"


def _ssl_subtype_name(type_: int) -> str:
    try:
        return SSLSubType(type_).name
    except ValueError:
        return "UNASSIGNED"


def tlv_to_json(tlv: TLV, *, name: Callable[[int], str] = _tlv_type_name) -> JSONObject:
    """One TLV: its type (number and name), length and value, as hex and, if printable, text."""
    value = bytes(tlv.value)
    entry: JSONObject = {
        "type": tlv.type,
        "type_name": name(tlv.type),
        "length": len(value),
        "value_hex": value.hex(),
    }
    text = _printable_text(value)
    if text is not None:
        entry["value_text"] = text
    return entry


def _client_flag_names(client: int) -> list[str]:
    names: list[str] = []
    known = 0
    for flag in ClientFlags:
        known |= flag.value
        if client & flag.value:
            names.append(str(flag.name))
    for bit in range(8):
        if client & (1 << bit) & ~known:
            names.append(f"UNKNOWN_0x{1 << bit:02x}")
    return names


def ssl_to_json(ssl: SSLInfo) -> JSONObject:
    """The decoded PP2_TYPE_SSL TLV: every field, the client flags by name, and ``verified``."""
    return {
        "client": _client_flag_names(int(ssl.client)),
        "client_ssl": ssl.client_ssl,
        "cert_presented": ssl.cert_presented,
        "verify": ssl.verify,
        "verified": ssl.verified,
        "version": ssl.version,
        "cn": ssl.cn,
        "cipher": ssl.cipher,
        "sig_alg": ssl.sig_alg,
        "key_alg": ssl.key_alg,
        "group": ssl.group,
        "sig_scheme": ssl.sig_scheme,
        "client_cert": None if ssl.client_cert is None else ssl.client_cert.hex(),
        "tlvs": [tlv_to_json(sub, name=_ssl_subtype_name) for sub in ssl.tlvs],
    }


def address_to_json(address: Address | None) -> JSONObject | None:
    """``{ip, port}`` for INET and INET6, ``{path}`` for UNIX, None for no address."""
    if address is None:
        return None
    if isinstance(address, InetAddress):
        return {"ip": str(address.ip), "port": address.port}
    if isinstance(address, UnixAddress):
        return {"path": escape_bytes(address.path.rstrip(b"\x00"), limit=None)}
    raise TypeError(f"not an address: {address!r}")


def header_to_json(header: ProxyHeader) -> JSONObject:
    """A parsed header as plain JSON values (for ``decode``, a probe, an HTTP /whoami).

    Bytes become hex (``unique_id``, TLV values) or escaped text (``alpn``); enums become
    their names. The result does not say whether the header was trusted: that is the
    caller's to add.
    """
    alpn = header.alpn
    unique_id = header.unique_id
    return {
        "version": header.version,
        "command": header.command.name,
        "family": header.family.name,
        "transport": header.transport.name,
        "source": address_to_json(header.source),
        "destination": address_to_json(header.destination),
        "tlvs": [tlv_to_json(tlv) for tlv in header.tlvs],
        "ssl": None if header.ssl is None else ssl_to_json(header.ssl),
        "alpn": None if alpn is None else escape_bytes(alpn, limit=None),
        "authority": header.authority,
        "unique_id": None if unique_id is None else unique_id.hex(),
        "netns": header.netns,
        "crc32c_verified": header.crc32c_verified,
    }


# --- reading captured input ------------------------------------------------------------------


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


def _read_input(data: bytes, form: str) -> tuple[bytes, str]:
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


# --- decode ----------------------------------------------------------------------------------


def _hint(data: bytes) -> str | None:
    """A plain-words guess at what arrived instead of a header, for the common mistakes."""
    later = _find_header(data)
    if later > 0:
        return (
            f"a PROXY signature starts at byte {later}; the bytes before it (the IP and TCP "
            "headers of a packet dump?) are not part of the header: try --search"
        )
    if data[:1] == b"\x16" and data[1:2] == b"\x03":
        return (
            "this is a TLS handshake (ClientHello): the proxy is not sending a PROXY header, "
            "or it is sent inside TLS"
        )
    word = data.split(b" ", 1)[0].split(b"\r", 1)[0].upper()
    if word in (b"EHLO", b"HELO", b"LHLO", b"MAIL", b"QUIT", b"STARTTLS", b"NOOP", b"RSET"):
        return "this is an SMTP command: the proxy is not sending a PROXY header"
    if word in (b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"CONNECT"):
        return "this is an HTTP request: the proxy is not sending a PROXY header"
    return None


# Rejections that a decode option relaxes, for a header the proxy is meant to send.
_POLICY_HINTS = {
    "family_not_allowed": (
        "a valid header that the default policy refuses; decode accepts it with --allow-unix, "
        "--allow-dgram or --allow-v1-mixed-family, whichever the message names"
    ),
    "too_long": (
        "for v2, --max-v2-length raises the cap (default 4096 bytes); a v1 line is never "
        "longer than 107 bytes"
    ),
}


def _find_header(data: bytes) -> int:
    """Where the first v2 signature or v1 ``PROXY `` starts; 0 when neither appears."""
    found = [index for index in (data.find(V2_SIGNATURE), data.find(b"PROXY ")) if index >= 0]
    return min(found) if found else 0


def _incomplete(data: bytes) -> JSONObject:
    result: JSONObject = {"valid": False, "reason": "incomplete"}
    if data.startswith(V2_SIGNATURE) and len(data) >= 16:
        needed = 16 + int.from_bytes(data[14:16], "big") - len(data)
        result["message"] = f"need {needed} more bytes"
        result["bytes_needed"] = needed
    elif data and V2_SIGNATURE.startswith(data[:12]) and len(data) < 16:
        needed = 16 - len(data)
        result["message"] = f"need at least {needed} more bytes (the v2 header's first 16)"
        result["bytes_needed"] = needed
    else:
        result["message"] = "the input ends before the header is complete"
    return result


def decode_bytes(
    data: bytes,
    *,
    max_v2_length: int = DEFAULT_MAX_V2_LENGTH,
    allow_unix: bool = False,
    allow_dgram: bool = False,
    allow_v1_mixed_family: bool = False,
    normalize_v4_mapped: bool = True,
) -> JSONObject:
    """What ``decode`` prints for these bytes (with ``valid`` true or false)."""
    try:
        parsed = parse_header(
            data,
            max_v2_length=max_v2_length,
            allow_unix=allow_unix,
            allow_dgram=allow_dgram,
            allow_v1_mixed_family=allow_v1_mixed_family,
            normalize_v4_mapped=normalize_v4_mapped,
        )
    except ProxyProtocolError as error:
        invalid: JSONObject = {"valid": False, "reason": error.reason, "message": error.message}
        hint = _POLICY_HINTS.get(error.reason) or _hint(data)
        if hint is not None:
            invalid["hint"] = hint
        return invalid
    if parsed is None:
        return _incomplete(data)
    header, consumed = parsed
    trailing = data[consumed:]
    return {
        "valid": True,
        **header_to_json(header),
        "consumed": consumed,
        "trailing_bytes": {
            "count": len(trailing),
            "first": escape_bytes(trailing[:_TRAILING_PREVIEW], limit=None),
        },
    }


def _read_source(path: str | None, stdin: BinaryIO) -> bytes:
    if path is None or path == "-":
        if stdin.isatty():
            print("mailedge decode: reading standard input; end it with Ctrl-D", file=sys.stderr)
        return stdin.read()
    with open(path, "rb") as file:
        return file.read()


def _max_v2_length(value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if not 16 <= number <= _V2_ABSOLUTE_MAX:
        raise argparse.ArgumentTypeError(f"must be 16 to {_V2_ABSOLUTE_MAX}, got {number}")
    return number


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``decode`` subcommand's arguments."""
    parser.add_argument(
        "file",
        nargs="?",
        metavar="FILE",
        help="the captured header; '-' or nothing reads standard input",
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument(
        "--hex",
        dest="input_format",
        action="store_const",
        const="hex",
        help="the input is hex (a hex stream or a hex dump)",
    )
    form.add_argument(
        "--raw",
        dest="input_format",
        action="store_const",
        const="raw",
        help="the input is the header's bytes as they were on the wire",
    )
    parser.set_defaults(input_format="auto")
    parser.add_argument(
        "--search",
        action="store_true",
        help="decode from the first PROXY signature in the input, skipping what precedes it "
        "(such as the IP and TCP headers in a tcpdump -X dump)",
    )
    parser.add_argument(
        "--max-v2-length",
        type=_max_v2_length,
        default=DEFAULT_MAX_V2_LENGTH,
        metavar="BYTES",
        help=f"reject v2 headers longer than this (default {DEFAULT_MAX_V2_LENGTH})",
    )
    parser.add_argument("--allow-unix", action="store_true", help="accept AF_UNIX addresses")
    parser.add_argument("--allow-dgram", action="store_true", help="accept the DGRAM transport")
    parser.add_argument(
        "--allow-v1-mixed-family",
        action="store_true",
        help="accept an IPv4 address under v1 TCP6 (nginx's out-of-spec form)",
    )
    parser.add_argument(
        "--keep-v4-mapped",
        action="store_true",
        help="do not turn v4-mapped IPv6 addresses (::ffff:a.b.c.d) into IPv4",
    )
    parser.add_argument(
        "--compact", action="store_true", help="print the JSON on one line instead of indented"
    )


def decode_command(args: argparse.Namespace, *, stdin: BinaryIO | None = None) -> int:
    """Run ``decode``: 0 for a valid header, 1 for an invalid or incomplete one, 2 for bad input."""
    source = sys.stdin.buffer if stdin is None else stdin
    try:
        captured = _read_source(args.file, source)
    except OSError as error:
        print(f"mailedge decode: error: cannot read {args.file}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        data, input_format = _read_input(captured, args.input_format)
    except InputFormatError as error:
        print(f"mailedge decode: error: {error}", file=sys.stderr)
        return 2
    skipped = _find_header(data) if args.search else 0
    result = decode_bytes(
        data[skipped:],
        max_v2_length=args.max_v2_length,
        allow_unix=args.allow_unix,
        allow_dgram=args.allow_dgram,
        allow_v1_mixed_family=args.allow_v1_mixed_family,
        normalize_v4_mapped=not args.keep_v4_mapped,
    )
    result["input_format"] = input_format
    result["input_length"] = len(data)
    if args.search:
        result["skipped_bytes"] = skipped
    print(json.dumps(result, indent=None if args.compact else 2))
    return 0 if result["valid"] else 1


# --- the command -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Subcommand:
    """One ``mailedge`` subcommand: its name, one line of help, its arguments and its body."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def subcommands() -> list[Subcommand]:
    """Every subcommand, in the order ``--help`` lists them.

    A subcommand that lives in another module is imported here, inside the function, so
    that it can itself import the helpers of this module without an import cycle.
    """
    from mailedge import probe

    return [
        Subcommand(
            name="decode",
            help="decode a captured PROXY protocol header and print it as JSON",
            add_arguments=add_decode_arguments,
            run=decode_command,
        ),
        Subcommand(
            name="probe",
            help="connect to a listener as a proxy would and show what the server sees",
            add_arguments=probe.add_probe_arguments,
            run=probe.probe_command,
        ),
    ]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``mailedge`` and all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="mailedge",
        description="Tools for the network edge of a mail server behind a PROXY protocol proxy.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for subcommand in subcommands():
        sub = commands.add_parser(
            subcommand.name, help=subcommand.help, description=subcommand.help
        )
        subcommand.add_arguments(sub)
        sub.set_defaults(run=subcommand.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``mailedge`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
