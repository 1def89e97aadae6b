"""Hostile load against the gate and the server layer.

The attacks of docs/resilience.md, each bounded and quick:

- slowloris: hundreds of connections dribbling a header or stalling, all closed at the header
  timeout while a legitimate client is served;
- half-close mid-header: a clean reject, read once, without waiting or spinning;
- floods: no CRLF in 4,000 bytes, a v2 length of 65,535: rejected at once, without a big
  allocation;
- spoofing: a burst of headers from untrusted peers never changes a client address;
- churn: resets at every stage (mid-header, mid-TLS-handshake, mid-DATA), after which the
  listener still serves, no descriptor is leaked and no acknowledged message is lost.

The timing-sensitive tests run the gate over memory streams under ``autojump_clock``, where a
wait shows as virtual time passing. The descriptor and EOF tests use real sockets on
127.0.0.1 and ::1 with the real clock, and assert only the final state, each bounded by
``trio.fail_after``: the virtual clock would jump while the kernel is still delivering.
"""

from __future__ import annotations

import contextlib
import ipaddress
import mailbox
import os
import pathlib
import resource
import socket
import ssl
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable

import attrs
import pytest
import trio
import trio.testing
import trustme
from mailedge_examples.smtp_handler import SMTPHandler

from mailedge.context import ConnectionContext
from mailedge.events import EventName, GateEvent
from mailedge.gate import ProxyGate, ProxyRejected, UntrustedHeaderError
from mailedge.networks import TrustedNetworks
from mailedge.proxy import V2_SIGNATURE, Command, InetAddress, encode_v1, encode_v2
from mailedge.server import Handler, Server, serve
from mailedge.settings import (
    BindAddress,
    HeaderMode,
    ListenerProtocol,
    NetworkListener,
    Settings,
    SystemSettings,
)

PROXY_PEER = ("127.0.0.1", 51000)
STRANGER = ("203.0.113.9", 52000)
LOCAL = ("127.0.0.1", 25)
CLIENT = InetAddress(ipaddress.ip_address("198.51.100.7"), 40123)
SERVER = InetAddress(ipaddress.ip_address("192.0.2.25"), 25)
V1_HEADER = encode_v1(CLIENT, SERVER)
V2_HEADER = encode_v2(Command.PROXY, CLIENT, SERVER)
LOOPBACK = ("127.0.0.0/8", "::1")
KIB = 1024


# --- helpers ---------------------------------------------------------------------------------


def client_header(index: int, *, v2: bool = True) -> tuple[bytes, str]:
    """A header claiming client 198.51.100.<n>, and that address."""
    ip = f"198.51.100.{index % 250 + 1}"
    source = InetAddress(ipaddress.ip_address(ip), 40000 + index % 20000)
    header = encode_v2(Command.PROXY, source, SERVER) if v2 else encode_v1(source, SERVER)
    return header, ip


def listener(name: str = "smtp", **knobs: object) -> NetworkListener:
    knobs.setdefault("bind", (BindAddress.parse("127.0.0.1:0"),))
    knobs.setdefault("protocol", ListenerProtocol.SMTP)
    return NetworkListener(name=name, **knobs)  # type: ignore[arg-type]


