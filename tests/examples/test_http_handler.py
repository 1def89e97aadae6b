"""The example HTTP handler: /whoami, /healthz, /metrics, keep-alive and malformed requests."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import attrs
import h11
import prometheus_client
import pytest
import trio
import trio.testing
from handler_support import handler_session, outcome_when_cancelled
from mailedge_examples.console import Console
from mailedge_examples.http_handler import DEFAULT_MAX_REQUEST_SIZE, HTTPHandler

from mailedge.context import AddressSource, ConnectionContext, TLSTerminator, context_to_json
from mailedge.decisions import DEFAULT_SUBSCRIBER_QUEUE, DecisionRing
from mailedge.events import EventCounters, EventName, GateEvent
from mailedge.hooks.autoban import AutoBan
from mailedge.proxy import (
    TLV,
    ClientFlags,
    Command,
    Family,
    InetAddress,
    SSLInfo,
    TLVType,
    Transport,
    build_header,
)
from mailedge.settings import AutoBanSettings, ListenerProtocol, Settings
from mailedge.streams import IdleTimeoutStream

ip = ipaddress.ip_address


def proxied_ipv4_context() -> ConnectionContext:
    """A client at 198.51.100.7 behind a v1 proxy at 10.0.0.2, no TLS."""
    return ConnectionContext(
        connection_id=41,
        listener="web",
        protocol=ListenerProtocol.HTTP,
        client_ip=ip("198.51.100.7"),
        client_port=40123,
        server_ip=ip("192.0.2.80"),
        server_port=80,
        peer_ip=ip("10.0.0.2"),
        peer_port=55000,
        local_ip=ip("10.0.0.1"),
        local_port=8080,
        proxied=True,
        address_source=AddressSource.HEADER,
        header=build_header(
            version=1,
            command=Command.PROXY,
            family=Family.INET,
            transport=Transport.STREAM,
            source=InetAddress(ip("198.51.100.7"), 40123),
            destination=InetAddress(ip("192.0.2.80"), 80),
        ),
    )


PROXIED_IPV4_JSON = {
    "connection_id": 41,
    "listener": "web",
    "protocol": "http",
    "client_ip": "198.51.100.7",
    "client_port": 40123,
    "client_known": True,
    "address_source": "header",
    "server_ip": "192.0.2.80",
    "server_port": 80,
    "peer_ip": "10.0.0.2",
    "peer_port": 55000,
    "local_ip": "10.0.0.1",
    "local_port": 8080,
    "proxied": True,
    "proxy_version": 1,
    "unique_id": None,
    "tls": False,
    "tls_terminated_by": None,
    "tls_version": None,
    "tls_cipher": None,
    "sni": None,
    "alpn": None,
    "client_cert_cn": None,
    "client_cert_verified": False,
}


def direct_ipv6_context() -> ConnectionContext:
    """A direct IPv6 client: the socket peer is the client."""
    return ConnectionContext(
        connection_id=42,
        listener="web6",
        protocol=ListenerProtocol.HTTP,
        client_ip=ip("2001:db8::7"),
        client_port=51234,
        server_ip=ip("2001:db8::80"),
        server_port=8080,
        peer_ip=ip("2001:db8::7"),
        peer_port=51234,
        local_ip=ip("2001:db8::80"),
        local_port=8080,
        proxied=False,
        address_source=AddressSource.SOCKET,
    )


DIRECT_IPV6_JSON = {
    "connection_id": 42,
    "listener": "web6",
    "protocol": "http",
    "client_ip": "2001:db8::7",
    "client_port": 51234,
    "client_known": True,
    "address_source": "socket",
    "server_ip": "2001:db8::80",
    "server_port": 8080,
    "peer_ip": "2001:db8::7",
    "peer_port": 51234,
    "local_ip": "2001:db8::80",
    "local_port": 8080,
    "proxied": False,
    "proxy_version": None,
    "unique_id": None,
    "tls": False,
    "tls_terminated_by": None,
    "tls_version": None,
    "tls_cipher": None,
    "sni": None,
    "alpn": None,
    "client_cert_cn": None,
    "client_cert_verified": False,
}


def proxy_tls_context() -> ConnectionContext:
    """A client whose TLS (with a verified certificate) a v2 proxy terminated."""
    ssl_info = SSLInfo(
        client=ClientFlags.SSL | ClientFlags.CERT_CONN,
        verify=0,
        version="TLSv1.3",
        cn="alice",
        cipher="TLS_AES_256_GCM_SHA384",
    )
    header = build_header(
        version=2,
        command=Command.PROXY,
        family=Family.INET6,
        transport=Transport.STREAM,
        source=InetAddress(ip("2001:db8::7"), 51234),
        destination=InetAddress(ip("2001:db8::443"), 443),
        tlvs=(
            TLV(TLVType.ALPN, b"http/1.1"),
            TLV(TLVType.AUTHORITY, b"mail.example"),
            TLV(TLVType.UNIQUE_ID, b"\x00\x01\xfe\xff"),
        ),
        ssl=ssl_info,
    )
    return ConnectionContext(
        connection_id=43,
        listener="web-tls",
        protocol=ListenerProtocol.HTTP,
        client_ip=ip("2001:db8::7"),
        client_port=51234,
        server_ip=ip("2001:db8::443"),
        server_port=443,
        peer_ip=ip("10.0.0.2"),
        peer_port=55001,
        local_ip=ip("10.0.0.1"),
        local_port=8443,
        proxied=True,
        address_source=AddressSource.HEADER,
        tls=True,
        tls_terminated_by=TLSTerminator.PROXY,
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        sni="mail.example",
        alpn="http/1.1",
        client_cert_cn="alice",
        client_cert_verified=True,
        header=header,
    )


PROXY_TLS_JSON = {
    "connection_id": 43,
    "listener": "web-tls",
    "protocol": "http",
    "client_ip": "2001:db8::7",
    "client_port": 51234,
    "client_known": True,
    "address_source": "header",
    "server_ip": "2001:db8::443",
    "server_port": 443,
    "peer_ip": "10.0.0.2",
    "peer_port": 55001,
    "local_ip": "10.0.0.1",
    "local_port": 8443,
    "proxied": True,
    "proxy_version": 2,
    "unique_id": "0001feff",
    "tls": True,
    "tls_terminated_by": "proxy",
    "tls_version": "TLSv1.3",
    "tls_cipher": "TLS_AES_256_GCM_SHA384",
    "sni": "mail.example",
    "alpn": "http/1.1",
    "client_cert_cn": "alice",
    "client_cert_verified": True,
}


@attrs.frozen
class Response:
    status: int
    reason: str
    # Lower-cased names; a repeated header keeps its last value.
    headers: dict[str, str]
    body: bytes


@attrs.define
class Client:
    """Raw HTTP/1.1 bytes out; a deliberately simple response parser in."""

    stream: trio.abc.Stream
    buffer: bytearray = attrs.field(factory=bytearray)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        data = await self.stream.receive_some()
        assert data, f"connection closed; unparsed {bytes(self.buffer)!r}"
        self.buffer += data

    async def response(self, *, head: bool = False) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        raw, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer[:] = rest
        status_line, *header_lines = raw.decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head else int(headers["content-length"])
        while len(self.buffer) < length:
            await self._fill()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return Response(int(status), reason, headers, body)

    async def get(self, target: str, *extra: str, method: str = "GET") -> Response:
        lines = [f"{method} {target} HTTP/1.1", "Host: edge.example", *extra, "", ""]
        await self.send("\r\n".join(lines).encode())
        return await self.response(head=method == "HEAD")

    async def closed(self) -> bool:
        """True when the server closed the connection with nothing more to say."""
        data = await self.stream.receive_some()
        return not data and not self.buffer


@asynccontextmanager
async def session(
    handler: HTTPHandler, context: ConnectionContext, *, idle_timeout: float | None = None
) -> AsyncIterator[Client]:
    """The client's side of one in-memory session with ``handler`` (see handler_session)."""
    async with handler_session(handler, context, idle_timeout=idle_timeout) as stream:
        yield Client(stream)


