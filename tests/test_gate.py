"""The gate's decision table, over trio's in-memory streams and a virtual clock."""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Sequence

import attrs
import pytest
import trio
import trio.testing

from mailedge import gate as gate_module
from mailedge.context import AddressSource, ConnectionContext, TLSTerminator
from mailedge.events import EventName, GateEvent, LogLimiter
from mailedge.gate import ProxyGate, ProxyRejected, UntrustedHeaderError
from mailedge.networks import TrustedNetworks
from mailedge.proxy import (
    TLV,
    ClientFlags,
    Command,
    InetAddress,
    SSLInfo,
    TLVType,
    encode_v1,
    encode_v2,
)
from mailedge.settings import (
    BindAddress,
    HeaderMode,
    ListenerProtocol,
    NetworkListener,
    Settings,
    SystemSettings,
)
from mailedge.streams import PrefixedStream

PROXY_PEER = ("127.0.0.1", 51000)
STRANGER = ("203.0.113.9", 52000)
LOCAL = ("127.0.0.1", 2525)
CLIENT = InetAddress(ipaddress.ip_address("198.51.100.7"), 40123)
SERVER = InetAddress(ipaddress.ip_address("192.0.2.25"), 25)
CLIENT6 = InetAddress(ipaddress.ip_address("2001:db8::7"), 40123)
SERVER6 = InetAddress(ipaddress.ip_address("2001:db8::25"), 25)
EHLO = b"EHLO client.example\r\n"
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)


def listener(
    name: str = "smtp", protocol: ListenerProtocol = ListenerProtocol.SMTP, **knobs: object
) -> NetworkListener:
    return NetworkListener(
        name=name,
        protocol=protocol,
        bind=(BindAddress.parse("127.0.0.1:0"),),
        **knobs,  # type: ignore[arg-type]
    )


def settings(
    *listeners: NetworkListener, trusted: Sequence[str] = ("127.0.0.0/8", "::1")
) -> Settings:
    return Settings(
        system=SystemSettings(proxy_trusted_networks=TrustedNetworks(trusted)),
        listeners=listeners or (listener(),),
    )


@attrs.define
class Run:
    """What one connection through the gate produced, seen from both ends."""

    gate: ProxyGate
    events: list[GateEvent]
    stream: trio.abc.Stream | None = None
    context: ConnectionContext | None = None
    error: ProxyRejected | None = None
    admitted_at: float | None = None

    @property
    def event(self) -> GateEvent:
        assert len(self.events) == 1, self.events
        return self.events[0]


async def run_gate(
    chunks: Sequence[bytes],
    *,
    peer: tuple[str, int] = PROXY_PEER,
    conf: Settings | None = None,
    gate: ProxyGate | None = None,
    eof: bool = False,
    listener_name: str = "smtp",
) -> Run:
    """Send ``chunks`` (each delivered as its own receive), then maybe EOF, through the gate."""
    events: list[GateEvent] = []
    if gate is None:
        gate = ProxyGate(conf or settings(), on_event=events.append)
    run = Run(gate=gate, events=events)
    client, server = trio.testing.memory_stream_pair()

    async def send() -> None:
        for chunk in chunks:
            await client.send_all(chunk)
            await trio.testing.wait_all_tasks_blocked()
        if eof:
            await client.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        try:
            run.stream, run.context = await gate.admit(
                server, listener=listener_name, peer=peer, local=LOCAL
            )
            run.admitted_at = trio.current_time()
        except ProxyRejected as exc:
            run.error = exc
            nursery.cancel_scope.cancel()
    return run


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def with_app(data: bytes) -> list[bytes]:
    return [data + EHLO]


DELIVERIES = [whole, bytewise, with_app]