def settings(*listeners: NetworkListener) -> Settings:
    return Settings(
        system=SystemSettings(proxy_trusted_networks=TrustedNetworks(LOOPBACK)),
        listeners=listeners or (listener(),),
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def need_fds(count: int) -> None:
    """Raise the soft descriptor limit to ``count``, or skip when the hard limit forbids it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= count:
        return
    if hard != resource.RLIM_INFINITY and hard < count:
        pytest.skip(f"needs {count} descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


def reset(sock: trio.socket.SocketType) -> None:
    """Close with SO_LINGER 0: the kernel sends an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def start(
    nursery: trio.Nursery,
    conf: Settings,
    handler: Handler,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> Server:
    async def run(task_status: trio.TaskStatus[Server]) -> None:
        await serve(
            conf, {ListenerProtocol.SMTP: handler}, ssl_context=ssl_context, task_status=task_status
        )

    server: Server = await nursery.start(run)
    return server


def address(server: Server, name: str = "smtp") -> tuple[str, int]:
    return server.addresses[name][0]


# Every client socket a test opens, closed when the test ends even if it failed half-way.
_sockets: list[trio.socket.SocketType] = []


@pytest.fixture(autouse=True)
async def close_sockets() -> AsyncIterator[None]:
    """Async, because closing a trio socket notifies the run loop. Makes every test trio's."""
    yield
    while _sockets:
        _sockets.pop().close()


def client_socket(family: int = socket.AF_INET) -> trio.socket.SocketType:
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    _sockets.append(sock)
    return sock


async def connect(server: Server, name: str = "smtp") -> trio.socket.SocketType:
    host, port = address(server, name)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = client_socket(family)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def receive_line(sock: trio.socket.SocketType) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = await sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


async def closed_by_peer(sock: trio.socket.SocketType) -> str:
    """Wait until the server closes: "eof" or "reset". Anything it sends first is an error."""
    try:
        data = await sock.recv(4096)
    except ConnectionResetError:
        return "reset"
    assert data == b"", f"the server sent {data!r} before a complete header"
    return "eof"


async def wait_for(predicate: Callable[[], bool], what: str, within: float = 5.0) -> None:
    """Poll state that the server layer keeps (it offers no event to wait on), boundedly."""
    with trio.move_on_after(within):
        while not predicate():  # noqa: ASYNC110 - the server's counters have no Event
            await trio.sleep(0.01)
        return
    pytest.fail(f"not within {within} s: {what}")


async def whoami(stream: trio.abc.Stream, context: ConnectionContext) -> None:
    """A tiny server-first protocol: greet with the client the gate recovered, echo a line."""
    await stream.send_all(f"220 {context.client_ip}\r\n".encode())
    data = await stream.receive_some()
    if data:
        await stream.send_all(b"250 " + bytes(data))


@attrs.define
class CountingStream(trio.abc.Stream):
    """A memory stream that counts what the gate reads, and stops a spin.

    After EOF, ``receive_some`` keeps returning b"" (as a socket does): a reader that loops on
    it would never block, and under ``autojump_clock`` the clock would never move. The guard
    turns that into a failure instead of a hang.
    """

    inner: trio.abc.Stream
    receives: int = 0
    received: int = 0
    receives_after_eof: int = 0
    eof_seen: bool = False
    max_receives_after_eof: int = 5

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.eof_seen:
            self.receives_after_eof += 1
            if self.receives_after_eof > self.max_receives_after_eof:
                raise AssertionError("receive_some called again and again after EOF: a spin")
        data = await self.inner.receive_some(max_bytes)
        self.receives += 1
        self.received += len(data)
        if not data:
            self.eof_seen = True
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- slowloris -------------------------------------------------------------------------------


async def test_slowloris_through_the_gate_all_closed_at_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """300 connections dribble or stall; each is cut at exactly its header timeout."""
    timeout = 5.0
    gate = ProxyGate(settings(listener(proxy_header_timeout=timeout)))
    outcomes: list[tuple[str, float, str]] = []  # (kind, held for, reason)
    legit: list[tuple[float, ConnectionContext]] = []

    async def attacker(index: int, kind: str) -> None:
        client, server = trio.testing.memory_stream_pair()
        rejected = trio.Event()

        async def dribble() -> None:
            if kind == "stall":
                return
            data = V1_HEADER if kind == "dribble-v1" else V2_HEADER
            if kind == "half-v2":
                await client.send_all(data[: len(data) // 2])
                return
            # One byte every 0.5 s: the whole header would need far more than the timeout.
            for i in range(len(data)):
                if rejected.is_set():
                    return
                await client.send_all(data[i : i + 1])
                await trio.sleep(0.5)

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            try:
                await gate.admit(server, listener="smtp", peer=PROXY_PEER, local=LOCAL)
            except ProxyRejected as exc:
                outcomes.append((kind, trio.current_time() - started, exc.reason))
            else:
                outcomes.append((kind, trio.current_time() - started, "admitted"))
            rejected.set()
            nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(server)
        await trio.aclose_forcefully(client)

    async def legitimate() -> None:
        await trio.sleep(1.0)  # the attack is under way
        client, server = trio.testing.memory_stream_pair()
        await client.send_all(V2_HEADER + b"EHLO client.example\r\n")
        started = trio.current_time()
        stream, context = await gate.admit(server, listener="smtp", peer=PROXY_PEER, local=LOCAL)
        legit.append((trio.current_time() - started, context))
        assert await stream.receive_some() == b"EHLO client.example\r\n"
        await trio.aclose_forcefully(stream)
        await trio.aclose_forcefully(client)

    kinds = ["dribble-v1", "dribble-v2", "half-v2", "stall"]
    async with trio.open_nursery() as nursery:
        for index in range(300):
            nursery.start_soon(attacker, index, kinds[index % len(kinds)])
        nursery.start_soon(legitimate)

    assert len(outcomes) == 300
    assert {reason for _, _, reason in outcomes} == {"timeout"}
    assert all(held == pytest.approx(timeout) for _, held, _ in outcomes)
    # The legitimate client was admitted the moment its header was there, mid-attack.
    assert len(legit) == 1
    waited, context = legit[0]
    assert waited == 0
    assert str(context.client_ip) == "198.51.100.7"
    assert gate.counters.get("smtp", EventName.TIMEOUT, "timeout") == 300
    assert gate.counters.get("smtp", EventName.ACCEPTED, "header") == 1


async def test_slowloris_over_real_sockets_releases_every_descriptor() -> None:
    """300 real connections dribble, stall or send half a header; a legit client gets through.

    Only the final state is asserted: every attacker closed by the server, the gate counting
    300 timeouts, the server holding no connection, and the descriptor count back where it was.
    """
    count = 300
    need_fds(2 * count + 256)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, settings(listener(proxy_header_timeout=1.0)), whoami)
            before = open_fds()
            sockets: list[trio.socket.SocketType] = []
            endings: list[str] = []

            async def attacker(sock: trio.socket.SocketType, kind: str) -> None:
                if kind == "half-v2":
                    await sock.send(V2_HEADER[:14])
                if kind in ("half-v2", "stall"):
                    endings.append(await closed_by_peer(sock))
                    return
                # Dribble one byte every 0.1 s: 40-odd bytes need 4 s; the timeout is 1 s.
                for i in range(len(V1_HEADER)):
                    try:
                        await sock.send(V1_HEADER[i : i + 1])
                    except (BrokenPipeError, ConnectionResetError):
                        endings.append("reset")
                        return
                    with trio.move_on_after(0.1):
                        endings.append(await closed_by_peer(sock))
                        return
                endings.append("completed")  # would be a failure: the header got through

            kinds = ["dribble", "stall", "half-v2"]
            async with trio.open_nursery() as attackers:
                for index in range(count):
                    sock = await connect(server)
                    sockets.append(sock)
                    attackers.start_soon(attacker, sock, kinds[index % len(kinds)])
                    if index % 50 == 49:
                        # Let the accept loop keep up with the 128-deep listen queue.
                        await wait_for(
                            lambda: server.limits.open_on("smtp") >= len(sockets) - len(endings),
                            "the server accepting the attackers",
                        )
                # Mid-attack: a legitimate proxied client is served at once.
                held = server.limits.open_on("smtp")
                good = await connect(server)
                sockets.append(good)
                await good.send(V1_HEADER)
                assert await receive_line(good) == b"220 198.51.100.7\r\n"
                await good.send(b"QUIT\r\n")
                assert await receive_line(good) == b"250 QUIT\r\n"
            assert held >= count * 0.9, f"only {held} attackers held during the legit session"
            assert sorted(set(endings)) <= ["eof", "reset"], sorted(set(endings))
            assert len(endings) == count
            assert server.gate.counters.get("smtp", EventName.TIMEOUT, "timeout") == count
            await wait_for(lambda: server.limits.open_on("smtp") == 0, "every connection closed")
            for sock in sockets:
                sock.close()
            await wait_for(lambda: open_fds() == before, f"{open_fds()} fds, {before} before")
            nursery.cancel_scope.cancel()


async def test_slots_held_by_stalled_headers_come_back_at_the_timeout() -> None:
    """Stallers fill the listener's cap: new clients get 421 until the timeout frees it."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            conf = settings(listener(proxy_header_timeout=1.0, max_connections=20))
            server = await start(nursery, conf, whoami)
            stallers = [await connect(server) for _ in range(20)]
            await wait_for(lambda: server.limits.open_on("smtp") == 20, "20 stallers held")
            refused = await connect(server)
            assert (await receive_line(refused)).startswith(b"421 ")
            refused.close()
            for sock in stallers:
                assert await closed_by_peer(sock) in ("eof", "reset")
                sock.close()
            await wait_for(lambda: server.limits.open_on("smtp") == 0, "the slots freed")
            good = await connect(server)
            with good:
                await good.send(V2_HEADER)
                assert await receive_line(good) == b"220 198.51.100.7\r\n"
            nursery.cancel_scope.cancel()


# --- half-close mid-header -------------------------------------------------------------------


HALF_CLOSED = [
    pytest.param(b"PROXY TCP4 192.0", "truncated", id="v1-mid-address"),
    pytest.param(b"PROXY ", "truncated", id="v1-prefix"),
    pytest.param(b"PRO", "truncated", id="v1-partial-prefix"),
    pytest.param(V1_HEADER[:-1], "truncated", id="v1-before-lf"),
    pytest.param(V2_SIGNATURE[:5], "truncated", id="v2-partial-signature"),
    pytest.param(V2_HEADER[:20], "truncated", id="v2-mid-addresses"),
    pytest.param(b"", "closed", id="nothing"),
]


@pytest.mark.parametrize(("sent", "reason"), HALF_CLOSED)
async def test_half_close_mid_header_ends_at_once_without_spinning(
    sent: bytes, reason: str, autojump_clock: trio.testing.MockClock
) -> None:
    gate = ProxyGate(settings(listener(proxy_header_timeout=30.0)))
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(sent)
    await client.send_eof()
    counting = CountingStream(server)
    start = trio.current_time()
    with pytest.raises(ProxyRejected) as caught:
        await gate.admit(counting, listener="smtp", peer=PROXY_PEER, local=LOCAL)
    assert caught.value.reason == reason
    assert trio.current_time() == start  # ended by the FIN, not by the 30 s timeout
    assert counting.eof_seen and counting.receives_after_eof == 0  # EOF read once
    await trio.aclose_forcefully(server)
    await trio.aclose_forcefully(client)


@pytest.mark.parametrize(
    ("sent", "outcome"),
    [
        pytest.param(b"PROXY TCP4 192.0", "truncated", id="v1-started"),
        pytest.param(b"PRO", "direct", id="could-be-anything"),
        pytest.param(b"EHLO x\r\n", "direct", id="smtp"),
    ],
)
async def test_half_close_in_optional_mode_never_waits(
    sent: bytes, outcome: str, autojump_clock: trio.testing.MockClock
) -> None:
    conf = settings(listener(proxy_header_mode=HeaderMode.OPTIONAL, proxy_header_timeout=30.0))
    gate = ProxyGate(conf)
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(sent)
    await client.send_eof()
    counting = CountingStream(server)
    start = trio.current_time()
    if outcome != "direct":
        with pytest.raises(ProxyRejected) as caught:
            await gate.admit(counting, listener="smtp", peer=PROXY_PEER, local=LOCAL)
        assert caught.value.reason == outcome
    else:
        stream, context = await gate.admit(counting, listener="smtp", peer=PROXY_PEER, local=LOCAL)
        assert not context.proxied
        # The bytes go to the protocol untouched; then EOF, once.
        assert await stream.receive_some() == sent
        assert await stream.receive_some() == b""
    assert trio.current_time() == start
    assert counting.receives_after_eof <= 1
    await trio.aclose_forcefully(server)
    await trio.aclose_forcefully(client)


async def test_half_close_from_an_untrusted_peer_mid_signature(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = ProxyGate(settings())
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"PROX")
    await client.send_eof()
    counting = CountingStream(server)
    stream, context = await gate.admit(counting, listener="smtp", peer=STRANGER, local=LOCAL)
    assert str(context.client_ip) == STRANGER[0]
    start = trio.current_time()
    assert await stream.receive_some() == b"PROX"
    assert await stream.receive_some() == b""
    assert trio.current_time() == start
    assert counting.receives_after_eof <= 1
    await trio.aclose_forcefully(server)
    await trio.aclose_forcefully(client)


async def test_half_close_over_a_real_socket_is_answered_by_a_close() -> None:
    """FIN after part of a v1 line: the server closes at once, not after its 30 s timeout."""
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, settings(listener(proxy_header_timeout=30.0)), whoami)
            for cut in (5, 16, len(V1_HEADER) - 1):
                sock = await connect(server)
                with sock:
                    await sock.send(V1_HEADER[:cut])
                    sock.shutdown(socket.SHUT_WR)
                    assert await closed_by_peer(sock) == "eof"
            await wait_for(lambda: server.limits.open_on("smtp") == 0, "all closed")
            assert server.gate.counters.get("smtp", EventName.REJECTED, "truncated") == 3
            nursery.cancel_scope.cancel()


# --- floods ----------------------------------------------------------------------------------


# The codec may name an earlier fault than the missing CRLF (a TCP4 address that has grown
# past any IPv4 literal); either way the flood ends at once.
V1_FLOOD = {"too_long", "bad_address", "v1_syntax"}
FLOODS = [
    pytest.param(b"PROXY TCP4 " + b"1" * 3989, V1_FLOOD, 4096, id="v1-4000-bytes-no-crlf"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 3986, {"too_long"}, 4096, id="v1-unknown-no-crlf"),
    pytest.param(
        V2_SIGNATURE + b"\x21\x11\xff\xff", {"too_long"}, 4096, id="v2-length-65535-announced"
    ),
    pytest.param(
        V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(0xFFFF),
        {"too_long"},
        4096,
        id="v2-length-65535-sent",
    ),
    pytest.param(b"P" + b"X" * 3999, {"v1_syntax", "not_proxy_header"}, 4096, id="garbage-P"),
]


@pytest.mark.parametrize(("flood", "reasons", "max_read"), FLOODS)
async def test_floods_are_rejected_at_once_without_a_big_allocation(
    flood: bytes, reasons: set[str], max_read: int, autojump_clock: trio.testing.MockClock
) -> None:
    gate = ProxyGate(settings())
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(flood)
    counting = CountingStream(server)
    start = trio.current_time()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with pytest.raises(ProxyRejected) as caught:
            await gate.admit(counting, listener="smtp", peer=PROXY_PEER, local=LOCAL)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.reason in reasons
    assert trio.current_time() == start  # no waiting for bytes that were announced
    assert peak - baseline < 64 * KIB, f"{peak - baseline} bytes allocated"
    assert counting.received <= max_read  # one receive, never the whole flood
    await trio.aclose_forcefully(server)
    await trio.aclose_forcefully(client)


async def test_byte_by_byte_flood_is_cut_at_the_v1_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No CRLF, one byte per receive: rejected at byte 108, never reading the rest."""
    gate = ProxyGate(settings())
    client, server = trio.testing.memory_stream_pair()
    counting = CountingStream(server)
    flood = b"PROXY UNKNOWN " + b"x" * 3986
    rejected = trio.Event()

    async def send() -> None:
        for i in range(len(flood)):
            if rejected.is_set():
                return
            await client.send_all(flood[i : i + 1])
            await trio.testing.wait_all_tasks_blocked()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        with pytest.raises(ProxyRejected) as caught:
            await gate.admit(counting, listener="smtp", peer=PROXY_PEER, local=LOCAL)
        rejected.set()
    assert caught.value.reason == "too_long"
    assert trio.current_time() == start
    assert counting.received <= 108
    await trio.aclose_forcefully(server)
    await trio.aclose_forcefully(client)


# --- spoofing --------------------------------------------------------------------------------


def spoofs() -> list[tuple[str, list[bytes]]]:
    """Spoof attempts: headers whole, byte by byte, with a command glued on, LOCAL."""
    v1 = encode_v1(InetAddress(ipaddress.ip_address("203.0.113.66"), 1), SERVER)
    v2 = encode_v2(Command.PROXY, InetAddress(ipaddress.ip_address("203.0.113.66"), 1), SERVER)
    local = encode_v2(Command.LOCAL)
    return [
        ("v1", [v1]),
        ("v2", [v2]),
        ("v2-local", [local]),
        ("v1-bytewise", [v1[i : i + 1] for i in range(len(v1))]),
        ("v2-bytewise", [v2[i : i + 1] for i in range(len(v2))]),
        ("v1-with-ehlo", [v1 + b"EHLO x\r\n"]),
        ("v2-split-signature", [v2[:5], v2[5:]]),
    ]


async def test_a_burst_of_untrusted_spoofs_never_changes_a_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = ProxyGate(settings())
    attempts = spoofs() * 100

    async def attempt(index: int, chunks: list[bytes]) -> None:
        client, server = trio.testing.memory_stream_pair()
        peer = (f"203.0.113.{index % 200 + 1}", 50000 + index)
        stream, context = await gate.admit(server, listener="smtp", peer=peer, local=LOCAL)
        assert str(context.client_ip) == peer[0] and not context.proxied

        async def send() -> None:
            for chunk in chunks:
                await client.send_all(chunk)
                await trio.testing.wait_all_tasks_blocked()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            with pytest.raises(UntrustedHeaderError):
                await stream.receive_some()
        await trio.aclose_forcefully(stream)
        await trio.aclose_forcefully(client)

    async with trio.open_nursery() as nursery:
        for index, (_, chunks) in enumerate(attempts):
            nursery.start_soon(attempt, index, chunks)
    assert gate.counters.get("smtp", EventName.UNTRUSTED_HEADER, "untrusted_header") == len(
        attempts
    )
    assert gate.counters.get("smtp", EventName.ACCEPTED) == 0


async def test_a_burst_of_spoofs_over_real_sockets(nursery: trio.Nursery) -> None:
    """Loopback untrusted on this listener: 140 spoofs, none reaches a handler's context."""
    seen: list[str] = []

    async def record(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        seen.append(str(context.client_ip))
        await whoami(stream, context)

    untrusted = listener(
        bind=(BindAddress.parse("127.0.0.1:0"), BindAddress.parse("[::1]:0")),
        override_proxy_trusted_networks=TrustedNetworks(["192.0.2.1/32"]),
    )
    with trio.fail_after(15):
        server = await start(nursery, settings(untrusted), record)
        attempts = spoofs() * 20
        limiter = trio.CapacityLimiter(40)

        async def attempt(index: int, chunks: list[bytes]) -> None:
            host, port = server.addresses["smtp"][index % 2]
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            async with limiter:
                sock = client_socket(family)
                with sock:
                    await sock.connect((host, port))
                    # The greeting comes at once, naming the socket peer.
                    assert await receive_line(sock) == f"220 {host}\r\n".encode()
                    try:
                        for chunk in chunks:
                            await sock.send(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        return  # closed on the signature, before the rest was sent
                    assert await closed_by_peer(sock) in ("eof", "reset")

        async with trio.open_nursery() as burst:
            for index, (_, chunks) in enumerate(attempts):
                burst.start_soon(attempt, index, chunks)
        await wait_for(lambda: server.limits.open_on("smtp") == 0, "every spoof closed")
    assert len(seen) == len(attempts)
    assert set(seen) <= {"127.0.0.1", "::1"}
    counted = server.gate.counters.get("smtp", EventName.UNTRUSTED_HEADER, "untrusted_header")
    assert counted == len(attempts)
    nursery.cancel_scope.cancel()


async def test_a_second_header_behind_a_trusted_one_is_only_data(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Header stacking: the client is the first header's; the second reaches the protocol."""
    gate = ProxyGate(settings())
    stacked = encode_v1(InetAddress(ipaddress.ip_address("203.0.113.66"), 1), SERVER)
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(V2_HEADER + stacked)
    stream, context = await gate.admit(server, listener="smtp", peer=PROXY_PEER, local=LOCAL)
    assert str(context.client_ip) == "198.51.100.7"
    assert await stream.receive_some() == stacked
    await trio.aclose_forcefully(stream)
    await trio.aclose_forcefully(client)


# --- churn -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@attrs.define
class Mail:
    """What the churn clients know about the messages they sent."""

    acknowledged: set[str] = attrs.Factory(set)
    # The final dot was sent, then the connection was reset before the reply.
    maybe: set[str] = attrs.Factory(set)
    counter: int = 0

    def next_id(self) -> str:
        self.counter += 1
        return f"churn-{self.counter}"


def message(message_id: str) -> bytes:
    body = "".join(f"line {i} of {message_id}\r\n" for i in range(20))
    return (
        f"Subject: {message_id}\r\nMessage-ID: <{message_id}@example.org>\r\n\r\n"
        f"{body}END {message_id}\r\n.\r\n"
    ).encode()


class SMTPClient:
    """Just enough SMTP to walk a session to any point and stop there."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.pending = b""

    async def reply(self) -> bytes:
        while True:
            while b"\r\n" not in self.pending:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(self.pending)
                self.pending += data
            line, _, self.pending = self.pending.partition(b"\r\n")
            if line[3:4] != b"-":
                return line

    async def command(self, text: bytes, code: bytes) -> None:
        await self.stream.send_all(text)
        reply = await self.reply()
        assert reply.startswith(code), (text, reply)

    async def up_to_data(self) -> None:
        assert (await self.reply()).startswith(b"220")
        await self.command(b"EHLO churn.example\r\n", b"250")
        await self.command(b"MAIL FROM:<churn@example.org>\r\n", b"250")
        await self.command(b"RCPT TO:<postmaster@example.net>\r\n", b"250")
        await self.command(b"DATA\r\n", b"354")


def client_hello(context: ssl.SSLContext) -> bytes:
    """A real TLS ClientHello, to cut a handshake short with."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="mx.example")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def test_churn_resets_at_every_stage(
    nursery: trio.Nursery, tmp_path: pathlib.Path, ca: trustme.CA
) -> None:
    need_fds(1024)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.example").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    hello = client_hello(client_context)
    maildir = tmp_path / "Maildir"
    handler = SMTPHandler(hostname="mx.example", maildir=maildir)
    conf = settings(
        listener("smtp", proxy_header_timeout=2.0, idle_timeout=5.0),
        listener("smtps", tls=True, proxy_header_timeout=2.0, tls_handshake_timeout=2.0),
    )
    mail = Mail()

    async def plain(server: Server, index: int) -> trio.SocketStream:
        return trio.SocketStream(await connect(server, "smtp"))

    async def at_connect(server: Server, index: int) -> None:
        reset(await connect(server))

    async def mid_header(server: Server, index: int) -> None:
        sock = await connect(server)
        header, _ = client_header(index, v2=index % 2 == 0)
        await sock.send(header[: 1 + index % (len(header) - 1)])
        await trio.sleep(0.01)
        reset(sock)

    async def after_banner(server: Server, index: int) -> None:
        sock = await connect(server)
        await sock.send(client_header(index)[0])
        assert (await receive_line(sock)).startswith(b"220")
        reset(sock)

    async def mid_handshake(server: Server, index: int) -> None:
        sock = await connect(server, "smtps")
        await sock.send(client_header(index)[0] + hello[: len(hello) // 2])
        await trio.sleep(0.01)
        reset(sock)

    async def after_server_hello(server: Server, index: int) -> None:
        sock = await connect(server, "smtps")
        await sock.send(client_header(index)[0] + hello)
        assert await sock.recv(1) == b"\x16"  # the ServerHello's first byte
        reset(sock)

    async def mid_data(server: Server, index: int) -> None:
        stream = await plain(server, index)
        await stream.send_all(client_header(index)[0])
        smtp = SMTPClient(stream)
        await smtp.up_to_data()
        whole = message(mail.next_id())
        await stream.send_all(whole[: len(whole) // 2])  # never the final dot
        await trio.sleep(0.01)
        reset(stream.socket)

    async def dot_then_reset(server: Server, index: int) -> None:
        stream = await plain(server, index)
        await stream.send_all(client_header(index)[0])
        smtp = SMTPClient(stream)
        await smtp.up_to_data()
        message_id = mail.next_id()
        mail.maybe.add(message_id)
        await stream.send_all(message(message_id))
        reset(stream.socket)

    async def complete(server: Server, index: int) -> None:
        await session(server, index, "smtp")

    async def complete_tls(server: Server, index: int) -> None:
        await session(server, index, "smtps")

    async def session(server: Server, index: int, name: str) -> None:
        raw = trio.SocketStream(await connect(server, name))
        await raw.send_all(client_header(index)[0])
        stream: trio.abc.Stream = raw
        if name == "smtps":
            stream = trio.SSLStream(raw, client_context, server_hostname="mx.example")
        smtp = SMTPClient(stream)
        message_id = mail.next_id()
        try:
            await smtp.up_to_data()
            await smtp.command(message(message_id), b"250")
            mail.acknowledged.add(message_id)
            # Half the time, reset right after the 250 instead of a polite QUIT.
            if index % 2:
                reset(raw.socket)
                return
            await smtp.command(b"QUIT\r\n", b"221")
        finally:
            await trio.aclose_forcefully(stream)

    stages: list[Callable[[Server, int], Awaitable[None]]] = [
        at_connect,
        mid_header,
        after_banner,
        mid_handshake,
        after_server_hello,
        mid_data,
        dot_then_reset,
        complete,
        complete_tls,
    ]
    with trio.fail_after(25):
        server = await start(nursery, conf, handler, ssl_context=server_context)
        before = open_fds()
        limiter = trio.CapacityLimiter(16)

        async def run(stage: Callable[[Server, int], Awaitable[None]], index: int) -> None:
            async with limiter:
                await stage(server, index)

        async with trio.open_nursery() as churn:
            for index in range(8 * len(stages)):
                churn.start_soon(run, stages[index % len(stages)], index)

        # The listeners still serve, plain and TLS.
        await complete(server, 1000)
        await complete_tls(server, 1002)
        await wait_for(
            lambda: server.limits.open_on("smtp") == 0 and server.limits.open_on("smtps") == 0,
            "every session ended",
            within=10,
        )
        await wait_for(lambda: open_fds() == before, f"{open_fds()} fds, {before} before")

    delivered: dict[str, int] = {}
    for key, msg in mailbox.Maildir(maildir, create=False).items():
        text = msg.as_bytes()
        subject = str(msg["Subject"])
        # Never a truncated message: every stored one ends with its END line.
        assert f"END {subject}".encode() in text, key
        delivered[subject] = delivered.get(subject, 0) + 1
    # Eight complete sessions each on the plain and the TLS listener, and the two at the end.
    assert len(mail.acknowledged) == 2 * 8 + 2
    missing = mail.acknowledged - set(delivered)
    assert not missing, f"acknowledged with 250 but not in the Maildir: {sorted(missing)}"
    # Nothing that was never acknowledged or at least fully sent, and nothing twice.
    assert set(delivered) <= mail.acknowledged | mail.maybe
    assert set(delivered.values()) == {1}
    nursery.cancel_scope.cancel()


@attrs.define
class ResettingStream(trio.abc.Stream):
    """Delivers ``data``, then fails as a socket does when the peer resets (ECONNRESET)."""

    data: bytes

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await trio.lowlevel.checkpoint()
        if self.data:
            data, self.data = self.data, b""
            return data
        raise trio.BrokenResourceError("socket connection broken") from ConnectionResetError(
            104, "Connection reset by peer"
        )

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 198.51", V2_HEADER[:20]])
async def test_a_reset_mid_header_is_one_counted_rejection(
    sent: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    """Every connection that reaches the gate gets exactly one event, a reset included."""
    events: list[GateEvent] = []
    gate = ProxyGate(settings(), on_event=events.append)
    start = trio.current_time()
    with pytest.raises(ProxyRejected):
        await gate.admit(ResettingStream(sent), listener="smtp", peer=PROXY_PEER, local=LOCAL)
    assert [(event.name, event.reason) for event in events] == [(EventName.REJECTED, "reset")]
    assert "reset the connection" in events[0].message
    assert trio.current_time() == start


async def test_listener_survives_a_reset_before_any_byte_from_a_trusted_peer(
    nursery: trio.Nursery,
) -> None:
    """Connect-and-abort: a health checker, or a proxy whose client went away."""
    with trio.fail_after(10):
        server = await start(nursery, settings(), whoami)
        for _ in range(20):
            reset(await connect(server))
        sock = await connect(server)
        await sock.send(b"PROXY TCP4 198.51")
        await trio.sleep(0.05)
        reset(sock)
        await wait_for(lambda: server.limits.open_on("smtp") == 0, "the resets handled")
        good = await connect(server)
        with good:
            await good.send(V1_HEADER)
            assert await receive_line(good) == b"220 198.51.100.7\r\n"
    nursery.cancel_scope.cancel()


# --- descriptor exhaustion -------------------------------------------------------------------

# A server that may hold only a few dozen descriptors: the exhaustion is reached with few
# connections, in its own process so that this test's process keeps its limit.
LOW_FD_SERVER = r"""
import logging, resource, sys
import trio
from mailedge.networks import TrustedNetworks
from mailedge.server import serve
from mailedge.settings import BindAddress, NetworkListener, ListenerProtocol
from mailedge.settings import Settings, SystemSettings

resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")


async def echo_client(stream, context):
    await stream.send_all(f"220 {context.client_ip}\r\n".encode())


async def main():
    conf = Settings(
        system=SystemSettings(proxy_trusted_networks=TrustedNetworks(["127.0.0.0/8"])),
        listeners=(
            NetworkListener(
                name="smtp",
                protocol=ListenerProtocol.SMTP,
                bind=(BindAddress.parse("127.0.0.1:0"),),
                proxy_header_timeout=60.0,
            ),
        ),
    )
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve(
                conf, {ListenerProtocol.SMTP: echo_client}, task_status=task_status
            )
        )
        print(server.addresses["smtp"][0][1], flush=True)

trio.run(main)
"""


async def test_out_of_descriptors_the_listener_pauses_and_recovers(tmp_path: pathlib.Path) -> None:
    """EMFILE on accept is logged and waited out; the listener serves again once fds free up."""
    need_fds(512)
    stderr_path = tmp_path / "server.log"
    with (
        trio.fail_after(60),
        stderr_path.open("wb") as stderr,
    ):
        process = await trio.lowlevel.open_process(
            [os.environ.get("PYTHON", sys.executable), "-c", LOW_FD_SERVER],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        try:
            assert process.stdout is not None
            port = int((await process.stdout.receive_some(64)).strip())
            # Far more stalled connections than the server has descriptors for; the kernel
            # completes the handshakes, and the server accepts until accept() fails.
            held = [trio.socket.socket() for _ in range(120)]
            for sock in held:
                await sock.connect(("127.0.0.1", port))
                await sock.send(b"PROXY TCP4 198.51.100.7 ")
            await wait_for(
                lambda: b"Too many open files" in stderr_path.read_bytes(), "EMFILE", within=20
            )
            for sock in held:
                sock.close()
            # With descriptors free again, a proxied client is served.
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                header, ip = client_header(7)
                await client.send_all(header)
                reply = b""
                while not reply.endswith(b"\r\n"):
                    chunk = await client.receive_some()
                    assert chunk, reply
                    reply += chunk
            assert reply == f"220 {ip}\r\n".encode()
        finally:
            process.kill()
            await process.wait()
    log = stderr_path.read_text()
    assert "listener smtp: accept failed (Too many open files); pausing 0.1 s" in log
    assert "Traceback" not in log
