"""Shared helpers for the rate-limit and auto-ban tests: contexts and settings.

Imported by name (``import hook_support``): pytest's ``pythonpath`` and mypy's ``mypy_path``
include ``tests/support``. There is deliberately no conftest.py.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs

from mailedge.context import AddressSource, ConnectionContext
from mailedge.networks import TrustedNetworks
from mailedge.settings import (
    BindAddress,
    ListenerProtocol,
    NetworkListener,
    Settings,
    SystemSettings,
)

__all__ = ["PROXY", "context", "listener", "settings"]

# The proxy every proxied test context comes through; trusted server-wide by `settings`.
PROXY = "10.0.0.2"


def context(
    client: str = "198.51.100.7",
    *,
    listener: str = "smtp",
    protocol: ListenerProtocol = ListenerProtocol.SMTP,
    peer: str | None = PROXY,
    source: AddressSource | None = None,
    connection_id: int = 1,
    **changes: Any,
) -> ConnectionContext:
    """A connection from ``client``: through the proxy ``peer``, or direct when it is None.

    ``source`` defaults to HEADER (proxied) or SOCKET (direct); PROXY_LOCAL and UNKNOWN put
    the proxy's own address in ``client_ip``, as the gate does.
    """
    proxied = peer is not None
    if source is None:
        source = AddressSource.HEADER if proxied else AddressSource.SOCKET
    peer_ip = ipaddress.ip_address(peer if peer is not None else client)
    known = source in (AddressSource.HEADER, AddressSource.SOCKET)
    base = ConnectionContext(
        connection_id=connection_id,
        listener=listener,
        protocol=protocol,
        client_ip=ipaddress.ip_address(client) if known else peer_ip,
        client_port=40000,
        server_ip=ipaddress.ip_address("192.0.2.25"),
        server_port=25,
        peer_ip=peer_ip,
        peer_port=50000,
        local_ip=ipaddress.ip_address("10.0.0.1"),
        local_port=2525,
        proxied=proxied,
        address_source=source,
    )
    return attrs.evolve(base, **changes) if changes else base


def listener(
    name: str = "smtp", protocol: ListenerProtocol = ListenerProtocol.SMTP, **fields: Any
) -> NetworkListener:
    return NetworkListener(
        name=name,
        protocol=protocol,
        bind=fields.pop("bind", (BindAddress.parse("127.0.0.1:0"),)),
        **fields,
    )


def settings(
    *listeners: NetworkListener, trusted: tuple[str, ...] = (PROXY, "::1"), **fields: Any
) -> Settings:
    """Settings trusting ``trusted`` server-wide, with ``listeners`` (default: one "smtp")."""
    return Settings(
        system=SystemSettings(TrustedNetworks(trusted)),
        listeners=listeners or (listener(),),
        **fields,
    )