V1_TCP4 = encode_v1(CLIENT, SERVER)
V1_TCP6 = encode_v1(CLIENT6, SERVER6)
V2_TCP4 = encode_v2(Command.PROXY, CLIENT, SERVER)
V2_TCP6_CRC = encode_v2(
    Command.PROXY,
    CLIENT6,
    SERVER6,
    tlvs=[TLV(TLVType.UNIQUE_ID, b"req-1"), TLV(0xE1, b"custom")],
    crc32c=True,
)


async def rest_of(stream: trio.abc.Stream, expected: int) -> bytes:
    got = b""
    while len(got) < expected:
        chunk = await stream.receive_some()
        assert chunk
        got += chunk
    return got


# -- trusted peer, valid header -------------------------------------------------------------


@pytest.mark.parametrize("deliver", DELIVERIES)
@pytest.mark.parametrize(
    ("header", "client", "server"),
    [
        (V1_TCP4, CLIENT, SERVER),
        (V1_TCP6, CLIENT6, SERVER6),
        (V2_TCP4, CLIENT, SERVER),
        (V2_TCP6_CRC, CLIENT6, SERVER6),
    ],
)
async def test_trusted_header_names_the_client(
    deliver: object, header: bytes, client: InetAddress, server: InetAddress
) -> None:
    chunks = deliver(header)  # type: ignore[operator]
    run = await run_gate(chunks)
    ctx = run.context
    assert ctx is not None and run.stream is not None
    assert (ctx.client_ip, ctx.client_port) == (client.ip, client.port)
    assert (ctx.server_ip, ctx.server_port) == (server.ip, server.port)
    assert (str(ctx.peer_ip), ctx.peer_port) == PROXY_PEER
    assert ctx.proxied and ctx.client_known
    assert ctx.address_source is AddressSource.HEADER
    assert ctx.header is not None
    assert not ctx.tls
    assert run.event.name is EventName.ACCEPTED
    assert run.event.client_ip == client.ip
    if deliver is with_app:
        # The application's first bytes arrived in the header's segment: handed on untouched.
        assert await rest_of(run.stream, len(EHLO)) == EHLO


async def test_app_bytes_are_served_in_pieces_when_asked_for_less() -> None:
    run = await run_gate([V2_TCP4 + EHLO])
    assert run.stream is not None
    assert await run.stream.receive_some(4) == EHLO[:4]
    assert await run.stream.receive_some() == EHLO[4:]


async def test_crc_and_tlvs_reach_the_context() -> None:
    run = await run_gate([V2_TCP6_CRC])
    assert run.context is not None and run.context.header is not None
    assert run.context.header.crc32c_verified
    assert run.context.unique_id == b"req-1"
    assert TLV(0xE1, b"custom") in run.context.header.tlvs


