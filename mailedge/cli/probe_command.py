"""``mailedge probe``, the subcommand: its arguments, and running one probe from them.

The work is :func:`mailedge.cli.probe.probe`; what is printed is
:func:`mailedge.cli.probe_report.format_result`. See docs/probe.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import sys
from collections.abc import Callable

import trio

from mailedge.cli.probe import probe
from mailedge.cli.probe_options import (
    DEFAULT_CLIENT,
    DEFAULT_TIMEOUT,
    DEFAULT_TLS_VERSION,
    HeaderMode,
    ProbeOptions,
    ProbeUsageError,
    Target,
    parse_inet_address,
    parse_target,
)
from mailedge.cli.probe_report import format_result
from mailedge.proxy import InetAddress, IPAddress
from mailedge.settings import ListenerProtocol

__all__ = ["add_probe_arguments", "options_from_args", "probe_command"]


def _target_type(text: str) -> Target:
    try:
        return parse_target(text)
    except ProbeUsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _address_type(option: str) -> Callable[[str], InetAddress]:
    def parse(text: str) -> InetAddress:
        try:
            return parse_inet_address(text, option)
        except ProbeUsageError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _timeout_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


_EPILOG = """\
examples:
  mailedge probe smtp 127.0.0.1:3525 --client 203.0.113.7:40000
  mailedge probe http [::1]:3080 --ssl --authority mail.example.com
  mailedge probe imap 127.0.0.1:3143 --v1

exit status: 0 when the exchange completed (and, for smtp and http, the server sees the
client the header claimed); 1 on a mismatch, or when the connection was refused, closed
or timed out; 2 for invalid options. See docs/probe.md.
"""


def _source_type(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--source {text!r}: give an IP address of this host, such as 10.0.0.5"
        ) from None


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``probe`` subcommand's arguments."""
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "protocol",
        choices=[str(protocol) for protocol in ListenerProtocol],
        metavar="PROTOCOL",
        help="what the listener speaks: smtp, imap or http",
    )
    parser.add_argument(
        "target",
        type=_target_type,
        metavar="HOST:PORT",
        help="the listener, such as 127.0.0.1:3525 or [::1]:3525",
    )
    header = parser.add_argument_group("the header").add_mutually_exclusive_group()
    for flag, mode, text in (
        ("--v1", HeaderMode.V1, "send a v1 (text) header"),
        ("--v2", HeaderMode.V2, "send a v2 (binary) header; the default"),
        ("--local", HeaderMode.LOCAL, "send a v2 LOCAL header, as a proxy's health check does"),
        ("--no-header", HeaderMode.NONE, "send no header: connect as a direct client"),
    ):
        header.add_argument(flag, dest="mode", action="store_const", const=mode, help=text)
    parser.set_defaults(mode=HeaderMode.V2)
    addresses = parser.add_argument_group("the header's addresses (v1 and v2)")
    addresses.add_argument(
        "--client",
        type=_address_type("--client"),
        metavar="IP:PORT",
        help=f"the client the header claims (default {DEFAULT_CLIENT.ip}:{DEFAULT_CLIENT.port})",
    )
    addresses.add_argument(
        "--server",
        type=_address_type("--server"),
        metavar="IP:PORT",
        help="the server address the header names (default: the address connected to)",
    )
    tlvs = parser.add_argument_group("TLVs (v2 and --local only)")
    tlvs.add_argument(
        "--ssl",
        action="store_true",
        help="add an SSL TLV: the client reached the proxy over TLS (CLIENT_SSL, verify 0)",
    )
    tlvs.add_argument(
        "--tls-version",
        metavar="VERSION",
        help=f"with --ssl: the TLS version (default {DEFAULT_TLS_VERSION})",
    )
    tlvs.add_argument("--cipher", metavar="NAME", help="with --ssl: the cipher")
    tlvs.add_argument("--cn", metavar="NAME", help="with --ssl: the client certificate's CN")
    tlvs.add_argument(
        "--cert-verified",
        action="store_true",
        help="with --ssl: the client presented a certificate and it verified (CERT_CONN)",
    )
    tlvs.add_argument("--authority", metavar="NAME", help="an AUTHORITY TLV (the SNI name)")
    tlvs.add_argument("--alpn", metavar="PROTO", help="an ALPN TLV, such as h2")
    tlvs.add_argument("--unique-id", metavar="TEXT", help="a UNIQUE_ID TLV (at most 128 bytes)")
    tlvs.add_argument("--crc32c", action="store_true", help="add a CRC32C checksum TLV")
    parser.add_argument(
        "--source",
        type=_source_type,
        metavar="IP",
        help="connect from this local address (one a listener trusts as a proxy)",
    )
    parser.add_argument(
        "--timeout",
        type=_timeout_type,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"bound on the connection and on each wait for a reply (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def options_from_args(args: argparse.Namespace) -> ProbeOptions:
    """The parsed arguments as ProbeOptions; raises ProbeUsageError when they conflict."""
    return ProbeOptions(
        protocol=ListenerProtocol(args.protocol),
        target=args.target,
        mode=args.mode,
        client=args.client,
        server=args.server,
        ssl=args.ssl,
        tls_version=args.tls_version,
        cipher=args.cipher,
        cn=args.cn,
        cert_verified=args.cert_verified,
        authority=args.authority,
        alpn=args.alpn,
        unique_id=args.unique_id,
        crc32c=args.crc32c,
        timeout=args.timeout,
        source=args.source,
    )


def probe_command(args: argparse.Namespace) -> int:
    """Run ``probe``: 0 when the exchange completed and matched, 1 when not, 2 for bad options."""
    try:
        options = options_from_args(args)
        result = trio.run(probe, options)
    except ProbeUsageError as error:
        print(f"mailedge probe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mailedge probe: interrupted", file=sys.stderr)
        return 130
    print(format_result(result, json=args.json))
    return result.exit_code