# /whoami


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        (proxied_ipv4_context(), PROXIED_IPV4_JSON),
        (direct_ipv6_context(), DIRECT_IPV6_JSON),
        (proxy_tls_context(), PROXY_TLS_JSON),
    ],
    ids=["proxied-ipv4", "direct-ipv6", "tls-via-proxy"],
)
async def test_whoami_reports_the_context(
    autojump_clock: trio.testing.MockClock, context: ConnectionContext, expected: dict[str, object]
) -> None:
    async with session(HTTPHandler(), context) as client:
        response = await client.get("/whoami")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.body) == expected
    assert context_to_json(context) == expected


async def test_whoami_ignores_forwarding_headers(autojump_clock: trio.testing.MockClock) -> None:
    async with session(HTTPHandler(), proxied_ipv4_context()) as client:
        response = await client.get(
            "/whoami",
            "X-Forwarded-For: 203.0.113.9",
            "X-Real-IP: 203.0.113.9",
            "Forwarded: for=203.0.113.9;proto=https",
        )
    assert json.loads(response.body) == PROXIED_IPV4_JSON
    assert b"203.0.113.9" not in response.body


async def test_whoami_of_a_proxy_health_check(autojump_clock: trio.testing.MockClock) -> None:
    # A LOCAL header: no client; the socket endpoints stand in and client_known says so.
    context = attrs.evolve(
        proxied_ipv4_context(),
        client_ip=ip("10.0.0.2"),
        client_port=55000,
        address_source=AddressSource.PROXY_LOCAL,
        header=None,
    )
    async with session(HTTPHandler(), context) as client:
        body = json.loads((await client.get("/whoami")).body)
    assert (body["client_ip"], body["client_known"], body["address_source"]) == (
        "10.0.0.2",
        False,
        "proxy_local",
    )