async def test_nothing_is_sent_before_the_header_is_complete() -> None:
    client, server = trio.testing.memory_stream_pair()
    gate = ProxyGate(settings())
    received: list[bytes] = []

    async def watch() -> None:
        received.append(bytes(await client.receive_some()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        for byte in bytewise(V1_TCP4[:-1]):
            await client.send_all(byte)
        nursery.start_soon(client.send_all, V1_TCP4[-1:])
        stream, _ = await gate.admit(server, listener="smtp", peer=PROXY_PEER, local=LOCAL)
        await trio.testing.wait_all_tasks_blocked()
        assert received == []  # the gate itself never writes
        await stream.send_all(b"220 ready\r\n")
    assert received == [b"220 ready\r\n"]


# -- TLS as the proxy reports it ------------------------------------------------------------


def ssl_header(client_bits: int, **fields: object) -> bytes:
    info = SSLInfo(client=ClientFlags(client_bits), verify=0, **fields)  # type: ignore[arg-type]
    return encode_v2(
        Command.PROXY,
        CLIENT,
        SERVER,
        tlvs=[TLV(TLVType.AUTHORITY, b"mx.example.org"), TLV(TLVType.ALPN, b"smtp")],
        ssl=info,
    )


async def test_tls_with_a_verified_client_certificate() -> None:
    header = ssl_header(0x07, version="TLSv1.3", cn="alice", cipher="TLS_AES_256_GCM_SHA384")
    run = await run_gate([header])
    ctx = run.context
    assert ctx is not None
    assert ctx.tls and ctx.tls_terminated_by is TLSTerminator.PROXY
    assert (ctx.tls_version, ctx.tls_cipher) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert (ctx.sni, ctx.alpn) == ("mx.example.org", "smtp")
    assert ctx.client_cert_cn == "alice"
    assert ctx.client_cert_verified


async def test_tls_without_a_certificate_is_not_verified() -> None:
    # HAProxy sends verify 0 when no certificate was presented: that proves nothing.
    run = await run_gate([ssl_header(0x01, version="TLSv1.2")])
    ctx = run.context
    assert ctx is not None and ctx.tls
    assert not ctx.client_cert_verified


async def test_ssl_tlv_with_client_zero_means_plaintext() -> None:
    run = await run_gate([ssl_header(0x00)])
    ctx = run.context
    assert ctx is not None
    assert not ctx.tls and ctx.tls_terminated_by is None and ctx.tls_version is None


@pytest.mark.parametrize(("implies", "expected"), [(False, False), (True, True)])
async def test_v1_tls_knob(implies: bool, expected: bool) -> None:
    conf = settings(listener(proxy_v1_implies_tls=implies))
    run = await run_gate([V1_TCP4], conf=conf)
    assert run.context is not None
    assert run.context.tls is expected
    assert run.context.tls_terminated_by is (TLSTerminator.PROXY if expected else None)


async def test_v1_tls_knob_does_not_apply_to_v2() -> None:
    conf = settings(listener(proxy_v1_implies_tls=True))
    run = await run_gate([V2_TCP4], conf=conf)
    assert run.context is not None and not run.context.tls


# -- LOCAL and unknown addresses ------------------------------------------------------------


@pytest.mark.parametrize("deliver", DELIVERIES)
async def test_local_health_check_is_served_as_the_proxy_itself(
    deliver: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailedge")
    header = encode_v2(Command.LOCAL, crc32c=True)
    run = await run_gate(deliver(header))  # type: ignore[operator]
    ctx = run.context
    assert ctx is not None
    assert ctx.address_source is AddressSource.PROXY_LOCAL
    assert not ctx.client_known
    assert (str(ctx.client_ip), ctx.client_port) == PROXY_PEER
    assert run.event.name is EventName.LOCAL
    assert run.gate.counters.get("smtp", EventName.LOCAL) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "header",
    [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", encode_v2(Command.PROXY)],
    ids=["v1-unknown", "v1-unknown-with-junk", "v2-unspec"],
)
async def test_unknown_client_address_is_marked_unknown(header: bytes) -> None:
    run = await run_gate([header + EHLO])
    ctx = run.context
    assert ctx is not None and run.stream is not None
    assert ctx.proxied
    assert ctx.address_source is AddressSource.UNKNOWN
    assert not ctx.client_known
    assert str(ctx.client_ip) == PROXY_PEER[0]
    assert run.event.reason == "address_unknown"
    assert await rest_of(run.stream, len(EHLO)) == EHLO


# -- trusted peer, no header or a bad one ---------------------------------------------------


@pytest.mark.parametrize(
    ("first", "diagnosis"),
    [
        (CLIENT_HELLO, "a TLS ClientHello arrived where a PROXY header was expected"),
        (EHLO, "an SMTP command arrived"),
        (b"GET /whoami HTTP/1.1\r\n", "an HTTP request arrived"),
        (b"a1 CAPABILITY\r\n", "an IMAP command arrived"),
        (b"\x00\x01garbage", "bytes that are not a PROXY header arrived"),
    ],
)
async def test_required_mode_rejects_protocol_bytes_at_once(
    first: bytes, diagnosis: str, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    run = await run_gate([first])
    assert run.error is not None
    event = run.event
    assert (event.name, event.reason) == (EventName.REJECTED, "not_proxy_header")
    assert diagnosis in event.message
    assert event.elapsed == 0 and trio.current_time() == start  # no waiting for the timeout
    assert event.first_bytes is not None and event.first_bytes.startswith(repr(first[:4])[2:-1])
    assert str(event.peer_ip) == PROXY_PEER[0] and event.listener == "smtp"


async def test_required_mode_times_out_on_silence(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    run = await run_gate([])
    assert run.error is not None
    event = run.event
    assert (event.name, event.reason) == (EventName.TIMEOUT, "timeout")
    assert trio.current_time() - start == pytest.approx(5.0)
    assert event.elapsed == pytest.approx(5.0)
    assert "nothing arrived within 5 s" in event.message
    assert 'proxyHeaderMode = "optional"' in event.message


async def test_timeout_follows_the_listener_knob(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    run = await run_gate([], conf=settings(listener(proxy_header_timeout=3.0)))
    assert run.event.name is EventName.TIMEOUT
    assert trio.current_time() - start == pytest.approx(3.0)


async def test_dribbled_header_times_out_with_its_bytes_quoted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = await run_gate([V1_TCP4[:10]])
    event = run.event
    assert event.name is EventName.TIMEOUT
    assert "only 10 bytes of a PROXY header arrived" in event.message
    assert event.first_bytes == "PROXY TCP4"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY TCP4 198.51.100.7 192.0.2.25 40123 99999\r\n", "bad_port"),
        (b"PROXY TCP4 1.2.3.004 192.0.2.25 1 2\r\n", "bad_address"),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1_syntax"),
        (b"PROXY UNKNOWN " + b"x" * 200, "too_long"),
        (V2_TCP4[:12] + b"\x31" + V2_TCP4[13:], "bad_version"),
        (V2_TCP4[:14] + b"\xff\xff", "too_long"),
    ],
)
@pytest.mark.parametrize("split", [False, True])
async def test_malformed_headers_are_rejected_with_their_reason(
    data: bytes, reason: str, split: bool, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    run = await run_gate(bytewise(data) if split else [data])
    event = run.event
    assert (event.name, event.reason) == (EventName.REJECTED, reason)
    assert trio.current_time() == start
    assert event.first_bytes


async def test_bad_crc_is_rejected() -> None:
    broken = bytearray(V2_TCP6_CRC)
    broken[-1] ^= 0xFF
    run = await run_gate([bytes(broken)])
    assert (run.event.name, run.event.reason) == (EventName.REJECTED, "crc_mismatch")


@pytest.mark.parametrize("cut", [1, 6, 20, len(V1_TCP4) - 1])
async def test_half_close_mid_v1_header_is_a_clean_reject(
    cut: int, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    run = await run_gate([V1_TCP4[:cut]], eof=True)
    event = run.event
    assert (event.name, event.reason) == (EventName.REJECTED, "truncated")
    assert trio.current_time() == start  # ended by the FIN, not the timeout


async def test_half_close_mid_v2_header_is_a_clean_reject() -> None:
    run = await run_gate([V2_TCP6_CRC[:30]], eof=True)
    assert run.event.reason == "truncated"


async def test_close_before_any_byte() -> None:
    run = await run_gate([], eof=True)
    assert (run.event.name, run.event.reason) == (EventName.REJECTED, "closed")
    assert run.event.first_bytes is None
    assert "check-send-proxy" in run.event.message
    # A connect-and-close is a TCP health check's habit: logged, but not as a warning.
    assert run.event.level == logging.INFO


async def test_over_the_listeners_cap_is_rejected() -> None:
    big = encode_v2(Command.PROXY, CLIENT, SERVER, tlvs=[TLV(0xE0, bytes(300))])
    conf = settings(listener(proxy_max_header_length=256))
    run = await run_gate([big[:16]], conf=conf)
    assert run.event.reason == "too_long"
    assert "proxyMaxHeaderLength" in run.event.message
    run = await run_gate([big], conf=settings())
    assert run.context is not None


# -- optional mode --------------------------------------------------------------------------


def optional(protocol: ListenerProtocol = ListenerProtocol.SMTP) -> Settings:
    return settings(
        listener(protocol=protocol, proxy_header_mode=HeaderMode.OPTIONAL, proxy_optional_wait=0.5)
    )


async def test_optional_server_first_greets_after_the_short_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    run = await run_gate([], conf=optional())
    ctx = run.context
    assert ctx is not None
    assert not ctx.proxied and ctx.address_source is AddressSource.SOCKET
    assert run.admitted_at is not None and run.admitted_at - start == pytest.approx(0.5)
    assert (run.event.name, run.event.reason) == (EventName.DIRECT, "no_header")


@pytest.mark.parametrize("deliver", DELIVERIES)
async def test_optional_mode_still_reads_a_header(
    deliver: object, autojump_clock: trio.testing.MockClock
) -> None:
    run = await run_gate(deliver(V2_TCP4), conf=optional())  # type: ignore[operator]
    assert run.context is not None and run.context.address_source is AddressSource.HEADER
    assert run.context.client_ip == CLIENT.ip


@pytest.mark.parametrize("protocol", [ListenerProtocol.SMTP, ListenerProtocol.HTTP])
async def test_optional_mode_serves_protocol_bytes_directly(
    protocol: ListenerProtocol, autojump_clock: trio.testing.MockClock
) -> None:
    request = b"GET / HTTP/1.1\r\n\r\n" if protocol is ListenerProtocol.HTTP else EHLO
    run = await run_gate(bytewise(request), conf=optional(protocol))
    assert run.context is not None and run.stream is not None
    assert not run.context.proxied
    assert await rest_of(run.stream, len(request)) == request


async def test_optional_mode_rejects_a_malformed_header() -> None:
    run = await run_gate([b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n"], conf=optional())
    assert (run.event.name, run.event.reason) == (EventName.REJECTED, "bad_address")


# -- untrusted peers ------------------------------------------------------------------------


async def test_untrusted_without_header_is_served_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The SMTP banner goes out with no delay at all: the gate does not wait for bytes."""
    client, server = trio.testing.memory_stream_pair()
    gate = ProxyGate(settings())
    start = trio.current_time()
    stream, ctx = await gate.admit(server, listener="smtp", peer=STRANGER, local=LOCAL)
    await stream.send_all(b"220 mx ESMTP\r\n")
    assert trio.current_time() == start
    assert await client.receive_some() == b"220 mx ESMTP\r\n"
    assert (str(ctx.client_ip), ctx.client_port) == STRANGER
    assert not ctx.proxied and ctx.address_source is AddressSource.SOCKET
    await client.send_all(EHLO)
    assert await rest_of(stream, len(EHLO)) == EHLO


@pytest.mark.parametrize("deliver", DELIVERIES)
@pytest.mark.parametrize("header", [V1_TCP4, V2_TCP4], ids=["v1", "v2"])
async def test_untrusted_header_is_never_honoured(deliver: object, header: bytes) -> None:
    run = await run_gate(deliver(header), peer=STRANGER)  # type: ignore[operator]
    assert run.stream is not None and run.context is not None
    # The spoof attempt cannot have changed the client address.
    assert (str(run.context.client_ip), run.context.client_port) == STRANGER
    with pytest.raises(UntrustedHeaderError) as info:
        await run.stream.receive_some()
    assert isinstance(info.value, trio.BrokenResourceError)
    event = info.value.event
    assert (event.name, event.reason) == (EventName.UNTRUSTED_HEADER, "untrusted_header")
    assert "203.0.113.9" in event.message and "'smtp'" in event.message
    assert "add '203.0.113.9' to proxyTrustedNetworks" in event.message
    assert run.gate.counters.get("smtp", EventName.UNTRUSTED_HEADER) == 1


async def test_untrusted_bytes_that_might_be_a_header_wait_for_the_decision() -> None:
    client, server = trio.testing.memory_stream_pair()
    stream, _ = await ProxyGate(settings()).admit(
        server, listener="smtp", peer=STRANGER, local=LOCAL
    )
    got: list[bytes] = []

    async def read() -> None:
        got.append(bytes(await stream.receive_some()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        for byte in bytewise(b"PRO"):
            await client.send_all(byte)
            await trio.testing.wait_all_tasks_blocked()
        # "PRO" could still become "PROXY ": nothing is handed on until it is decided.
        assert got == []
        await client.send_all(b"BE x\r\n")
    assert got == [b"PROBE x\r\n"]


async def test_untrusted_eof_before_any_byte_is_plain_eof() -> None:
    run = await run_gate([], peer=STRANGER, eof=True)
    assert run.stream is not None
    assert await run.stream.receive_some() == b""


async def test_spoof_burst_changes_no_client_ip() -> None:
    gate = ProxyGate(settings())
    for i in range(50):
        peer = (f"203.0.113.{i + 1}", 50000 + i)
        run = await run_gate([V2_TCP4 + EHLO], peer=peer, gate=gate)
        assert run.context is not None
        assert (str(run.context.client_ip), run.context.client_port) == peer
        assert run.stream is not None
        with pytest.raises(UntrustedHeaderError):
            await run.stream.receive_some()
    assert gate.counters.get("smtp", EventName.UNTRUSTED_HEADER) == 50


# -- trusted networks: override semantics and v4-mapped peers -------------------------------


async def test_override_absent_inherits_the_server_wide_list() -> None:
    run = await run_gate([V2_TCP4])
    assert run.context is not None and run.context.proxied


async def test_override_replaces_the_server_wide_list() -> None:
    conf = settings(listener(override_proxy_trusted_networks=TrustedNetworks(["10.0.0.0/8"])))
    run = await run_gate([V2_TCP4], conf=conf)  # from 127.0.0.1: trusted server-wide only
    assert run.context is not None and not run.context.proxied
    assert run.stream is not None
    with pytest.raises(UntrustedHeaderError) as info:
        await run.stream.receive_some()
    assert "listener's overrideProxyTrustedNetworks" in info.value.event.message
    assert "replaces proxyTrustedNetworks" in info.value.event.message

    run = await run_gate([V2_TCP4], conf=conf, peer=("10.1.2.3", 4000))
    assert run.context is not None and run.context.client_ip == CLIENT.ip


async def test_explicitly_empty_override_turns_proxy_off() -> None:
    conf = settings(listener(override_proxy_trusted_networks=TrustedNetworks([])))
    run = await run_gate([V1_TCP4], conf=conf)
    assert run.context is not None and not run.context.proxied
    assert run.stream is not None
    with pytest.raises(UntrustedHeaderError) as info:
        await run.stream.receive_some()
    assert "the PROXY protocol is off on this listener" in info.value.event.message


async def test_listeners_trust_different_proxies() -> None:
    conf = settings(
        listener("smtp"),
        listener(
            "imap",
            ListenerProtocol.IMAP,
            override_proxy_trusted_networks=TrustedNetworks(["192.0.2.0/24"]),
        ),
    )
    smtp = await run_gate([V2_TCP4], conf=conf, listener_name="smtp")
    imap = await run_gate([V2_TCP4], conf=conf, listener_name="imap")
    assert smtp.context is not None and smtp.context.proxied
    assert imap.context is not None and not imap.context.proxied


async def test_v4_mapped_peer_matches_ipv4_ranges() -> None:
    run = await run_gate([V2_TCP4], peer=("::ffff:127.0.0.1", 51000))
    ctx = run.context
    assert ctx is not None and ctx.proxied
    assert ctx.peer_ip == ipaddress.IPv4Address("127.0.0.1")
    assert run.event.peer == "127.0.0.1:51000"


async def test_v4_mapped_untrusted_peer_is_advised_in_ipv4_form() -> None:
    run = await run_gate([V2_TCP4], peer=("::ffff:203.0.113.9", 51000))
    assert run.stream is not None
    with pytest.raises(UntrustedHeaderError) as info:
        await run.stream.receive_some()
    assert "add '203.0.113.9'" in info.value.event.message


async def test_ipv6_proxy_peer() -> None:
    run = await run_gate([V1_TCP4], peer=("::1", 51000))
    assert run.context is not None and run.context.proxied
    assert run.event.peer == "[::1]:51000"


# -- reload ---------------------------------------------------------------------------------


async def test_reload_applies_to_new_connections_only() -> None:
    events: list[GateEvent] = []
    gate = ProxyGate(settings(), on_event=events.append)
    untrusting = settings(trusted=["10.0.0.0/8"])
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        result: list[ConnectionContext] = []

        async def admit() -> None:
            _, ctx = await gate.admit(server, listener="smtp", peer=PROXY_PEER, local=LOCAL)
            result.append(ctx)

        nursery.start_soon(admit)
        await client.send_all(V1_TCP4[:10])
        await trio.testing.wait_all_tasks_blocked()
        gate.reload(untrusting)  # mid-header: this connection keeps the settings it started with
        await client.send_all(V1_TCP4[10:])
    assert result[0].proxied and result[0].client_ip == CLIENT.ip
    assert gate.settings is untrusting

    run = await run_gate([V1_TCP4], gate=gate)
    assert run.context is not None and not run.context.proxied


# -- events ---------------------------------------------------------------------------------


async def test_rejection_is_logged_with_peer_listener_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailedge")
    await run_gate([CLIENT_HELLO])
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    text = record.getMessage()
    assert text.startswith(
        "proxy.rejected listener=smtp peer=127.0.0.1:51000 reason=not_proxy_header"
    )
    assert "TLS ClientHello" in text
    fields = record.mailedge  # type: ignore[attr-defined]
    assert fields["event"] == "proxy.rejected"
    assert fields["peer"] == "127.0.0.1:51000"
    assert fields["listener"] == "smtp"


async def test_counters_by_listener_and_reason() -> None:
    gate = ProxyGate(settings())
    await run_gate([V1_TCP4], gate=gate)
    await run_gate([V1_TCP4], gate=gate)
    await run_gate([EHLO], gate=gate)
    assert gate.counters.get("smtp", EventName.ACCEPTED, "header") == 2
    assert gate.counters.get("smtp", EventName.REJECTED, "not_proxy_header") == 1
    assert gate.counters.get("smtp", EventName.REJECTED) == 1
    assert gate.counters.get("imap", EventName.ACCEPTED) == 0
    assert dict(gate.counters) == {
        ("smtp", "proxy.accepted", "header"): 2,
        ("smtp", "proxy.rejected", "not_proxy_header"): 1,
    }


async def test_unknown_listener_is_a_clear_error() -> None:
    gate = ProxyGate(settings())
    _, server = trio.testing.memory_stream_pair()
    with pytest.raises(KeyError, match="nope"):
        await gate.admit(server, listener="nope", peer=PROXY_PEER, local=LOCAL)


async def test_routine_decisions_are_counted_and_logged_only_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = ProxyGate(settings())  # no event sink: the gate builds no event it need not
    caplog.set_level(logging.INFO, logger="mailedge")
    await run_gate([V1_TCP4], gate=gate)
    await run_gate([EHLO], peer=STRANGER, gate=gate)
    assert caplog.records == []
    caplog.set_level(logging.DEBUG, logger="mailedge")
    await run_gate([V1_TCP4], gate=gate)
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "proxy.accepted listener=smtp peer=127.0.0.1:51000 client=198.51.100.7:40123 reason=header"
    )
    assert gate.counters.get("smtp", EventName.ACCEPTED, "header") == 2
    assert gate.counters.get("smtp", EventName.DIRECT, "untrusted") == 1


async def test_a_timeout_storm_is_counted_in_full_and_logged_in_part(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mailedge")
    events: list[GateEvent] = []
    gate = ProxyGate(settings(), on_event=events.append, log_limiter=LogLimiter(burst=5))
    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(functools.partial(run_gate, [V1_TCP4[:10]], gate=gate))
    assert gate.counters.get("smtp", EventName.TIMEOUT, "timeout") == 40
    assert len(events) == 40  # the sink (auto-ban, metrics) sees every one
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and "further ones are counted, not logged" in lines[5]


@pytest.mark.parametrize(("deliver", "wrapped"), [(whole, False), (with_app, True)])
async def test_the_stream_is_wrapped_only_to_hand_on_bytes(deliver: object, wrapped: bool) -> None:
    assert callable(deliver)
    run = await run_gate(deliver(V2_TCP4))
    assert isinstance(run.stream, PrefixedStream) is wrapped
    assert run.context is not None and run.context.client_ip == CLIENT.ip


async def test_the_parsed_address_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate_module, "IP_CACHE_SIZE", 8)
    gate = ProxyGate(settings())
    for i in range(20):
        run = await run_gate([EHLO], peer=(f"203.0.113.{i}", 4000), gate=gate)
        assert run.context is not None and str(run.context.client_ip) == f"203.0.113.{i}"
        assert len(gate._ips) <= 8


# -- a caller's deadline scope --------------------------------------------------------------


async def test_with_the_callers_scope_a_timeout_cancels_it_and_is_still_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[GateEvent] = []
    gate = ProxyGate(settings(), on_event=events.append)
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(V1_TCP4[:12])
    start = trio.current_time()
    with trio.CancelScope() as deadline:
        await gate.admit(server, listener="smtp", peer=PROXY_PEER, local=LOCAL, deadline=deadline)
    assert deadline.cancelled_caught
    assert trio.current_time() - start == pytest.approx(5.0)
    (event,) = events
    assert (event.name, event.reason) == (EventName.TIMEOUT, "timeout")
    assert event.first_bytes == V1_TCP4[:12].decode()
    assert gate.counters.get("smtp", EventName.TIMEOUT, "timeout") == 1


async def test_with_the_callers_scope_a_header_leaves_its_deadline_to_move_on() -> None:
    gate = ProxyGate(settings())
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(V2_TCP4 + EHLO)
    start = trio.current_time()
    with trio.CancelScope() as deadline:
        stream, context = await gate.admit(
            server, listener="smtp", peer=PROXY_PEER, local=LOCAL, deadline=deadline
        )
    assert deadline.deadline == pytest.approx(start + 5.0, abs=0.5)
    assert context.client_ip == CLIENT.ip
    assert await stream.receive_some() == EHLO


async def test_the_callers_own_cancellation_is_not_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[GateEvent] = []
    gate = ProxyGate(settings(), on_event=events.append)
    _client, server = trio.testing.memory_stream_pair()
    with trio.move_on_after(1) as outer, trio.CancelScope() as deadline:
        await gate.admit(server, listener="smtp", peer=PROXY_PEER, local=LOCAL, deadline=deadline)
    assert outer.cancelled_caught and not deadline.cancelled_caught
    assert events == []
    assert list(gate.counters) == []


@pytest.mark.parametrize("client", [0x02, 0x04, 0x06])
async def test_a_certificate_without_client_ssl_is_neither_tls_nor_verified(client: int) -> None:
    """CERT_CONN or CERT_SESS with verify 0 but no CLIENT_SSL bit: the client did not use TLS,
    so nothing about a certificate may be believed (the TLS details are read only under TLS)."""
    run = await run_gate([ssl_header(client, cn="mallory")])
    ctx = run.context
    assert ctx is not None and ctx.header is not None
    assert ctx.header.ssl is not None and ctx.header.ssl.verified  # what the TLV claims
    assert not ctx.tls
    assert not ctx.client_cert_verified
    assert ctx.client_cert_cn is None
