"""The server layer over real sockets on 127.0.0.1 and ::1."""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import pathlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing
import trustme

import mailedge
from mailedge import server as server_module
from mailedge import sessions as sessions_module
from mailedge.context import ConnectionContext
from mailedge.events import LOG_BURST, EventName
from mailedge.hooks import Action, BaseHooks, HookChain, Hooks, Verdict
from mailedge.hooks.autoban import AutoBan
from mailedge.hooks.ratelimit import RateLimitHooks
from mailedge.networks import TrustedNetworks
from mailedge.proxy import ClientFlags, Command, InetAddress, SSLInfo, encode_v1, encode_v2
from mailedge.server import Handler, Server, refusal, serve
from mailedge.sessions import OpenSessions
from mailedge.settings import (
    AutoBanSettings,
    BindAddress,
    ListenerProtocol,
    NetworkListener,
    RateLimit,
    Settings,
    SystemSettings,
)
from mailedge.shutdown import ShuttingDown, awaiting_command, draining
from mailedge.streams import SessionEnded

CLIENT = InetAddress(ipaddress.ip_address("198.51.100.7"), 40123)
SERVER = InetAddress(ipaddress.ip_address("192.0.2.25"), 25)


def listener(name: str = "smtp", **knobs: object) -> NetworkListener:
    knobs.setdefault("bind", (BindAddress.parse("127.0.0.1:0"), BindAddress.parse("[::1]:0")))
    return NetworkListener(name=name, protocol=ListenerProtocol.SMTP, **knobs)  # type: ignore[arg-type]


def settings(*listeners: NetworkListener) -> Settings:
    return Settings(
        system=SystemSettings(proxy_trusted_networks=TrustedNetworks(["127.0.0.0/8", "::1"])),
        listeners=listeners or (listener(),),
    )


async def whoami(stream: trio.abc.Stream, context: ConnectionContext) -> None:
    """A tiny server-first protocol: greet with the client, echo one line, done."""
    tls = f" tls={context.tls_terminated_by}" if context.tls else ""
    await stream.send_all(f"220 {context.client_ip} {context.client_port}{tls}\r\n".encode())
    line = await stream.receive_some()
    await stream.send_all(b"250 " + bytes(line))


async def read_reply(stream: trio.abc.Stream) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    return data


async def start(
    nursery: trio.Nursery, conf: Settings, handler: Handler = whoami, **kw: object
) -> Server:
    server: Server = await nursery.start(
        lambda task_status: serve(
            conf,
            {ListenerProtocol.SMTP: handler},
            task_status=task_status,
            **kw,  # type: ignore[arg-type]
        )
    )
    return server


_clients: list[trio.SocketStream] = []


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    """Every client socket a test opens is closed when it ends, pass or fail.

    Being async and autouse, it makes every test in this module a trio test.
    """
    yield
    while _clients:
        await trio.aclose_forcefully(_clients.pop())


async def connect(server: Server, name: str = "smtp", family: int = 4) -> trio.SocketStream:
    host, port = next((h, p) for h, p in server.addresses[name] if (":" in h) == (family == 6))
    stream = await trio.open_tcp_stream(host, port)
    _clients.append(stream)
    return stream


async def test_binds_ipv4_and_ipv6_and_reports_the_addresses(nursery: trio.Nursery) -> None:
    server = await start(nursery, settings())
    hosts = sorted(h for h, _ in server.addresses["smtp"])
    assert hosts == ["127.0.0.1", "::1"]
    assert all(port > 0 for _, port in server.addresses["smtp"])
    for family in (4, 6):
        stream = await connect(server, family=family)
        await stream.send_all(encode_v2(Command.PROXY, CLIENT, SERVER) + b"EHLO x\r\n")
        assert await read_reply(stream) == b"220 198.51.100.7 40123\r\n"
        assert await read_reply(stream) == b"250 EHLO x\r\n"
        await stream.aclose()
    nursery.cancel_scope.cancel()


async def test_direct_connection_from_an_untrusted_listener(nursery: trio.Nursery) -> None:
    conf = settings(listener(override_proxy_trusted_networks=TrustedNetworks([])))
    server = await start(nursery, conf)
    stream = await connect(server)
    reply = await read_reply(stream)  # the greeting comes at once: no header is awaited
    assert reply.startswith(b"220 127.0.0.1 ")
    nursery.cancel_scope.cancel()


