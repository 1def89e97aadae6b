"""Checks the interop tests make whichever proxy stands in front of mailedge.

Imported by name (``import interop_checks``): pytest's ``pythonpath`` and mypy's ``mypy_path``
include ``tests/support``. There is deliberately no conftest.py.

HAProxy and nginx (and, for HTTP, Caddy) carry the same clients to the same example handlers,
so what "the client's address reached the server" means is the same behind each of them; the
tests for one proxy add what only that proxy's header can say (v2 TLVs, CRC32C, TLS details).
"""

from __future__ import annotations

import ipaddress
import re

from interop_support import HOSTNAME, HTTPResult, IMAPResult, Setup

from mailedge.context import AddressSource, ConnectionContext, TLSTerminator
from mailedge.events import EventName

__all__ = [
    "LOOPBACK",
    "assert_quiet",
    "imap_with_starttls",
    "received_header",
    "smtp_from_header",
    "smtp_tls_from_proxy",
    "whoami_from_header",
]

# Where every proxy connects to mailedge from (clients come from 127.0.0.2 where it exists).
LOOPBACK = ipaddress.ip_address("127.0.0.1")


def assert_quiet(setup: Setup) -> None:
    """No gate decision worth a warning happened."""
    assert setup.mailedge.warnings() == [], setup.mailedge.warnings()


def received_header(message: bytes) -> str:
    """The Received header the example SMTP handler prepended, unfolded."""
    match = re.search(rb"^Received: .*?(?=^\S)", message, re.MULTILINE | re.DOTALL)
    assert match is not None, message
    return re.sub(r"\s+", " ", match[0].decode()).strip()


async def smtp_from_header(
    setup: Setup, source: str, *, version: int
) -> tuple[ConnectionContext, str]:
    """Send one message in plaintext from ``source`` through the proxy, whose ``version``
    header describes the client: the EHLO reply, the context of listener "smtp" and the
    Received header all name the client, not the proxy.

    Returns the session's context and its unfolded Received header, for the proxy's own checks.
    """
    me = setup.mailedge
    result = await setup.smtp(source=source, send=True)
    assert result.ehlo[0] == f"{HOSTNAME} Hello client.mailedge.test [{source}]"
    assert "STARTTLS" in result.ehlo  # a plaintext session: STARTTLS is offered

    context = me.context_for_client_port("smtp", result.local[1])
    assert str(context.client_ip) == source
    assert context.address_source is AddressSource.HEADER
    assert context.peer_ip == LOOPBACK  # the proxy's own connection
    assert context.peer_port != result.local[1]
    # The header's destination is the proxy's frontend, which the client connected to.
    assert (str(context.server_ip), context.server_port) == ("127.0.0.1", setup.frontend)
    assert context.header is not None
    assert context.header.version == version
    assert not context.tls

    [message] = me.messages()
    received = received_header(message)
    assert f"Received: from client.mailedge.test ([{source}])" in received
    assert me.count("smtp", EventName.ACCEPTED, "header") == 1
    return context, received


async def smtp_tls_from_proxy(
    setup: Setup, source: str, listener: str
) -> tuple[ConnectionContext, str]:
    """Send one message from ``source`` over TLS that the proxy terminates, to ``listener``:
    the session counts as TLS, so STARTTLS is not offered again (RFC 3207 forbids it).

    Returns the session's context and the Received header of its one message.
    """
    result = await setup.smtp(source=source, implicit_tls=setup.certs.client_context(), send=True)
    assert "STARTTLS" not in result.ehlo
    assert result.ehlo[0].endswith(f"[{source}]")
    context = setup.mailedge.context_for_client_port(listener, result.local[1])
    assert context.tls
    assert context.tls_terminated_by is TLSTerminator.PROXY
    [message] = setup.mailedge.messages()
    return context, received_header(message)


async def imap_with_starttls(
    setup: Setup,
) -> tuple[IMAPResult, IMAPResult, list[ConnectionContext]]:
    """Two IMAP sessions through the proxy: one that tries LOGIN in plaintext and is refused
    (LOGINDISABLED), one that upgrades with STARTTLS and logs in.

    Returns both results and the two sessions' contexts, each a proxied connection (its peer
    port is the proxy's, not the client's).
    """
    plain = await setup.imap()
    assert "LOGINDISABLED" in plain.welcome
    assert not plain.logged_in
    upgraded = await setup.imap(starttls=setup.certs.client_context())
    assert upgraded.logged_in, upgraded.login
    contexts = []
    for result in (plain, upgraded):
        context = setup.mailedge.context_for_client_port("imap", result.local[1])
        assert context.peer_port != result.local[1]
        contexts.append(context)
    return plain, upgraded, contexts


async def whoami_from_header(setup: Setup, source: str, *, version: int) -> HTTPResult:
    """``GET /whoami`` in plaintext from ``source`` through the proxy, whose ``version``
    header describes the client: the HTTP handler's context names the client's own address
    and port, and no TLS.

    Returns the result, whose ``body`` is the context as JSON, for the proxy's own checks.
    """
    result = await setup.http(source=source)
    whoami = result.body
    assert whoami["client_ip"] == source
    assert whoami["client_port"] == result.local[1]
    assert whoami["proxy_version"] == version
    assert whoami["tls"] is False
    return result
