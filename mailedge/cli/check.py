"""``mailedge check FILE``: validate a config file and show what is in effect, per listener.

For each listener: its addresses, whether PROXY is on, the trusted networks it really uses
and where they come from (the server-wide list, its own override, or ``[]``), the header
mode and the timeouts. Exit status 0 for a valid file, 1 for an invalid one. See
docs/configuration.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection

from mailedge.config import ConfigError, load_document, require_listeners
from mailedge.networks import format_endpoint
from mailedge.settings import NetworkListener, Settings

__all__ = ["add_check_arguments", "check_command", "describe_settings"]


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``check`` subcommand's arguments."""
    parser.add_argument("file", metavar="FILE", help="a .toml or .json config file")
    parser.add_argument(
        "--allow-section",
        action="append",
        default=[],
        metavar="NAME",
        help="an application's own table to allow, such as Example (repeatable)",
    )


def _trust(conf: NetworkListener, settings: Settings) -> tuple[str, str]:
    networks = conf.effective_proxy_trusted_networks(settings.system)
    shown = "[" + ", ".join(map(str, networks)) + "]"
    override = conf.override_proxy_trusted_networks
    if override is None:
        source = "server-wide (SystemSettings.proxyTrustedNetworks)"
    elif not override:
        source = "override [] (overrideProxyTrustedNetworks = []: PROXY off)"
    else:
        source = "override (overrideProxyTrustedNetworks)"
    return shown, source


def describe_settings(settings: Settings) -> list[str]:
    """The lines ``mailedge check`` prints for valid settings."""
    lines = []
    for conf in settings.listeners:
        networks = conf.effective_proxy_trusted_networks(settings.system)
        shown, source = _trust(conf, settings)
        binds = ", ".join(format_endpoint(str(b.host), b.port) for b in conf.bind)
        tls = " tls" if conf.tls else ""
        lines += [
            f"listener {conf.name} ({conf.protocol}{tls}) on {binds}",
            f"  PROXY: {'on' if networks else 'off'}",
            f"  trusted networks: {shown} from {source}",
            f"  header mode: {conf.proxy_header_mode}",
            f"  timeouts: proxyHeaderTimeout {conf.proxy_header_timeout:g} s, "
            f"idleTimeout {conf.idle_timeout:g} s, "
            f"tlsHandshakeTimeout {conf.tls_handshake_timeout:g} s",
        ]
    return lines


def check_file(file: str, extra_sections: Collection[str] = ()) -> list[str]:
    """The description of ``file``'s settings; raises ConfigError or OSError."""
    document = load_document(file, extra_sections=extra_sections)
    require_listeners(document.settings, file)
    return [f"{file}: valid", *describe_settings(document.settings)]


def check_command(args: argparse.Namespace) -> int:
    """Run ``check``: 0 when the file is valid, 1 when not."""
    try:
        lines = check_file(args.file, args.allow_section)
    except (ConfigError, OSError) as error:
        print(f"mailedge check: {error}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0