async def test_a_rejected_header_closes_only_that_connection(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start(nursery, settings())
    bad = await connect(server)
    await bad.send_all(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n")
    assert await bad.receive_some() == b""  # closed, nothing sent
    good = await connect(server)
    await good.send_all(encode_v1(CLIENT, SERVER))
    assert await read_reply(good) == b"220 198.51.100.7 40123\r\n"
    assert server.gate.counters.get("smtp", EventName.REJECTED, "bad_port") == 1
    nursery.cancel_scope.cancel()


async def test_handler_crash_is_isolated(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def flaky(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        await whoami(stream, context)

    server = await start(nursery, settings(), flaky)
    first = await connect(server)
    await first.send_all(encode_v1(CLIENT, SERVER))
    assert await first.receive_some() == b""
    second = await connect(server)
    await second.send_all(encode_v1(CLIENT, SERVER))
    assert await read_reply(second) == b"220 198.51.100.7 40123\r\n"
    crashes = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert crashes and "handler failed" in crashes[0].getMessage()
    assert "198.51.100.7" in crashes[0].getMessage()
    nursery.cancel_scope.cancel()


async def test_per_ip_limit_counts_the_client_not_the_proxy(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def hold(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        await whoami(stream, context)
        await release.wait()

    server = await start(nursery, settings(listener(max_connections_per_ip=1)), hold)
    other = InetAddress(ipaddress.ip_address("198.51.100.8"), 40000)
    a = await connect(server)
    await a.send_all(encode_v1(CLIENT, SERVER))
    assert (await read_reply(a)).startswith(b"220 198.51.100.7")
    # Same proxy, different client: served.
    b = await connect(server)
    await b.send_all(encode_v1(other, SERVER))
    assert (await read_reply(b)).startswith(b"220 198.51.100.8")
    # Same client again through the same proxy: refused with 421.
    c = await connect(server)
    await c.send_all(encode_v1(CLIENT, SERVER))
    assert await read_reply(c) == refusal(
        ListenerProtocol.SMTP, "Too many connections from your address"
    )
    assert await c.receive_some() == b""
    release.set()
    nursery.cancel_scope.cancel()


async def test_listener_limit_refuses_with_421(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def hold(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        await whoami(stream, context)
        await release.wait()

    server = await start(nursery, settings(listener(max_connections=1)), hold)
    a = await connect(server)
    await a.send_all(encode_v1(CLIENT, SERVER))
    await read_reply(a)
    b = await connect(server)
    assert await read_reply(b) == refusal(
        ListenerProtocol.SMTP, "Too many connections, try again later"
    )
    release.set()
    await a.send_all(b"QUIT\r\n")
    assert await read_reply(a) == b"250 QUIT\r\n"
    nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_implicit_tls_reads_the_header_first(nursery: trio.Nursery, ca: trustme.CA) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.example").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    server = await start(nursery, settings(listener(tls=True)), ssl_context=server_ctx)
    raw = await connect(server)
    await raw.send_all(encode_v2(Command.PROXY, CLIENT, SERVER))
    tls = trio.SSLStream(raw, client_ctx, server_hostname="mx.example")
    assert await read_reply(tls) == b"220 198.51.100.7 40123 tls=server\r\n"
    await tls.send_all(b"NOOP\r\n")
    assert await read_reply(tls) == b"250 NOOP\r\n"
    nursery.cancel_scope.cancel()


async def test_graceful_shutdown_lets_sessions_finish(nursery: trio.Nursery) -> None:
    finished = trio.Event()

    async def slow(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        await whoami(stream, context)
        finished.set()

    server = await start(nursery, settings())
    server.handlers = {ListenerProtocol.SMTP: slow}
    stream = await connect(server)
    await stream.send_all(encode_v1(CLIENT, SERVER))
    await read_reply(stream)
    server.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(OSError, match="connect"):
        await connect(server)  # no longer accepting
    await stream.send_all(b"DATA done\r\n")  # the open session still completes
    assert await read_reply(stream) == b"250 DATA done\r\n"
    await finished.wait()


async def test_drain_deadline_cancels_stragglers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cancelled = trio.Event()

    async def forever(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        await whoami(stream, context)
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with trio.open_nursery() as nursery:
        server = await start(nursery, settings(), forever, drain_timeout=0)
        stream = await connect(server)
        await stream.send_all(encode_v1(CLIENT, SERVER) + b"x\r\n")
        await read_reply(stream)
        await read_reply(stream)
        server.shutdown()
    # serve() returned by itself: the straggler was cancelled at the (zero) drain deadline.
    assert cancelled.is_set()
    assert await stream.receive_some() == b""
    # Cancellation is the server ending a session, not a failure: trio.Cancelled must pass the
    # handler's error logging untouched.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_reload_keeps_old_settings_on_a_bad_file(
    nursery: trio.Nursery, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[SystemSettings]\nproxyTrustedNetworks = ['10.0.0.300/8']\n")
    server = await start(nursery, settings())
    before = server.settings
    assert server.reload_from(path) is False
    assert server.settings is before and server.gate.settings is before
    assert "10.0.0.300/8" in caplog.text
    nursery.cancel_scope.cancel()


async def test_tls_listener_needs_an_ssl_context() -> None:
    with pytest.raises(ValueError, match="tls = true but no ssl_context"):
        Server(settings=settings(listener(tls=True)), handlers={ListenerProtocol.SMTP: whoami})


async def test_every_protocol_needs_a_handler() -> None:
    with pytest.raises(ValueError, match="no handler for"):
        Server(settings=settings(), handlers={})


@pytest.mark.parametrize(
    ("protocol", "start_"),
    [
        (ListenerProtocol.SMTP, b"421 4.7.0 "),
        (ListenerProtocol.IMAP, b"* BYE "),
        (ListenerProtocol.HTTP, b"HTTP/1.1 503 "),
    ],
)
async def test_refusals_speak_the_protocol(protocol: ListenerProtocol, start_: bytes) -> None:
    assert refusal(protocol, "busy").startswith(start_)


# -- the on_connect hook --------------------------------------------------------------------------


@attrs.define
class Refuse(BaseHooks):
    """Refuses the client ``who`` with ``verdict``; records every context it is asked about."""

    who: str
    verdict: Verdict
    seen: list[ConnectionContext] = attrs.field(factory=list)

    async def on_connect(self, context: ConnectionContext) -> Verdict:
        self.seen.append(context)
        if str(context.client_ip) == self.who:
            return self.verdict
        return Verdict.accept()


async def start_protocol(
    nursery: trio.Nursery, protocol: ListenerProtocol, hooks: Hooks, handler: Handler = whoami
) -> Server:
    conf = settings(
        NetworkListener(
            name="edge",
            protocol=protocol,
            bind=(BindAddress.parse("127.0.0.1:0"), BindAddress.parse("[::1]:0")),
        )
    )
    server: Server = await nursery.start(
        functools.partial(serve, conf, {protocol: handler}, hooks=hooks)
    )
    return server


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


@pytest.mark.parametrize(
    ("protocol", "verdict", "expected"),
    [
        (ListenerProtocol.SMTP, Verdict.tempfail("slow down"), b"421 4.7.0 slow down\r\n"),
        (ListenerProtocol.SMTP, Verdict.reject("go away"), b"554 5.7.1 go away\r\n"),
        (
            ListenerProtocol.SMTP,
            Verdict.tempfail("banned until 2030-01-01T00:00:00Z"),
            b"421 4.7.0 banned until 2030-01-01T00:00:00Z\r\n",
        ),
        (ListenerProtocol.IMAP, Verdict.tempfail("slow down"), b"* BYE slow down\r\n"),
        (ListenerProtocol.IMAP, Verdict.reject("go away"), b"* BYE go away\r\n"),
    ],
)
async def test_on_connect_refusals_over_real_sockets(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    protocol: ListenerProtocol,
    verdict: Verdict,
    expected: bytes,
) -> None:
    hooks = Refuse("198.51.100.7", verdict)
    server = await start_protocol(nursery, protocol, hooks)
    refused = await connect(server, "edge")
    await refused.send_all(encode_v1(CLIENT, SERVER))
    # The refusal, then the connection is closed: the handler never ran.
    assert await read_all(refused) == expected
    # Another client behind the same proxy is served.
    other = await connect(server, "edge", family=6)
    await other.send_all(encode_v1(InetAddress(ipaddress.ip_address("198.51.100.8"), 1), SERVER))
    assert await read_reply(other) == b"220 198.51.100.8 1\r\n"
    # The hook saw the recovered clients, not the proxy.
    assert [str(c.client_ip) for c in hooks.seen] == ["198.51.100.7", "198.51.100.8"]
    [record] = [r for r in caplog.records if "on_connect refused" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "client=198.51.100.7:40123 via=127.0.0.1:" in record.getMessage()
    assert f"{verdict.action.value} {verdict.reason}" in record.getMessage()
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("verdict", "status_line"),
    [
        (Verdict.tempfail("later"), b"HTTP/1.1 503 Service Unavailable\r\n"),
        (Verdict.reject("no"), b"HTTP/1.1 403 Forbidden\r\n"),
    ],
)
async def test_on_connect_refusals_over_http(
    nursery: trio.Nursery, verdict: Verdict, status_line: bytes
) -> None:
    server = await start_protocol(nursery, ListenerProtocol.HTTP, Refuse("198.51.100.7", verdict))
    stream = await connect(server, "edge")
    await stream.send_all(encode_v1(CLIENT, SERVER) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    response = await read_all(stream)
    assert response.startswith(status_line)
    assert response.endswith(f"\r\n\r\n{verdict.reason}\n".encode())
    nursery.cancel_scope.cancel()


async def test_a_failing_hook_refuses_for_now(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(BaseHooks):
        async def on_connect(self, context: ConnectionContext) -> Verdict:
            raise RuntimeError("store unreachable")

    server = await start(nursery, settings(), hooks=Broken())
    stream = await connect(server)
    await stream.send_all(encode_v1(CLIENT, SERVER))
    assert await read_all(stream) == (
        b"421 4.3.0 Service temporarily unavailable, try again later\r\n"
    )
    [crash] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "on_connect failed" in crash.getMessage()
    assert crash.exc_info is not None
    nursery.cancel_scope.cancel()


async def test_a_hung_hook_is_bounded(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Hung(BaseHooks):
        async def on_connect(self, context: ConnectionContext) -> Verdict:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    monkeypatch.setattr(server_module, "ON_CONNECT_TIMEOUT", 0.05)
    server = await start(nursery, settings(), hooks=Hung())
    stream = await connect(server)
    await stream.send_all(encode_v1(CLIENT, SERVER))
    assert (await read_all(stream)).startswith(b"421 4.3.0 ")
    assert "on_connect took over 0.05 s" in caplog.text
    nursery.cancel_scope.cancel()


async def test_rate_limits_count_each_client_behind_the_proxy(nursery: trio.Nursery) -> None:
    conf = settings(listener(rate_limit_connections=RateLimit.parse("1/1d")))
    server = await start(nursery, conf, hooks=RateLimitHooks(lambda: conf))
    first = await connect(server)
    await first.send_all(encode_v1(CLIENT, SERVER))
    assert await read_reply(first) == b"220 198.51.100.7 40123\r\n"
    again = await connect(server)
    await again.send_all(encode_v1(CLIENT, SERVER))
    assert await read_all(again) == (
        b"421 4.7.0 Too many connections from your network, try later\r\n"
    )
    # Same proxy, another client: its own budget.
    other = await connect(server)
    await other.send_all(encode_v1(InetAddress(ipaddress.ip_address("198.51.100.8"), 1), SERVER))
    assert await read_reply(other) == b"220 198.51.100.8 1\r\n"
    # The proxy's health checks are never counted.
    for _ in range(3):
        check = await connect(server)
        await check.send_all(encode_v2(Command.LOCAL))
        assert (await read_reply(check)).startswith(b"220 127.0.0.1 ")
    nursery.cancel_scope.cancel()


async def test_a_banned_client_is_refused_and_its_proxy_is_not(nursery: trio.Nursery) -> None:
    conf = attrs.evolve(settings(), auto_ban=AutoBanSettings(failures=1))
    autoban = AutoBan(lambda: conf)
    await autoban.record_failure(CLIENT.ip, "failed login")
    # A proxy's failures are never counted: it stays servable.
    await autoban.record_failure(ipaddress.ip_address("127.0.0.1"), "failed login")
    server = await start(nursery, conf, hooks=HookChain([autoban]))
    banned = await connect(server)
    await banned.send_all(encode_v1(CLIENT, SERVER))
    reply = await read_all(banned)
    assert reply.startswith(b"421 4.7.0 banned until ") and reply.endswith(b"Z\r\n")
    other = await connect(server)
    await other.send_all(encode_v1(InetAddress(ipaddress.ip_address("198.51.100.8"), 1), SERVER))
    assert await read_reply(other) == b"220 198.51.100.8 1\r\n"
    check = await connect(server)
    await check.send_all(encode_v2(Command.LOCAL))
    assert (await read_reply(check)).startswith(b"220 127.0.0.1 ")
    nursery.cancel_scope.cancel()


async def test_default_hooks_accept_everything(nursery: trio.Nursery) -> None:
    server = await start(nursery, settings())
    assert isinstance(server.hooks, BaseHooks)
    stream = await connect(server)
    await stream.send_all(encode_v1(CLIENT, SERVER))
    assert await read_reply(stream) == b"220 198.51.100.7 40123\r\n"
    nursery.cancel_scope.cancel()


# -- refusal() ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "action", "status", "expected"),
    [
        (ListenerProtocol.SMTP, Action.TEMPFAIL, None, b"421 4.7.0 no\r\n"),
        (ListenerProtocol.SMTP, Action.REJECT, None, b"554 5.7.1 no\r\n"),
        (ListenerProtocol.SMTP, Action.TEMPFAIL, "4.7.28", b"421 4.7.28 no\r\n"),
        (ListenerProtocol.SMTP, Action.REJECT, "5.7.23", b"554 5.7.23 no\r\n"),
        # An enhanced code of the wrong class (or not one at all) is replaced.
        (ListenerProtocol.SMTP, Action.TEMPFAIL, "5.7.1", b"421 4.7.0 no\r\n"),
        (ListenerProtocol.SMTP, Action.REJECT, "4.7.1", b"554 5.7.1 no\r\n"),
        (ListenerProtocol.SMTP, Action.REJECT, "5.7.1 injected", b"554 5.7.1 no\r\n"),
        (ListenerProtocol.IMAP, Action.REJECT, None, b"* BYE no\r\n"),
    ],
)
async def test_refusal_variants(
    protocol: ListenerProtocol, action: Action, status: str | None, expected: bytes
) -> None:
    assert refusal(protocol, "no", action=action, status=status) == expected


async def test_refusal_http_variants() -> None:
    assert refusal(ListenerProtocol.HTTP, "busy") == (
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
        b"Content-Length: 5\r\n\r\nbusy\n"
    )
    assert refusal(ListenerProtocol.HTTP, "no", action=Action.REJECT) == (
        b"HTTP/1.1 403 Forbidden\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
        b"Content-Length: 3\r\n\r\nno\n"
    )


async def test_refusal_text_cannot_end_the_line() -> None:
    assert refusal(ListenerProtocol.SMTP, "a\r\n250 OK\r\n") == b"421 4.7.0 a 250 OK\r\n"
    assert refusal(ListenerProtocol.IMAP, "", action=Action.REJECT) == b"* BYE Refused\r\n"
    assert refusal(ListenerProtocol.SMTP, "\r\n") == b"421 4.7.0 Try again later\r\n"
    with pytest.raises(ValueError, match="not a refusal"):
        refusal(ListenerProtocol.SMTP, "fine", action=Action.ACCEPT)


async def test_tls_terminated_twice_is_diagnosed(
    nursery: trio.Nursery, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy that terminates TLS in front of an implicit-TLS listener: say so, loudly."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.example").configure_cert(server_ctx)
    server = await start(nursery, settings(listener(tls=True)), ssl_context=server_ctx)
    stream = await connect(server)
    ssl_tlv = SSLInfo(client=ClientFlags.SSL, verify=0, version="TLSv1.3")
    await stream.send_all(encode_v2(Command.PROXY, CLIENT, SERVER, ssl=ssl_tlv) + b"EHLO x\r\n")
    assert await stream.receive_some() == b""  # closed: no banner in plaintext
    (record,) = [r for r in caplog.records if r.name == "mailedge.server"]
    assert record.levelno == logging.WARNING
    assert "already terminated the client's TLS" in record.getMessage()
    assert "198.51.100.7" in record.getMessage()
    nursery.cancel_scope.cancel()


async def test_a_reset_during_the_gate_ends_only_that_connection(nursery: trio.Nursery) -> None:
    server = await start(nursery, settings())
    doomed = await connect(server)
    await doomed.send_all(b"PROXY TCP4 198.51.")
    # SO_LINGER 0 makes close() send a RST instead of a FIN.
    doomed.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    doomed.socket.close()
    await trio.testing.wait_all_tasks_blocked()
    good = await connect(server)
    await good.send_all(encode_v1(CLIENT, SERVER))
    assert await read_reply(good) == b"220 198.51.100.7 40123\r\n"
    nursery.cancel_scope.cancel()


async def test_a_peer_that_stops_reading_is_cut_at_the_idle_timeout(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailedge")
    ended = trio.Event()

    async def flood(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        try:
            while True:  # more than any socket buffer holds; ends only by the timeout
                await stream.send_all(b"x" * 65536)
        finally:
            ended.set()

    # A short idle timeout, so that the test waits for it briefly; the client never reads.
    server = await start(nursery, settings(listener(idle_timeout=0.2)), flood)
    stream = await connect(server)
    await stream.send_all(encode_v1(CLIENT, SERVER))
    with trio.fail_after(10):
        await ended.wait()
    assert "timed out (the peer stopped reading)" in caplog.text
    nursery.cancel_scope.cancel()


async def test_the_short_spellings_serve(nursery: trio.Nursery) -> None:
    """Settings and handlers written as text, as docs/embedding.md writes them."""
    conf = Settings(
        system=SystemSettings(proxy_trusted_networks=["127.0.0.0/8"]),
        listeners=[NetworkListener(name="smtp", protocol="smtp", bind="127.0.0.1:0")],
    )
    server: Server = await nursery.start(serve, conf, {"smtp": whoami})
    stream = await connect(server)
    await stream.send_all(encode_v1(CLIENT, SERVER) + b"EHLO x\r\n")
    assert await read_reply(stream) == b"220 198.51.100.7 40123\r\n"
    nursery.cancel_scope.cancel()


async def test_a_protocol_without_a_handler_is_refused() -> None:
    with pytest.raises(ValueError, match="'pop3' is not a valid ListenerProtocol"):
        Server(settings=settings(), handlers={"pop3": whoami})


async def test_per_ip_limit_counts_each_ipv4_client_behind_an_operators_nat64_prefix(
    nursery: trio.Nursery,
) -> None:
    release = trio.Event()

    async def hold(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        await whoami(stream, context)
        await release.wait()

    conf = attrs.evolve(
        settings(listener(max_connections_per_ip=1)),
        system=SystemSettings(
            proxy_trusted_networks=["127.0.0.0/8", "::1"], nat64_prefixes=["2001:db8:64::/96"]
        ),
    )
    server = await start(nursery, conf, hold)
    server_address = InetAddress(ipaddress.ip_address("2001:db8::25"), 25)
    replies = []
    # Two IPv4 clients behind the operator's NAT64 (one /64), then the first one again.
    for client in ("2001:db8:64::c633:6407", "2001:db8:64::c633:6408", "2001:db8:64::c633:6407"):
        stream = await connect(server)
        source = InetAddress(ipaddress.ip_address(client), 40000)
        await stream.send_all(encode_v2(Command.PROXY, source, server_address))
        replies.append(await read_reply(stream))
    assert replies[0].startswith(b"220 2001:db8:64::c633:6407")
    assert replies[1].startswith(b"220 2001:db8:64::c633:6408")
    assert replies[2] == refusal(ListenerProtocol.SMTP, "Too many connections from your address")
    release.set()


# -- ending open sessions (a ban) -----------------------------------------------------------------


async def echo_until_ended(stream: trio.abc.Stream, context: ConnectionContext) -> None:
    """Greets, echoes, and answers the server's end of the session with a 421 and its reason."""
    await stream.send_all(f"220 {context.client_ip}\r\n".encode())
    try:
        while data := await stream.receive_some():
            await stream.send_all(data)
    except SessionEnded as exc:
        await stream.send_all(f"421 {exc.reason}\r\n".encode())


def client(ip: str, port: int = 40000) -> InetAddress:
    return InetAddress(ipaddress.ip_address(ip), port)


async def open_session(server: Server, who: InetAddress, name: str = "smtp") -> trio.SocketStream:
    stream = await connect(server, name)
    to = SERVER if who.ip.version == 4 else client("2001:db8::25", 25)
    await stream.send_all(encode_v2(Command.PROXY, who, to))
    assert await read_reply(stream) == f"220 {who.ip}\r\n".encode()
    return stream


async def test_a_ban_ends_every_session_in_its_ipv6_prefix_and_no_other(
    nursery: trio.Nursery,
) -> None:
    conf = attrs.evolve(
        settings(listener("smtp"), listener("submission")),
        auto_ban=AutoBanSettings(failures=1),
    )
    autoban = AutoBan(lambda: conf)
    server = await start(
        nursery,
        conf,
        echo_until_ended,
        hooks=HookChain([autoban]),
    )
    doomed = [
        await open_session(server, client("2001:db8:1:2::1")),
        await open_session(server, client("2001:db8:1:2::2"), "submission"),
        await open_session(server, client("2001:db8:1:2:ffff::9")),
    ]
    spared = [
        await open_session(server, client("2001:db8:1:3::1")),
        await open_session(server, client("198.51.100.8"), "submission"),
    ]
    assert len(server.sessions) == 5
    ban = await autoban.record_failure("2001:db8:1:2::1", "failed login")
    assert ban is not None and ban.key == "2001:db8:1:2::/64"
    # Every session in the /64, on both listeners, is told within a second, and closed.
    with trio.fail_after(1):
        for stream in doomed:
            assert await read_all(stream) == f"421 banned until {ban.until_text}\r\n".encode()
    for stream in spared:
        await stream.send_all(b"still here\r\n")
        assert await read_reply(stream) == b"still here\r\n"
    assert len(server.sessions) == 2
    nursery.cancel_scope.cancel()


async def test_a_ban_on_an_ipv4_client_ends_its_sessions_through_an_operators_nat64(
    nursery: trio.Nursery,
) -> None:
    conf = attrs.evolve(
        settings(listener("smtp")),
        system=SystemSettings(
            proxy_trusted_networks=["127.0.0.0/8", "::1"], nat64_prefixes=["2001:db8:64::/96"]
        ),
        auto_ban=AutoBanSettings(failures=1),
    )
    autoban = AutoBan(lambda: conf)
    server = await start(nursery, conf, echo_until_ended, hooks=HookChain([autoban]))
    doomed = await open_session(server, client("2001:db8:64::c633:6407"))
    spared = await open_session(server, client("2001:db8:64::c633:6408"))
    ban = await autoban.record_failure("2001:db8:64::c633:6407", "failed login")
    assert ban is not None and ban.key == "198.51.100.7"
    with trio.fail_after(1):
        assert await read_all(doomed) == f"421 banned until {ban.until_text}\r\n".encode()
    await spared.send_all(b"still here\r\n")
    assert await read_reply(spared) == b"still here\r\n"
    nursery.cancel_scope.cancel()


async def test_an_ended_session_is_told_even_by_a_handler_that_knows_only_the_idle_timeout(
    nursery: trio.Nursery,
) -> None:
    async def idle_aware(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        await stream.send_all(f"220 {context.client_ip}\r\n".encode())
        try:
            await stream.receive_some()
        except trio.TooSlowError:
            await stream.send_all(b"421 timed out\r\n")

    server = await start(nursery, settings(), idle_aware)
    stream = await open_session(server, CLIENT)
    with trio.fail_after(1):
        assert server.sessions.end(CLIENT.ip, "banned") == 1
        assert await read_all(stream) == b"421 timed out\r\n"
    nursery.cancel_scope.cancel()


async def test_an_ended_session_that_does_not_finish_is_cancelled_after_the_grace(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailedge.server")

    async def stubborn(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        await stream.send_all(f"220 {context.client_ip}\r\n".encode())
        await trio.sleep_forever()  # never reads, so it is never told

    monkeypatch.setattr(sessions_module, "SESSION_END_GRACE", 0.05)
    server = await start(nursery, settings(), stubborn)
    stream = await open_session(server, CLIENT)
    assert server.sessions.end(ipaddress.ip_network("198.51.100.0/24"), "banned") == 1
    # Ending twice ends nothing more.
    assert server.sessions.end(CLIENT.ip, "banned") == 0
    with trio.fail_after(1):
        assert await read_all(stream) == b""
    assert "ended (banned), cancelled after the grace" in caplog.text
    nursery.cancel_scope.cancel()


async def test_a_session_ended_before_its_handler_gets_the_protocols_goodbye(
    nursery: trio.Nursery,
) -> None:
    class EndsItself(BaseHooks):
        """Ends the session's own client while on_connect runs: the handler must not run."""

        sessions: OpenSessions | None = None

        def on_start(self, sessions: object) -> None:
            assert isinstance(sessions, OpenSessions)
            self.sessions = sessions

        async def on_connect(self, context: ConnectionContext) -> Verdict:
            assert self.sessions is not None
            assert self.sessions.end(context.client_ip, "banned meanwhile") == 1
            return Verdict.accept()

    server = await start(nursery, settings(), hooks=EndsItself())
    stream = await connect(server)
    await stream.send_all(encode_v1(CLIENT, SERVER))
    with trio.fail_after(1):
        assert await read_all(stream) == b"421 4.7.0 banned meanwhile\r\n"
    nursery.cancel_scope.cancel()


async def test_a_refusal_storm_is_logged_in_part_and_counted_in_full(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailedge")
    conf = attrs.evolve(settings(), auto_ban=AutoBanSettings(failures=1))
    autoban = AutoBan(lambda: conf)
    await autoban.record_failure(CLIENT.ip, "failed login")
    server = await start(nursery, conf, hooks=HookChain([autoban]))
    for _ in range(200):
        stream = await connect(server)
        await stream.send_all(encode_v1(CLIENT, SERVER))
        assert (await read_all(stream)).startswith(b"421 4.7.0 banned until ")
        await stream.aclose()
        _clients.remove(stream)
    refusals = [r for r in caplog.records if "on_connect refused" in r.getMessage()]
    assert len(refusals) == LOG_BURST
    assert server.refused["smtp", server_module.Refusal.ON_CONNECT] == 200
    [note] = [r for r in caplog.records if "further ones are counted, not logged" in r.getMessage()]
    assert note.getMessage().startswith("connect.refused listener=smtp reason=on_connect: ")
    nursery.cancel_scope.cancel()


async def test_a_bind_failure_names_the_listener_and_address() -> None:
    taken = trio.socket.socket()
    await taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        conf = settings(
            listener("ok"), listener("mx", bind=(BindAddress.parse(f"127.0.0.1:{port}"),))
        )
        with pytest.raises(mailedge.BindError) as caught:
            await serve(conf, {ListenerProtocol.SMTP: whoami})
    finally:
        taken.close()
    assert caught.value.listener == "mx"
    assert caught.value.address == f"127.0.0.1:{port}"
    assert caught.value.errno == errno.EADDRINUSE
    assert (
        str(caught.value) == f"listener 'mx' cannot bind 127.0.0.1:{port}: Address already in use"
    )


async def test_shutdown_ends_idle_waits_at_once_and_drains_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    said: list[str] = []

    async def handler(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        await stream.send_all(b"220 hi\r\n")
        try:
            with awaiting_command():
                await stream.receive_some()
        except ShuttingDown:
            said.append("goodbye")
            await stream.send_all(b"421 4.3.2 shutting down\r\n")

    async def busy(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        await stream.send_all(b"220 hi\r\n")
        await stream.receive_some()  # not marked idle: mid-transaction
        said.append("finished")
        assert draining()

    caplog.set_level(logging.INFO, "mailedge.server")
    conf = settings(listener("idle"), listener("busy"))
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            functools.partial(serve, conf, {ListenerProtocol.SMTP: handler})
        )
        idle = await connect(server, "idle")
        await idle.send_all(encode_v1(CLIENT, SERVER))
        await read_reply(idle)
        server.handlers = {ListenerProtocol.SMTP: busy}
        working = await connect(server, "busy")
        await working.send_all(encode_v1(CLIENT, SERVER))
        await read_reply(working)
        server.shutdown()
        assert await read_reply(idle) == b"421 4.3.2 shutting down\r\n"
        await trio.testing.wait_all_tasks_blocked()
        assert said == ["goodbye"]
        assert "draining 1 session(s) until " in caplog.text
        await working.send_all(b"DATA\r\n")
    assert said == ["goodbye", "finished"]
    assert caplog.records[-1].getMessage() == "stopped"
