"""mailedge: the network edge for trio mail servers.

A strict, sans-IO PROXY protocol codec (:mod:`mailedge.proxy`), the trusted-network gate
that decides whose header to believe (:class:`ProxyGate`), the connection context it
produces, and the listeners that run them (:func:`serve`).
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING

# The names below are imported on first use, not here: `import mailedge.proxy` must not pull
# in trio, so the sans-IO codec stays usable from any event loop, or none.
_EXPORTS = {
    "ConfigError": "mailedge.config",
    "load": "mailedge.config",
    "AddressSource": "mailedge.context",
    "ConnectionContext": "mailedge.context",
    "TLSTerminator": "mailedge.context",
    "EventName": "mailedge.events",
    "GateReason": "mailedge.events",
    "GateEvent": "mailedge.events",
    "LogLimiter": "mailedge.events",
    "ProxyGate": "mailedge.gate",
    "UntrustedHeaderError": "mailedge.gate",
    "ProxyRejected": "mailedge.gate",
    "InvalidNetworkError": "mailedge.networks",
    "TrustedNetworks": "mailedge.networks",
    "BindError": "mailedge.server",
    "Handler": "mailedge.server",
    "Server": "mailedge.server",
    "handle_signals": "mailedge.server",
    "refusal": "mailedge.server",
    "serve": "mailedge.server",
    "BindAddress": "mailedge.settings",
    "HeaderMode": "mailedge.settings",
    "NetworkListener": "mailedge.settings",
    "ListenerProtocol": "mailedge.settings",
    "Settings": "mailedge.settings",
    "SystemSettings": "mailedge.settings",
    "IdleTimeoutStream": "mailedge.streams",
    "SessionEnded": "mailedge.streams",
    "PrefixedStream": "mailedge.streams",
    "server_ssl_context": "mailedge.tls",
    "starttls": "mailedge.tls",
    "ConnectionLogger": "mailedge.connlog",
    "ClientClosed": "mailedge.lines",
    "LineReader": "mailedge.lines",
    "LineTooLongError": "mailedge.lines",
    "listener_handshake_timeout": "mailedge.tls",
    "negotiate_starttls": "mailedge.tls",
}

if TYPE_CHECKING:
    from mailedge.config import ConfigError, load
    from mailedge.connlog import ConnectionLogger
    from mailedge.context import AddressSource, ConnectionContext, TLSTerminator
    from mailedge.events import EventName, GateEvent, GateReason, LogLimiter
    from mailedge.gate import ProxyGate, ProxyRejected, UntrustedHeaderError
    from mailedge.lines import ClientClosed, LineReader, LineTooLongError
    from mailedge.networks import InvalidNetworkError, TrustedNetworks
    from mailedge.server import BindError, Handler, Server, handle_signals, refusal, serve
    from mailedge.settings import (
        BindAddress,
        HeaderMode,
        ListenerProtocol,
        NetworkListener,
        Settings,
        SystemSettings,
    )
    from mailedge.streams import IdleTimeoutStream, PrefixedStream, SessionEnded
    from mailedge.tls import (
        listener_handshake_timeout,
        negotiate_starttls,
        server_ssl_context,
        starttls,
    )


# Old names, kept for one release: each warns, then gives the new name's value.
_RENAMED = {"Protocol": "ListenerProtocol", "ProxyHeaderRejected": "UntrustedHeaderError"}


def __getattr__(name: str) -> object:
    if name in _RENAMED:
        warnings.warn(
            f"mailedge.{name} is now mailedge.{_RENAMED[name]}", DeprecationWarning, stacklevel=2
        )
        return __getattr__(_RENAMED[name])
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mailedge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    # networks and settings
    "BindAddress",
    "ConfigError",
    "HeaderMode",
    "InvalidNetworkError",
    "NetworkListener",
    "ListenerProtocol",
    "Settings",
    "SystemSettings",
    "TrustedNetworks",
    "load",
    # the gate and its context
    "AddressSource",
    "ConnectionContext",
    "EventName",
    "GateReason",
    "GateEvent",
    "LogLimiter",
    "PrefixedStream",
    "ProxyGate",
    "UntrustedHeaderError",
    "ProxyRejected",
    "TLSTerminator",
    # listeners and the server
    "BindError",
    "Handler",
    "IdleTimeoutStream",
    "SessionEnded",
    "Server",
    "handle_signals",
    "refusal",
    "serve",
    "server_ssl_context",
    "starttls",
    # what a protocol handler needs
    "ClientClosed",
    "ConnectionLogger",
    "LineReader",
    "LineTooLongError",
    "listener_handshake_timeout",
    "negotiate_starttls",
]
