"""TLS that this server terminates itself: implicit TLS listeners and STARTTLS.

The gate reads the PROXY header from the raw TCP stream first; TLS then runs over the stream
the gate returned, so a ClientHello that arrived in the header's segment is not lost.

A protocol handler's STARTTLS goes through :func:`negotiate_starttls`: it drops the plaintext
the client pipelined after the command (RFC 3207 4.2; the command injection of CVE-2011-0411),
bounds the handshake by the listener's ``tls_handshake_timeout``
(:func:`listener_handshake_timeout`), and logs what happened through the handler's logger.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, Protocol

import trio

from mailedge.context import ConnectionContext
from mailedge.defaults import DEFAULT_TLS_HANDSHAKE_TIMEOUT
from mailedge.settings import Settings

__all__ = [
    "PlaintextBuffer",
    "capture_sni",
    "listener_handshake_timeout",
    "negotiate_starttls",
    "server_ssl_context",
    "starttls",
    "tls_context",
]

_SNI_ATTRIBUTE = "_mailedge_sni"


def _record_sni(obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
    # The server side of an SSLObject does not keep the name the client asked for; keep it
    # on the object so the context can report it.
    setattr(obj, _SNI_ATTRIBUTE, name)


def server_ssl_context(
    certfile: str, keyfile: str | None = None, *, alpn: list[str] | None = None
) -> ssl.SSLContext:
    """A server context with sane defaults that records the client's SNI for the context."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    if alpn:
        context.set_alpn_protocols(alpn)
    capture_sni(context)
    return context


def capture_sni(context: ssl.SSLContext) -> None:
    """Make ``context`` record each connection's SNI, so ``tls_context`` can report it."""
    if context.sni_callback is None:
        context.sni_callback = _record_sni


def tls_context(
    stream: trio.SSLStream[trio.abc.Stream], context: ConnectionContext
) -> ConnectionContext:
    """The connection context after ``stream`` completed its handshake."""
    cipher = stream.cipher()
    # trio forwards only a fixed set of SSLObject attributes; the SNI we recorded is not one.
    sni = getattr(stream._ssl_object, _SNI_ATTRIBUTE, None)
    return context.with_tls(
        version=stream.version(),
        cipher=cipher[0] if cipher else None,
        sni=sni,
        alpn=stream.selected_alpn_protocol(),
    )


async def starttls(
    stream: trio.abc.Stream, context: ConnectionContext, ssl_context: ssl.SSLContext
) -> tuple[trio.SSLStream[trio.abc.Stream], ConnectionContext]:
    """Run a server-side handshake over ``stream``; return the TLS stream and the new context.

    Used for STARTTLS and for implicit-TLS listeners alike. Raises ``trio.BrokenResourceError``
    if the handshake fails. As with any trio operation, the caller bounds it, typically with
    ``trio.fail_after(listener.tls_handshake_timeout)``.
    """
    tls = trio.SSLStream(stream, ssl_context, server_side=True)
    await tls.do_handshake()
    return tls, tls_context(tls, context)


class PlaintextBuffer(Protocol):
    """Whatever holds bytes received before the handshake: a :class:`~mailedge.lines.LineReader`."""

    def discard_buffered(self) -> int:
        """Drop every byte received but not yet read; return how many there were."""
        ...


def listener_handshake_timeout(settings: Settings | None, context: ConnectionContext) -> float:
    """The ``tls_handshake_timeout`` of the connection's listener in ``settings``.

    Without settings (a handler driven outside a server, as in tests), the default. A listener
    missing from ``settings`` raises :class:`~mailedge.settings.UnknownListenerError`.
    """
    if settings is None:
        return DEFAULT_TLS_HANDSHAKE_TIMEOUT
    return settings.listener(context.listener).tls_handshake_timeout


async def negotiate_starttls(
    stream: trio.abc.Stream,
    context: ConnectionContext,
    ssl_context: ssl.SSLContext,
    *,
    plaintext: PlaintextBuffer,
    handshake_timeout: float,
    log: logging.Logger | logging.LoggerAdapter[Any],
) -> tuple[trio.SSLStream[trio.abc.Stream], ConnectionContext] | None:
    """The server's half of STARTTLS, once the handler has said "go ahead".

    First drops what ``plaintext`` holds: anything the client sent after the STARTTLS command
    arrived in plaintext, and must never be read as if it came through TLS (a man in the
    middle's injection). Then runs the handshake within ``handshake_timeout`` seconds (pass
    :func:`listener_handshake_timeout`). Returns the TLS stream and the new context, or None
    when the handshake failed or timed out, which ends the session: the stream is no longer
    usable for plaintext. All of it is logged through ``log``, the handler's connection logger.
    """
    dropped = plaintext.discard_buffered()
    if dropped:
        log.warning(
            "discarded %d plaintext bytes sent after STARTTLS: data pipelined after STARTTLS "
            "is never read as if it came over TLS",
            dropped,
        )
    try:
        with trio.fail_after(handshake_timeout):
            tls, context = await starttls(stream, context, ssl_context)
    except trio.TooSlowError:
        log.info("STARTTLS handshake timed out after %g s", handshake_timeout)
        return None
    except trio.BrokenResourceError as exc:
        log.info("STARTTLS handshake failed: %s", exc.__cause__ or exc)
        return None
    log.info("TLS established (%s, %s)", context.tls_version, context.tls_cipher)
    return tls, context
