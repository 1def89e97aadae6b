"""The library's STARTTLS helper: pipelined plaintext dropped, the listener's timeout kept."""

from __future__ import annotations

import logging
import ssl

import hook_support
import pytest
import trio
import trio.testing
import trustme

from mailedge.context import ConnectionContext, TLSTerminator
from mailedge.defaults import DEFAULT_TLS_HANDSHAKE_TIMEOUT
from mailedge.lines import LineReader
from mailedge.settings import (
    BindAddress,
    ListenerProtocol,
    NetworkListener,
    Settings,
    UnknownListenerError,
)
from mailedge.tls import listener_handshake_timeout, negotiate_starttls

LOG = logging.getLogger("test.tls")


def make_context() -> ConnectionContext:
    """A direct client on listener smtp, connection 9."""
    return hook_support.context(
        "198.51.100.7", peer=None, connection_id=9, client_port=40123, peer_port=40123
    )


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.example").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_the_timeout_is_the_listeners() -> None:
    listener = NetworkListener(
        name="smtp",
        protocol=ListenerProtocol.SMTP,
        bind=(BindAddress.parse("127.0.0.1:25"),),
        tls_handshake_timeout=2.5,
    )
    assert listener_handshake_timeout(Settings(listeners=(listener,)), make_context()) == 2.5
    assert listener_handshake_timeout(None, make_context()) == DEFAULT_TLS_HANDSHAKE_TIMEOUT
    with pytest.raises(UnknownListenerError):
        listener_handshake_timeout(Settings(), make_context())


async def test_pipelined_plaintext_is_dropped_before_the_handshake(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="test.tls")
    server, client = trio.testing.memory_stream_pair()
    reader = LineReader(server)
    # The injected command arrives in the same receive as STARTTLS.
    await client.send_all(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n")
    assert await reader.read_line(512) == b"STARTTLS"
    result: list[tuple[trio.SSLStream[trio.abc.Stream], ConnectionContext] | None] = []

    async def serve() -> None:
        result.append(
            await negotiate_starttls(
                server,
                make_context(),
                server_ssl,
                plaintext=reader,
                handshake_timeout=5,
                log=LOG,
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        tls = trio.SSLStream(client, client_ssl, server_hostname="mx.example")
        await tls.do_handshake()
    (upgraded,) = result
    assert upgraded is not None
    stream, context = upgraded
    assert context.tls and context.tls_terminated_by is TLSTerminator.SERVER
    assert context.tls_version == tls.version()
    await tls.send_all(b"NOOP\r\n")
    # Over TLS the next line is the client's, not the injected one.
    assert await LineReader(stream).read_line(512) == b"NOOP"
    assert reader.buffered == 0
    dropped = len(b"MAIL FROM:<evil@example.org>\r\n")
    assert f"discarded {dropped} plaintext bytes sent after STARTTLS" in caplog.text
    assert "TLS established" in caplog.text


async def test_a_stalled_handshake_gives_up_after_the_timeout(
    server_ssl: ssl.SSLContext,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.tls")
    server, _client = trio.testing.memory_stream_pair()
    start = trio.current_time()
    upgraded = await negotiate_starttls(
        server,
        make_context(),
        server_ssl,
        plaintext=LineReader(server),
        handshake_timeout=3,
        log=LOG,
    )
    assert upgraded is None
    assert trio.current_time() - start == pytest.approx(3)
    assert "STARTTLS handshake timed out after 3 s" in caplog.text
    assert "discarded" not in caplog.text


async def test_a_failed_handshake_is_reported_not_raised(
    server_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="test.tls")
    server, client = trio.testing.memory_stream_pair()
    await client.send_all(b"this is not a ClientHello\r\n" * 4)
    upgraded = await negotiate_starttls(
        server,
        make_context(),
        server_ssl,
        plaintext=LineReader(server),
        handshake_timeout=5,
        log=LOG,
    )
    assert upgraded is None
    assert "STARTTLS handshake failed" in caplog.text
