"""``mailedge decode``: read one captured PROXY protocol header and print it as JSON.

The input is hex or raw (:mod:`mailedge.cli.hexinput`); the JSON is the parsed header
(:func:`mailedge.cli.render.header_to_json`) with ``valid``, what was consumed and what
followed, or, for a header that is not valid, the parser's reason and message and, for the
common mistakes, a ``hint``. See docs/decode.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import BinaryIO

from mailedge.cli.hexinput import InputFormatError, read_input
from mailedge.cli.render import JSONObject, header_to_json
from mailedge.diagnosis import Arrival, recognize
from mailedge.events import escape_bytes
from mailedge.proxy import (
    DEFAULT_MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyProtocolError,
    parse_header,
)

__all__ = ["add_decode_arguments", "decode_bytes", "decode_command"]

# The largest v2 header the wire format can describe: 16 bytes plus a 16-bit length.
_V2_ABSOLUTE_MAX = 16 + 0xFFFF
# How much of the bytes after the header ``trailing_bytes`` shows.
_TRAILING_PREVIEW = 64


def _hint(data: bytes) -> str | None:
    """A plain-words guess at what arrived instead of a header, for the common mistakes."""
    later = _find_header(data)
    if later > 0:
        return (
            f"a PROXY signature starts at byte {later}; the bytes before it (the IP and TCP "
            "headers of a packet dump?) are not part of the header: try --search"
        )
    arrival = recognize(data)
    if arrival is None:
        return None
    if arrival is Arrival.TLS:
        return (
            "this is a TLS handshake (ClientHello): the proxy is not sending a PROXY header, "
            "or it is sent inside TLS"
        )
    return f"this is {arrival.value}: the proxy is not sending a PROXY header"


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
    for flag, text in (
        ("--hex", "the input is hex (a hex stream or a hex dump)"),
        ("--raw", "the input is the header's bytes as they were on the wire"),
    ):
        form.add_argument(
            flag, dest="input_format", action="store_const", const=flag[2:], help=text
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
    # The parser's policy switches, then how the JSON is printed.
    for flag, text in (
        ("--allow-unix", "accept AF_UNIX addresses"),
        ("--allow-dgram", "accept the DGRAM transport"),
        (
            "--allow-v1-mixed-family",
            "accept an IPv4 address under v1 TCP6 (nginx's out-of-spec form)",
        ),
        ("--keep-v4-mapped", "do not turn v4-mapped IPv6 addresses (::ffff:a.b.c.d) into IPv4"),
        ("--compact", "print the JSON on one line instead of indented"),
    ):
        parser.add_argument(flag, action="store_true", help=text)


def decode_command(args: argparse.Namespace, *, stdin: BinaryIO | None = None) -> int:
    """Run ``decode``: 0 for a valid header, 1 for an invalid or incomplete one, 2 for bad input."""
    source = sys.stdin.buffer if stdin is None else stdin
    try:
        captured = _read_source(args.file, source)
    except OSError as error:
        print(f"mailedge decode: error: cannot read {args.file}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        data, input_format = read_input(captured, args.input_format)
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