# /healthz, 404, 405, HEAD


async def test_healthz(autojump_clock: trio.testing.MockClock) -> None:
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        response = await client.get("/healthz")
        with_query = await client.get("/healthz?verbose=1")
    assert (response.status, response.body) == (200, b"ok")
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["server"] == "mailedge-example"
    assert "date" in response.headers
    assert (with_query.status, with_query.body) == (200, b"ok")


async def test_server_header_is_configurable(autojump_clock: trio.testing.MockClock) -> None:
    async with session(HTTPHandler(server_name="edge/1"), direct_ipv6_context()) as client:
        assert (await client.get("/healthz")).headers["server"] == "edge/1"


@pytest.mark.parametrize("target", ["/", "/nope", "/whoami/", "/whoamix", "/HEALTHZ"])
async def test_unknown_paths_are_404(autojump_clock: trio.testing.MockClock, target: str) -> None:
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        assert (await client.get(target)).status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"])
async def test_other_methods_are_405(autojump_clock: trio.testing.MockClock, method: str) -> None:
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        response = await client.get("/whoami", method=method)
        assert response.status == 405
        assert response.headers["allow"] == "GET, HEAD"
        # The connection stays usable.
        assert (await client.get("/healthz")).status == 200


async def test_a_request_body_is_drained_for_keep_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        await client.send(
            b"POST /whoami HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nGET /nope\r\n"
        )
        assert (await client.response()).status == 405
        # Those eleven bytes were a body, not a request.
        assert (await client.get("/healthz")).status == 200


async def test_an_oversized_body_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    size = DEFAULT_MAX_REQUEST_SIZE + 1
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        await client.send(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
        )
        response = await client.response()
        assert response.status == 413
        assert response.headers["connection"] == "close"
        assert await client.closed()


