"""TLS that this server terminates itself: implicit TLS listeners and STARTTLS.

The gate reads the PROXY header from the raw TCP stream first; TLS then runs over the stream
the gate returned, so a ClientHello that arrived in the header's segment is not lost.
"""

from __future__ import annotations

import ssl

import trio

from mailedge.context import ConnectionContext

__all__ = ["capture_sni", "server_ssl_context", "starttls", "tls_context"]

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