async def test_expect_100_continue_is_answered_without_the_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        await client.send(
            b"POST /whoami HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        response = await client.response()
        assert response.status == 405
        assert response.headers["connection"] == "close"
        assert await client.closed()


async def test_head(autojump_clock: trio.testing.MockClock) -> None:
    async with session(HTTPHandler(), proxied_ipv4_context()) as client:
        get = await client.get("/whoami")
        head = await client.get("/whoami", method="HEAD")
        # No body followed the HEAD response: the next response parses cleanly.
        after = await client.get("/healthz")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == str(len(get.body))
    assert after.body == b"ok"


# /metrics


def fake_counters() -> Iterable[tuple[tuple[str, str, str], int]]:
    return [
        (("imap", "proxy.rejected", "v1_syntax"), 1),
        (("smtp", "proxy.accepted", "header"), 2),
    ]


async def test_metrics_exposes_the_gate_counters(autojump_clock: trio.testing.MockClock) -> None:
    async with session(HTTPHandler(counters_source=fake_counters), direct_ipv6_context()) as client:
        response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    lines = response.body.decode().splitlines()
    assert "# TYPE mailedge_gate_decisions_total counter" in lines
    assert (
        'mailedge_gate_decisions_total{event="proxy.accepted",listener="smtp",reason="header"} 2.0'
        in lines
    )
    rejected = '{event="proxy.rejected",listener="imap",reason="v1_syntax"}'
    assert f"mailedge_gate_decisions_total{rejected} 1.0" in lines


async def test_metrics_are_read_at_scrape_time(autojump_clock: trio.testing.MockClock) -> None:
    counters = EventCounters()

    def accepted() -> GateEvent:
        return GateEvent(
            name=EventName.ACCEPTED,
            listener="smtp",
            connection_id=1,
            peer_ip=ip("10.0.0.2"),
            peer_port=55000,
            reason="header",
            message="accepted",
            elapsed=0.0,
        )

    handler = HTTPHandler(counters_source=lambda: counters)
    sample = 'mailedge_gate_decisions_total{event="proxy.accepted",listener="smtp",reason="header"}'
    async with session(handler, direct_ipv6_context()) as client:
        counters.add(accepted())
        first = (await client.get("/metrics")).body.decode().splitlines()
        counters.add(accepted())
        second = (await client.get("/metrics")).body.decode().splitlines()
    assert f"{sample} 1.0" in first
    assert f"{sample} 2.0" in second


async def test_metrics_without_a_source(autojump_clock: trio.testing.MockClock) -> None:
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        body = (await client.get("/metrics")).body.decode()
    assert "# TYPE mailedge_gate_decisions_total counter" in body
    assert "mailedge_gate_decisions_total{" not in body


def test_each_handler_owns_its_registry() -> None:
    # Two handlers in one process must not collide, and the global registry stays untouched.
    first, second = HTTPHandler(), HTTPHandler(counters_source=fake_counters)
    assert first.registry is not second.registry
    assert b"mailedge_gate_decisions" not in prometheus_client.generate_latest()


# Keep-alive and connection close


async def test_keep_alive_serves_several_requests(autojump_clock: trio.testing.MockClock) -> None:
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        first = await client.get("/healthz")
        second = await client.get("/whoami")
        assert "connection" not in first.headers
        assert (first.status, second.status) == (200, 200)
        # Pipelined: two requests in one write, two responses in order.
        await client.send(
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert (await client.response()).status == 404
        assert (await client.response()).status == 200


async def test_connection_close_is_honoured(autojump_clock: trio.testing.MockClock) -> None:
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        assert (await client.get("/healthz")).status == 200
        response = await client.get("/healthz", "Connection: close")
        assert response.headers["connection"] == "close"
        assert await client.closed()


async def test_http_1_0_closes_after_the_response(autojump_clock: trio.testing.MockClock) -> None:
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        await client.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert (await client.response()).body == b"ok"
        assert await client.closed()


async def test_an_idle_keep_alive_connection_closes_quietly(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailedge.examples.http")
    async with session(HTTPHandler(), direct_ipv6_context(), idle_timeout=30) as client:
        assert (await client.get("/healthz")).status == 200
        start = trio.current_time()
        assert await client.closed()
        assert trio.current_time() - start == pytest.approx(30)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


async def test_a_timeout_inside_a_request_is_the_servers_to_report(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    with pytest.raises(trio.TooSlowError):
        await HTTPHandler()(IdleTimeoutStream(server_stream, 30), direct_ipv6_context())


# Malformed requests, limits and disconnects


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # HTTP/1.1 requires Host
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS on a plaintext port
        # Broken while reading the body, after the request head was accepted.
        b"POST /whoami HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_malformed_request_is_400_and_closes(
    autojump_clock: trio.testing.MockClock, request_bytes: bytes
) -> None:
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        await client.send(request_bytes)
        response = await client.response()
        assert response.status == 400
        assert response.headers["connection"] == "close"
        assert await client.closed()


async def test_an_oversized_request_head_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        await client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000)
        response = await client.response()
        assert response.status == 431
        assert await client.closed()


async def test_the_request_size_limit_is_configurable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # h11 applies the limit to what it buffers between reads, so exceed it by more than one read.
    cookie = b"Cookie: " + b"c" * 10_000 + b"\r\n"
    async with session(HTTPHandler(max_request_size=1024), direct_ipv6_context()) as client:
        await client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + cookie + b"\r\n")
        assert (await client.response()).status == 431


@pytest.mark.parametrize("sent", [b"", b"GET /heal", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"])
async def test_client_vanishing_is_quiet(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        await client.send(sent)
        await client.stream.aclose()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_cancellation_propagates(autojump_clock: trio.testing.MockClock) -> None:
    async def exchange(stream: trio.abc.Stream) -> None:
        assert (await Client(stream).get("/healthz")).status == 200

    outcome = await outcome_when_cancelled(HTTPHandler(), direct_ipv6_context(), exchange)
    assert outcome == "cancelled"


# /admin/bans


def loopback_context(address: str = "127.0.0.1") -> ConnectionContext:
    """A direct connection from a loopback address: the only kind the admin routes serve."""
    return attrs.evolve(
        direct_ipv6_context(), client_ip=ip(address), peer_ip=ip(address), local_ip=ip(address)
    )


async def admin_autoban() -> AutoBan:
    conf = Settings(auto_ban=AutoBanSettings(failures=1, window=60.0, duration=600.0))
    autoban = AutoBan(lambda: conf, wall_clock=lambda: 1_700_000_000.0)
    await autoban.record_failure("198.51.100.7", "failed login")
    await autoban.record_failure("2001:db8:1:2::5", "bad commands")
    return autoban


async def admin(
    client: Client,
    target: str,
    *extra: str,
    method: str = "GET",
    host: str = "127.0.0.1:2080",
) -> Response:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *extra, "", ""]
    await client.send("\r\n".join(lines).encode())
    return await client.response(head=method == "HEAD")


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.53", "::1"])
async def test_admin_lists_and_lifts_bans(
    autojump_clock: trio.testing.MockClock, address: str
) -> None:
    autoban = await admin_autoban()
    handler = HTTPHandler(autoban=autoban)
    async with session(handler, loopback_context(address)) as client:
        listed = await admin(client, "/admin/bans")
        assert listed.status == 200
        assert listed.headers["content-type"] == "application/json"
        assert json.loads(listed.body) == [
            {
                "key": "198.51.100.7",
                "until": "2023-11-14T22:23:20Z",
                "remaining": 600.0,
                "reason": "failed login",
                "failures": 1,
            },
            {
                "key": "2001:db8:1:2::/64",
                "until": "2023-11-14T22:23:20Z",
                "remaining": 600.0,
                "reason": "bad commands",
                "failures": 1,
            },
        ]
        lifted = await admin(client, "/admin/bans/lift?ip=198.51.100.7", method="POST")
        assert (lifted.status, json.loads(lifted.body)) == (
            200,
            {"ip": "198.51.100.7", "lifted": True},
        )
        again = await admin(client, "/admin/bans/lift?ip=198.51.100.7", method="POST")
        assert (again.status, json.loads(again.body)["lifted"]) == (404, False)
        by_network = await admin(client, "/admin/bans/lift?ip=2001:db8:1:2::/64", method="POST")
        assert by_network.status == 200
        assert json.loads((await admin(client, "/admin/bans")).body) == []
    assert await autoban.bans() == []


@pytest.mark.parametrize(
    "context",
    [
        # A proxied request whose header claims a loopback client: the header is no proof.
        attrs.evolve(proxied_ipv4_context(), client_ip=ip("127.0.0.1"), peer_ip=ip("127.0.0.1")),
        # A proxy on loopback speaking for another client.
        attrs.evolve(proxied_ipv4_context(), peer_ip=ip("127.0.0.1")),
        # A proxy's health check (LOCAL): its address stands in for a client that is not there.
        attrs.evolve(loopback_context(), proxied=True, address_source=AddressSource.PROXY_LOCAL),
        # Direct, but not from loopback.
        direct_ipv6_context(),
    ],
    ids=["proxied-claims-loopback", "proxied-via-loopback", "proxy-local", "direct-remote"],
)
async def test_admin_is_loopback_direct_only(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    context: ConnectionContext,
) -> None:
    autoban = await admin_autoban()
    async with session(HTTPHandler(autoban=autoban), context) as client:
        assert (await admin(client, "/admin/bans")).status == 403
        lift = await admin(client, "/admin/bans/lift?ip=198.51.100.7", method="POST")
        assert lift.status == 403
        assert (await admin(client, "/admin/nope")).status == 403
    assert len(await autoban.bans()) == 2
    assert "admin request refused" in caplog.text


@pytest.mark.parametrize(
    ("extra", "host"),
    [
        (("Origin: https://evil.example",), "127.0.0.1:2080"),
        ((), "evil.example"),
        ((), "127.0.0.1.evil.example:2080"),
    ],
)
async def test_admin_refuses_what_a_browser_page_could_send(
    autojump_clock: trio.testing.MockClock, extra: tuple[str, ...], host: str
) -> None:
    autoban = await admin_autoban()
    async with session(HTTPHandler(autoban=autoban), loopback_context()) as client:
        response = await admin(
            client, "/admin/bans/lift?ip=198.51.100.7", *extra, method="POST", host=host
        )
        assert response.status == 403
    assert len(await autoban.bans()) == 2


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:8080", "[::1]:2080", "127.0.0.1"])
async def test_admin_accepts_loopback_host_names(
    autojump_clock: trio.testing.MockClock, host: str
) -> None:
    autoban = await admin_autoban()
    async with session(HTTPHandler(autoban=autoban), loopback_context()) as client:
        assert (await admin(client, "/admin/bans", host=host)).status == 200


async def test_admin_methods_and_errors(autojump_clock: trio.testing.MockClock) -> None:
    autoban = await admin_autoban()
    async with session(HTTPHandler(autoban=autoban), loopback_context()) as client:
        post_list = await admin(client, "/admin/bans", method="POST")
        assert (post_list.status, post_list.headers["allow"]) == (405, "GET, HEAD")
        get_lift = await admin(client, "/admin/bans/lift?ip=198.51.100.7")
        assert (get_lift.status, get_lift.headers["allow"]) == (405, "POST")
        assert (await admin(client, "/admin/bans", method="HEAD")).status == 200
        assert (await admin(client, "/admin/bans/lift", method="POST")).status == 400
        twice = await admin(client, "/admin/bans/lift?ip=1.2.3.4&ip=5.6.7.8", method="POST")
        assert twice.status == 400
        bad = await admin(client, "/admin/bans/lift?ip=not-an-ip", method="POST")
        assert (bad.status, bad.body) == (400, b"'not-an-ip' is not an IP network\n")
        assert (await admin(client, "/admin/other")).status == 404
    assert len(await autoban.bans()) == 2


async def test_admin_without_autoban_is_404(autojump_clock: trio.testing.MockClock) -> None:
    async with session(HTTPHandler(), loopback_context()) as client:
        assert (await admin(client, "/admin/bans")).status == 404
        assert (await admin(client, "/admin/bans/lift?ip=::1", method="POST")).status == 404
    async with session(HTTPHandler(), direct_ipv6_context()) as client:
        assert (await admin(client, "/admin/bans")).status == 403


# The Host check parses uri-host[:port] strictly (RFC 9110 7.2): a loopback name followed by
# anything the grammar does not allow is not a loopback name.
@pytest.mark.parametrize(
    "host",
    [
        "localhost:evil.com",
        "localhost:80@evil.com",
        "localhost@evil.com",
        "localhost:99999",
        "localhost:65536",
        "localhost:123456",
        "local host",
        "localhost:80:80",
        "localhost :80",
        "localhost:+80",
        "localhost/",
        "localhost.",
        "localhost.evil.com",
        "127.0.0.1:80:80",
        "127.0.0.01",
        "[::1]:80:80",
        "[::1]evil.com",
        "[::1%25eth0]",
        "[v1.fe]",
        "[::2]",
        "::1",
        ":80",
        "",
    ],
)
async def test_admin_refuses_a_host_that_only_starts_like_loopback(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, host: str
) -> None:
    autoban = await admin_autoban()
    async with session(HTTPHandler(autoban=autoban), loopback_context()) as client:
        response = await admin(client, "/admin/bans/lift?ip=198.51.100.7", method="POST", host=host)
        assert response.status == 403
    assert len(await autoban.bans()) == 2
    assert f"admin request refused: Host {host!r} is not a loopback name" in caplog.text


@pytest.mark.parametrize(
    "host",
    [
        "[::1]:8080",
        "[0:0:0:0:0:0:0:1]",
        "localhost:65535",
        "localhost:0",
        "localhost:080",
        # An empty port is allowed by RFC 3986's grammar (port = *DIGIT) and names the same
        # host, so it is accepted.
        "localhost:",
        "127.0.0.1:",
    ],
)
async def test_admin_accepts_every_loopback_host_the_grammar_allows(
    autojump_clock: trio.testing.MockClock, host: str
) -> None:
    autoban = await admin_autoban()
    async with session(HTTPHandler(autoban=autoban), loopback_context()) as client:
        assert (await admin(client, "/admin/bans", host=host)).status == 200


async def test_admin_refuses_an_http_10_request_without_host(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    autoban = await admin_autoban()
    async with session(HTTPHandler(autoban=autoban), loopback_context()) as client:
        await client.send(b"GET /admin/bans HTTP/1.0\r\n\r\n")
        assert (await client.response()).status == 403
    assert "admin request refused: 0 Host headers" in caplog.text


# /admin/: the console


def console_handler(**console_args: object) -> tuple[HTTPHandler, Console]:
    console = Console(csrf_token="the-csrf-token", **console_args)  # type: ignore[arg-type]
    return HTTPHandler(autoban=None, console=console), console


ORIGIN = "http://127.0.0.1:2080"


async def test_the_console_page_carries_the_csrf_token_and_loads_nothing_from_elsewhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler, _ = console_handler()
    async with session(handler, loopback_context()) as client:
        page = await admin(client, "/admin/")
        assert page.status == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert b'<meta name="csrf-token" content="the-csrf-token">' in page.body
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        for name in ("console.js", "console.css"):
            static = await admin(client, f"/admin/{name}")
            assert static.status == 200
            assert b"http://" not in static.body and b"https://" not in static.body
        assert b"https://" not in page.body and b"http://" not in page.body
    async with session(handler, direct_ipv6_context()) as client:
        assert (await admin(client, "/admin/")).status == 403


async def test_the_console_state_lists_nothing_before_the_server_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler, _ = console_handler()
    async with session(handler, loopback_context()) as client:
        state = json.loads((await admin(client, "/admin/api/state")).body)
    assert state["listeners"] == []
    assert state["editable"] == "running on the embedded default settings: there is no file to edit"


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        # The console's own page: same origin, with its token.
        ((f"Origin: {ORIGIN}", "X-CSRF-Token: the-csrf-token"), 404),
        ((f"Referer: {ORIGIN}/admin/", "X-CSRF-Token: the-csrf-token"), 404),
        # Same origin, but no token or a wrong one: another tab's form cannot know it.
        ((f"Origin: {ORIGIN}",), 403),
        ((f"Origin: {ORIGIN}", "X-CSRF-Token: guessed"), 403),
        # Another origin, even with the token.
        (("Origin: http://localhost:2080", "X-CSRF-Token: the-csrf-token"), 403),
        (("Referer: https://evil.example/", "X-CSRF-Token: the-csrf-token"), 403),
        (("Origin: null", "X-CSRF-Token: the-csrf-token"), 403),
        # A browser that hid where it came from, but sends its cookies: treated as a browser.
        (("Cookie: a=b", "X-CSRF-Token: the-csrf-token"), 403),
    ],
)
async def test_a_browser_post_needs_the_consoles_origin_and_its_csrf_token(
    autojump_clock: trio.testing.MockClock, extra: tuple[str, ...], status: int
) -> None:
    handler, _ = console_handler()
    async with session(handler, loopback_context()) as client:
        # 404: past the checks, and no ban to lift (the handler has no auto-ban).
        response = await admin(client, "/admin/bans/lift?ip=::1", *extra, method="POST")
        assert response.status == status


async def test_a_browser_get_from_another_origin_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler, _ = console_handler()
    async with session(handler, loopback_context()) as client:
        assert (await admin(client, "/admin/api/state", f"Origin: {ORIGIN}")).status == 200
        evil = await admin(client, "/admin/api/state", "Origin: https://evil.example")
        assert evil.status == 403


@pytest.mark.parametrize(
    "context",
    [direct_ipv6_context(), proxied_ipv4_context()],
    ids=["direct-remote", "proxied"],
)
async def test_the_admin_token_lets_a_remote_client_in(
    autojump_clock: trio.testing.MockClock, context: ConnectionContext
) -> None:
    token = "a-long-enough-admin-token"
    handler, _ = console_handler(admin_token=token)
    async with session(handler, context) as client:
        bearer = f"Authorization: Bearer {token}"
        assert (await admin(client, "/admin/api/state", bearer, host="mx.example")).status == 200
        wrong = await admin(client, "/admin/api/state", "Authorization: Bearer nope")
        assert wrong.status == 403
        # The page's ?token= sets a cookie; with it, the page's own requests get in, and a
        # POST still needs the origin and the CSRF token (a cookie is sent by any page).
        page = await admin(client, f"/admin/?token={token}", host="mx.example")
        cookie = page.headers["set-cookie"]
        assert cookie.startswith(f"mailedge_admin={token};")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        with_cookie = f"Cookie: mailedge_admin={token}"
        referer = "Referer: http://mx.example/admin/"
        got = await admin(client, "/admin/api/state", with_cookie, referer, host="mx.example")
        assert got.status == 200
        post = await admin(
            client,
            "/admin/bans/lift?ip=::1",
            with_cookie,
            referer,
            method="POST",
            host="mx.example",
        )
        assert post.status == 403
        post = await admin(
            client,
            "/admin/bans/lift?ip=::1",
            with_cookie,
            "Origin: http://mx.example",
            "X-CSRF-Token: the-csrf-token",
            method="POST",
            host="mx.example",
        )
        assert post.status == 404


async def test_editing_is_refused_on_the_embedded_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler, _ = console_handler()
    body = b'{"listener": null, "networks": ["10.0.0.0/8"]}'
    async with session(handler, loopback_context()) as client:
        await client.send(
            b"POST /admin/api/trusted HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        response = await client.response()
        assert response.status == 409
        assert "embedded default" in json.loads(response.body)["message"]
        await client.send(
            b"POST /admin/api/trusted HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n[]"
        )
        assert (await client.response()).status == 400


async def test_the_event_stream_sends_each_new_decision_and_heartbeats(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler, console = console_handler(heartbeat=15.0)
    async with session(handler, loopback_context()) as client:
        await client.send(b"GET /admin/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        while b": connected" not in client.buffer:
            await client._fill()
        head = bytes(client.buffer)
        assert b"Content-Type: text/event-stream" in head
        assert b"Transfer-Encoding: chunked" in head
        console.decisions.record(
            GateEvent(
                name=EventName.TIMEOUT,
                listener="smtp-proxy",
                connection_id=9,
                peer_ip=ip("127.0.0.1"),
                peer_port=5000,
                reason="timeout",
                message="no PROXY header within 5 s",
                elapsed=5.0,
            )
        )
        while b"data: " not in client.buffer:
            await client._fill()
        line = bytes(client.buffer).split(b"data: ", 1)[1].split(b"\n", 1)[0]
        decision = json.loads(line)
        assert (decision["event"], decision["peer"], decision["message"]) == (
            "proxy.timeout",
            "127.0.0.1:5000",
            "no PROXY header within 5 s",
        )
        client.buffer.clear()
        await trio.sleep(15.0)
        while b": heartbeat" not in client.buffer:
            await client._fill()


def gate_event(n: int) -> GateEvent:
    return GateEvent(
        name=EventName.DIRECT,
        listener="smtp",
        connection_id=n,
        peer_ip=ip("192.0.2.1"),
        peer_port=40000 + n,
        reason="untrusted",
        message=f"decision {n}",
        elapsed=0.0,
    )


@attrs.define
class EventStreamClient:
    """A client of ``/admin/events``: h11 undoes the chunked framing, then the server-sent
    events are split into their fields (a comment's text is under the name "")."""

    stream: trio.abc.Stream
    machine: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))
    text: str = ""
    response: h11.Response | None = None

    async def open(self, *headers: tuple[str, str]) -> None:
        request = h11.Request(
            method="GET", target="/admin/events", headers=[("Host", "localhost"), *headers]
        )
        await self.stream.send_all(self.machine.send(request) or b"")
        await self.stream.send_all(self.machine.send(h11.EndOfMessage()) or b"")

    async def _more(self) -> None:
        while True:
            event = self.machine.next_event()
            if event is h11.NEED_DATA:
                self.machine.receive_data(bytes(await self.stream.receive_some()))
            elif isinstance(event, h11.Response):
                self.response = event
            elif isinstance(event, h11.Data):
                self.text += bytes(event.data).decode()
                return
            else:
                raise AssertionError(f"unexpected {event!r}; unparsed {self.text!r}")

    async def block(self) -> dict[str, str]:
        while "\n\n" not in self.text:
            await self._more()
        block, _, self.text = self.text.partition("\n\n")
        fields = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        return fields

    async def events(self, count: int) -> list[dict[str, str]]:
        """The next ``count`` events, comments skipped."""
        found: list[dict[str, str]] = []
        while len(found) < count:
            fields = await self.block()
            if set(fields) != {""}:
                found.append(fields)
        return found


def numbers(events: list[dict[str, str]]) -> list[int]:
    return [json.loads(e["data"])["connection_id"] for e in events]


async def test_the_event_stream_starts_with_the_recent_decisions_each_with_an_id(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The page opens the stream and nothing else: decisions made before it are in it, so
    # none can fall between a list of the recent ones and the stream's start.
    handler, console = console_handler()
    ring = console.decisions
    ring.record(gate_event(1))
    ring.record(gate_event(2))
    async with handler_session(handler, loopback_context()) as stream:
        client = EventStreamClient(stream)
        await client.open()
        backlog = await client.events(2)
        assert [(e["event"], e["id"]) for e in backlog] == [
            ("backlog", f"{ring.epoch}-1"),
            ("backlog", f"{ring.epoch}-2"),
        ]
        assert numbers(backlog) == [1, 2]
        ring.record(gate_event(3))
        [live] = await client.events(1)
        assert live["id"] == f"{ring.epoch}-3" and "event" not in live
        assert numbers([live]) == [3]


@pytest.mark.parametrize(
    ("last_event_id", "expected", "kind", "comment"),
    [
        # A reconnecting page: what came after its last id, nothing twice.
        ("{epoch}-4", [5], None, None),
        ("{epoch}-0", [3, 4, 5], None, "2 decisions were missed"),
        # Decision 2 fell out of the ring (size 3) before the page got it: said so.
        ("{epoch}-1", [3, 4, 5], None, "1 decisions were missed"),
        # Another process's (or an earlier run's) id: this ring's decisions are all new.
        ("0000-4", [3, 4, 5], "backlog", None),
        ("garbage", [3, 4, 5], "backlog", None),
    ],
)
async def test_a_reconnecting_client_resumes_after_its_last_event_id(
    autojump_clock: trio.testing.MockClock,
    last_event_id: str,
    expected: list[int],
    kind: str | None,
    comment: str | None,
) -> None:
    ring = DecisionRing(size=3)
    handler, _ = console_handler(decisions=ring)
    for n in range(1, 6):
        ring.record(gate_event(n))
    async with handler_session(handler, loopback_context()) as stream:
        client = EventStreamClient(stream)
        await client.open(("Last-Event-ID", last_event_id.format(epoch=ring.epoch)))
        assert await client.block() == {"": "connected"}
        if comment is not None:
            assert await client.block() == {"": comment}
        got = await client.events(len(expected))
        assert numbers(got) == expected
        assert all(e.get("event") == kind for e in got)
        ring.record(gate_event(6))
        assert numbers(await client.events(1)) == [6]


async def test_a_client_that_falls_behind_gets_the_rest_from_the_ring(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler, console = console_handler()
    ring = console.decisions
    async with handler_session(handler, loopback_context()) as stream:
        client = EventStreamClient(stream)
        await client.open()
        assert await client.block() == {"": "connected"}
        # More than a subscriber's queue holds, with no checkpoint for the stream to run:
        # its queue drops the newest, and the stream takes them from the ring instead.
        count = DEFAULT_SUBSCRIBER_QUEUE + 44
        for n in range(1, count + 1):
            ring.record(gate_event(n))
        got = await client.events(count)
        assert numbers(got) == list(range(1, count + 1))
        assert [e["id"] for e in got[-2:]] == [f"{ring.epoch}-{count - 1}", f"{ring.epoch}-{count}"]


async def test_metrics_include_the_consoles(autojump_clock: trio.testing.MockClock) -> None:
    console = Console()
    handler = HTTPHandler(autoban=await admin_autoban(), console=console)
    console.decisions.untrusted_peers.add("smtp", "192.0.2.9")
    async with session(handler, direct_ipv6_context()) as client:
        text = (await client.get("/metrics")).body.decode()
    assert "mailedge_bans 2.0" in text
    assert 'mailedge_untrusted_headers_total{listener="smtp",peer="192.0.2.9"} 1.0' in text
