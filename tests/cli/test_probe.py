"""``mailedge probe`` against a real server: the example handlers on 127.0.0.1 and ::1."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import pathlib
import sys
from collections.abc import Awaitable, Callable
from functools import partial

import attrs
import pytest
import trio
from mailedge_examples.http_handler import HTTPHandler
from mailedge_examples.imap_handler import IMAPHandler
from mailedge_examples.smtp_handler import SMTPHandler

from mailedge.cli._main import build_parser
from mailedge.cli.probe import Outcome, ProbeResult, probe
from mailedge.cli.probe_command import options_from_args
from mailedge.cli.probe_options import (
    DEFAULT_CLIENT,
    HeaderMode,
    ProbeOptions,
    Target,
    parse_inet_address,
)
from mailedge.cli.probe_report import format_result
from mailedge.context import ConnectionContext
from mailedge.networks import TrustedNetworks
from mailedge.proxy import Command, Family, InetAddress, parse_header
from mailedge.server import Handler, Server, serve
from mailedge.settings import (
    BindAddress,
    ListenerProtocol,
    NetworkListener,
    Settings,
    SystemSettings,
)

REPO = pathlib.Path(__file__).resolve().parents[2]


def listeners() -> tuple[NetworkListener, ...]:
    """Per protocol, "<protocol>-proxy" trusts loopback; "<protocol>-direct" has PROXY off.

    "smtp-impatient" trusts loopback and waits only 50 ms for a header.
    """
    bind = (BindAddress.parse("127.0.0.1:0"), BindAddress.parse("[::1]:0"))
    made: list[NetworkListener] = []
    for protocol in ListenerProtocol:
        made.append(NetworkListener(name=f"{protocol}-proxy", protocol=protocol, bind=bind))
        made.append(
            NetworkListener(
                name=f"{protocol}-direct",
                protocol=protocol,
                bind=bind,
                override_proxy_trusted_networks=TrustedNetworks([]),
            )
        )
    made.append(
        NetworkListener(
            name="smtp-impatient",
            protocol=ListenerProtocol.SMTP,
            bind=bind,
            proxy_header_timeout=0.05,
        )
    )
    return tuple(made)


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: pathlib.Path) -> Server:
    """The example server, cancelled with the test's nursery when the test ends."""
    settings = Settings(
        system=SystemSettings(proxy_trusted_networks=TrustedNetworks(["127.0.0.0/8", "::1"])),
        listeners=listeners(),
    )
    handlers: dict[ListenerProtocol, Handler] = {
        ListenerProtocol.SMTP: SMTPHandler(hostname="mx.test", maildir=tmp_path / "Maildir"),
        ListenerProtocol.IMAP: IMAPHandler(hostname="mx.test", users={}),
        ListenerProtocol.HTTP: HTTPHandler(),
    }
    started: Server = await nursery.start(partial(serve, settings, handlers))
    return started


def target(server: Server, listener: str, family: int = 4) -> Target:
    host, port = next(
        (host, port) for host, port in server.addresses[listener] if (":" in host) == (family == 6)
    )
    return Target(host, port)


def options(
    server: Server,
    protocol: ListenerProtocol,
    kind: str = "proxy",
    family: int = 4,
    **knobs: object,
) -> ProbeOptions:
    return ProbeOptions(
        protocol=protocol,
        target=target(server, f"{protocol}-{kind}", family),
        **knobs,  # type: ignore[arg-type]
    )


# --- through a listener that trusts the probe ----------------------------------------------


@pytest.mark.parametrize("mode", [HeaderMode.V1, HeaderMode.V2])
async def test_smtp_through_a_trusted_listener_sees_the_claimed_client(
    server: Server, mode: HeaderMode
) -> None:
    client = InetAddress(ipaddress.ip_address("198.51.100.20"), 1234)
    result = await probe(options(server, ListenerProtocol.SMTP, mode=mode, client=client))
    assert result.outcome is Outcome.COMPLETED
    assert result.client_seen == "198.51.100.20"
    assert result.matched is True
    assert result.exit_code == 0
    assert result.replies[0] == "220 mx.test ESMTP mailedge example"
    assert result.replies[1] == "250-mx.test Hello probe.mailedge.test [198.51.100.20]"
    assert result.replies[-1].startswith("221 ")
    parsed = parse_header(result.header)
    assert parsed is not None
    assert parsed[0].version == (1 if mode is HeaderMode.V1 else 2)
    assert parsed[0].source == client
    text = format_result(result)
    assert "server sees client: 198.51.100.20" in text
    assert "MATCH" in text
    assert "MISMATCH" not in text
    if mode is HeaderMode.V1:
        assert "PROXY TCP4 198.51.100.20 127.0.0.1 1234 " in text


async def test_smtp_default_client_and_server(server: Server) -> None:
    opts = options(server, ListenerProtocol.SMTP)
    result = await probe(opts)
    assert result.client_seen == str(DEFAULT_CLIENT.ip)
    assert result.matched is True
    parsed = parse_header(result.header)
    assert parsed is not None
    # --server defaults to the address the probe connected to.
    assert parsed[0].destination == InetAddress(ipaddress.ip_address("127.0.0.1"), opts.target.port)


async def test_http_with_ssl_and_authority_shows_tls_terminated_by_the_proxy(
    server: Server,
) -> None:
    result = await probe(
        options(
            server,
            ListenerProtocol.HTTP,
            ssl=True,
            cipher="TLS_AES_128_GCM_SHA256",
            cn="client.example.org",
            cert_verified=True,
            authority="mail.example.com",
            alpn="http/1.1",
            unique_id="probe-1",
            crc32c=True,
        )
    )
    assert result.outcome is Outcome.COMPLETED, result.detail
    assert result.http_status == 200
    whoami = result.whoami
    assert whoami is not None
    assert whoami["client_ip"] == "203.0.113.7"
    assert whoami["client_port"] == 40000
    assert whoami["address_source"] == "header"
    assert whoami["tls"] is True
    assert whoami["tls_terminated_by"] == "proxy"
    assert whoami["tls_version"] == "TLSv1.3"
    assert whoami["tls_cipher"] == "TLS_AES_128_GCM_SHA256"
    assert whoami["sni"] == "mail.example.com"
    assert whoami["alpn"] == "http/1.1"
    assert whoami["unique_id"] == b"probe-1".hex()
    assert whoami["client_cert_cn"] == "client.example.org"
    assert whoami["client_cert_verified"] is True
    assert result.matched is True
    assert result.exit_code == 0
    parsed = parse_header(result.header)
    assert parsed is not None
    assert parsed[0].crc32c_verified
    # The Host header follows the claimed SNI name, as a browser's would.
    assert ("sent", "Host: mail.example.com") in result.transcript
    text = format_result(result)
    assert '"tls_terminated_by": "proxy"' in text
    assert "TLVs: ALPN, AUTHORITY, UNIQUE_ID, SSL, CRC32C" in text


async def test_ssl_without_certificate_is_not_verified(server: Server) -> None:
    result = await probe(options(server, ListenerProtocol.HTTP, ssl=True, tls_version="TLSv1.2"))
    assert result.whoami is not None
    assert result.whoami["tls"] is True
    assert result.whoami["tls_version"] == "TLSv1.2"
    assert result.whoami["client_cert_verified"] is False


async def test_local_header_is_a_health_check(server: Server) -> None:
    result = await probe(options(server, ListenerProtocol.HTTP, mode=HeaderMode.LOCAL))
    assert result.outcome is Outcome.COMPLETED
    assert result.whoami is not None
    assert result.whoami["address_source"] == "proxy_local"
    assert result.whoami["proxied"] is True
    assert result.client_seen == "127.0.0.1"
    assert result.matched is None  # a LOCAL header claims no client
    assert result.exit_code == 0
    parsed = parse_header(result.header)
    assert parsed is not None
    assert parsed[0].command is Command.LOCAL
    assert "LOCAL header names no client" in format_result(result)


async def test_imap_completes_but_cannot_check_the_client(server: Server) -> None:
    result = await probe(options(server, ListenerProtocol.IMAP))
    assert result.outcome is Outcome.COMPLETED, result.detail
    assert result.replies[0].startswith("* OK [CAPABILITY IMAP4rev1")
    assert "a1 OK CAPABILITY completed" in result.replies
    assert result.replies[-1] == "a2 OK LOGOUT completed"
    assert result.client_seen is None
    assert result.matched is None
    assert result.exit_code == 0
    assert "cannot be checked here" in format_result(result)


@pytest.mark.parametrize("mode", [HeaderMode.V1, HeaderMode.V2])
async def test_ipv6_target_with_an_ipv4_client(server: Server, mode: HeaderMode) -> None:
    result = await probe(options(server, ListenerProtocol.SMTP, family=6, mode=mode))
    assert result.outcome is Outcome.COMPLETED, result.detail
    assert result.local is not None
    assert result.local.startswith("[::1]:")
    # Two families: written as IPv6 with the client v4-mapped, read back as IPv4.
    parsed = parse_header(result.header)
    assert parsed is not None
    assert parsed[0].family is Family.INET6
    assert parsed[0].source == DEFAULT_CLIENT
    assert result.client_seen == "203.0.113.7"
    assert result.matched is True
    if mode is HeaderMode.V1:
        assert result.header.startswith(b"PROXY TCP6 ::ffff:203.0.113.7 ::1 40000 ")


async def test_ipv6_target_with_an_ipv6_client(server: Server) -> None:
    client = parse_inet_address("[2001:db8::7]:5000")
    result = await probe(options(server, ListenerProtocol.HTTP, family=6, client=client))
    assert result.client_seen == "2001:db8::7"
    assert result.matched is True
    assert result.whoami is not None
    assert result.whoami["server_ip"] == "::1"


async def test_no_header_to_a_trusted_listener_times_out(server: Server) -> None:
    # The listener waits (5 s) for the header it requires; the probe gives up first.
    result = await probe(options(server, ListenerProtocol.SMTP, mode=HeaderMode.NONE, timeout=0.2))
    assert result.outcome is Outcome.TIMEOUT
    assert result.header == b""
    assert result.exit_code == 1
    text = format_result(result)
    assert "no reply within 0.2 s while waiting for the banner" in text
    assert "seems to trust this address (127.0.0.1) as a proxy" in text


async def test_no_header_to_a_trusted_listener_is_closed_after_its_header_timeout(
    server: Server,
) -> None:
    opts = ProbeOptions(
        ListenerProtocol.SMTP, target(server, "smtp-impatient"), mode=HeaderMode.NONE
    )
    result = await probe(opts)
    assert result.outcome is Outcome.CLOSED
    assert result.replies == []
    assert result.exit_code == 1
    text = format_result(result)
    assert "the server closed the connection while the probe was waiting for the banner" in text
    assert "No header was sent. A listener that trusts this address (127.0.0.1)" in text
    assert f"peer={result.local}" in text


async def test_a_host_name_target_uses_the_resolved_address_as_server(server: Server) -> None:
    port = target(server, "smtp-proxy").port
    result = await probe(ProbeOptions(ListenerProtocol.SMTP, Target("localhost", port)))
    assert result.outcome is Outcome.COMPLETED, result.detail
    assert result.matched is True
    parsed = parse_header(result.header)
    assert parsed is not None
    assert isinstance(parsed[0].destination, InetAddress)
    assert str(parsed[0].destination.ip) in ("127.0.0.1", "::1")
    assert parsed[0].destination.port == port


# --- through a listener with PROXY off -----------------------------------------------------


@pytest.mark.parametrize("protocol", list(ListenerProtocol))
async def test_no_header_to_a_direct_listener(server: Server, protocol: ListenerProtocol) -> None:
    result = await probe(options(server, protocol, "direct", mode=HeaderMode.NONE))
    assert result.outcome is Outcome.COMPLETED, result.detail
    assert result.header == b""
    assert result.matched is None
    assert result.exit_code == 0
    if protocol is not ListenerProtocol.IMAP:
        assert result.client_seen == "127.0.0.1"
        assert "no claim to check: the server sees 127.0.0.1" in format_result(result)
    assert "header sent: none (--no-header)" in format_result(result)


@pytest.mark.parametrize("protocol", list(ListenerProtocol))
async def test_header_to_a_listener_with_proxy_off_is_closed(
    server: Server, protocol: ListenerProtocol
) -> None:
    result = await probe(options(server, protocol, "direct"))
    assert result.outcome is Outcome.CLOSED
    assert result.closed_early
    assert result.exit_code == 1
    assert result.client_seen is None
    text = format_result(result)
    assert "the server closed the connection" in text or "reset the connection" in text
    assert "PROXY is off on that listener" in text
    assert "not in the listener's trusted networks" in text or "not a trusted proxy" in text
    assert f"peer={result.local}" in text
    if protocol.server_first:
        # Served as a direct client: greeted at once, closed when the header was read.
        assert result.replies
        assert "greeted the probe before reading the header" in text
    else:
        assert result.replies == []


async def test_json_output(server: Server) -> None:
    result = await probe(options(server, ListenerProtocol.SMTP, mode=HeaderMode.V1))
    data = json.loads(format_result(result, json=True))
    assert data["outcome"] == "completed"
    assert data["exit_code"] == 0
    assert data["matched"] is True
    assert data["client_seen"] == "203.0.113.7"
    assert data["claimed_client"] == {"ip": "203.0.113.7", "port": 40000}
    assert data["header"]["mode"] == "v1"
    assert data["header"]["text"].startswith("PROXY TCP4 203.0.113.7 127.0.0.1 40000 ")
    assert data["header"]["text"].endswith("\\r\\n")
    assert bytes.fromhex(data["header"]["hex"]) == result.header
    assert data["header"]["decoded"]["source"] == {"ip": "203.0.113.7", "port": 40000}
    assert data["transcript"][1] == {"direction": "sent", "line": "EHLO probe.mailedge.test"}
    assert data["explanation"][0].startswith("MATCH")


async def test_subprocess_with_the_example_servers_try_it_syntax(server: Server) -> None:
    smtp = target(server, "smtp-proxy")
    completed = await trio.run_process(
        [
            sys.executable,
            "-m",
            "mailedge.cli",
            "probe",
            "smtp",
            str(smtp),
            "--client",
            "203.0.113.7:40000",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=REPO,
    )
    out = completed.stdout.decode()
    assert completed.returncode == 0, (out, completed.stderr.decode())
    assert out.startswith(f"probe smtp {smtp} from 127.0.0.1:")
    assert "server sees client: 203.0.113.7" in out
    assert "MATCH: the server sees the client the header claimed, 203.0.113.7." in out


# --- against servers that are not mailedge -------------------------------------------------


async def serve_fake(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> Target:
    """A one-off TCP server on 127.0.0.1; the probe closing on it is not its error."""

    async def run(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await handler(stream)

    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, run, 0, host="127.0.0.1")
    )
    host, port = listeners[0].socket.getsockname()[:2]
    return Target(host, port)


async def test_mismatch_when_the_server_ignores_the_header(nursery: trio.Nursery) -> None:
    async def careless_smtp(stream: trio.SocketStream) -> None:
        """Greets, and answers EHLO with the socket's peer: it never reads PROXY headers."""
        peer = stream.socket.getpeername()[0]
        await stream.send_all(b"220 careless.test ESMTP\r\n")
        buffer = b""
        while data := await stream.receive_some():
            buffer += data
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                if line.startswith(b"EHLO"):
                    reply = f"250-careless.test Hello x [{peer}]\r\n250 8BITMIME\r\n"
                    await stream.send_all(reply.encode())
                elif line == b"QUIT":
                    await stream.send_all(b"221 bye\r\n")
                    return

    fake = await serve_fake(nursery, careless_smtp)
    result = await probe(ProbeOptions(ListenerProtocol.SMTP, fake, mode=HeaderMode.V1))
    assert result.outcome is Outcome.COMPLETED
    assert result.client_seen == "127.0.0.1"
    assert result.matched is False
    assert result.exit_code == 1
    text = format_result(result)
    assert "MISMATCH: the header claimed 203.0.113.7, but the server sees 127.0.0.1." in text
    assert "That is the probe's own address: the header was not used." in text
    assert "does not trust this address (127.0.0.1) as a proxy" in text


async def test_a_protocol_that_is_not_smtp(nursery: trio.Nursery) -> None:
    async def imap_like(stream: trio.SocketStream) -> None:
        await stream.send_all(b"* OK not smtp\r\n")
        await stream.receive_some()

    fake = await serve_fake(nursery, imap_like)
    result = await probe(ProbeOptions(ListenerProtocol.SMTP, fake))
    assert result.outcome is Outcome.BAD_REPLY
    assert result.exit_code == 1
    assert f"Is {fake} an SMTP listener?" in format_result(result)


async def test_a_refusal_banner(nursery: trio.Nursery) -> None:
    async def busy(stream: trio.SocketStream) -> None:
        await stream.send_all(b"421 4.7.0 Too many connections, try again later\r\n")

    fake = await serve_fake(nursery, busy)
    result = await probe(ProbeOptions(ListenerProtocol.SMTP, fake))
    assert result.outcome is Outcome.REFUSED
    assert result.detail == (
        "the server refused the session: 421 4.7.0 Too many connections, try again later"
    )
    assert result.exit_code == 1
    assert "compare with --no-header" in format_result(result)


async def test_a_server_that_never_stops_talking(nursery: trio.Nursery) -> None:
    async def flood(stream: trio.SocketStream) -> None:
        while True:
            await stream.send_all(b"x" * 65536)

    fake = await serve_fake(nursery, flood)
    result = await probe(ProbeOptions(ListenerProtocol.IMAP, fake))
    assert result.outcome is Outcome.BAD_REPLY
    assert result.detail is not None
    assert "more than 65536 bytes" in result.detail


async def test_connection_refused() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Bound, never listening, now closed: nothing accepts on this port.
    result = await probe(ProbeOptions(ListenerProtocol.SMTP, Target("127.0.0.1", port)))
    assert result.outcome is Outcome.CONNECT_FAILED
    assert result.exit_code == 1
    assert result.detail == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    # The header is built before connecting, so it is shown even then.
    assert result.header.startswith(b"\r\n\r\n\x00\r\nQUIT\n")
    assert "Is the server running" in format_result(result)


# --- results -------------------------------------------------------------------------------


def test_result_exit_codes() -> None:
    opts = ProbeOptions(ListenerProtocol.SMTP, Target("127.0.0.1", 25))
    completed = ProbeResult(opts, Outcome.COMPLETED)
    assert completed.exit_code == 0
    assert attrs.evolve(completed, matched=True).exit_code == 0
    assert attrs.evolve(completed, matched=False).exit_code == 1
    for outcome in Outcome:
        if outcome is not Outcome.COMPLETED:
            assert ProbeResult(opts, outcome).exit_code == 1


async def test_a_reply_naming_the_claimed_client_is_not_blamed_on_trust(
    nursery: trio.Nursery,
) -> None:
    """docs/embedding.md's ten-line server greets with the client and closes."""

    async def hello(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        await stream.send_all(f"220 you are {context.client_ip}\r\n".encode())

    settings = Settings(
        system=SystemSettings(proxy_trusted_networks=TrustedNetworks(["127.0.0.0/8"])),
        listeners=(NetworkListener(name="smtp", protocol="smtp", bind="127.0.0.1:0"),),
    )
    server: Server = await nursery.start(partial(serve, settings, {"smtp": hello}))
    host, port = server.addresses["smtp"][0]
    done = await trio.run_process(
        [sys.executable, "-m", "mailedge", "probe", "smtp", f"{host}:{port}"],
        capture_stdout=True,
        check=False,
    )
    out = done.stdout.decode()
    assert "< 220 you are 203.0.113.7" in out
    assert "the header was used, and trust is not the problem" in out
    assert "trusted networks" not in out
    nursery.cancel_scope.cancel()


async def test_source_connects_from_the_given_address(server: Server) -> None:
    source = ipaddress.ip_address("127.0.0.2")
    result = await probe(options(server, ListenerProtocol.SMTP, source=source))
    assert result.outcome is Outcome.COMPLETED, result.detail
    assert result.local is not None and result.local.startswith("127.0.0.2:")
    assert result.matched is True


def test_source_is_a_command_line_option() -> None:
    parsed = build_parser().parse_args(["probe", "smtp", "127.0.0.1:25", "--source", "10.0.0.5"])
    assert options_from_args(parsed).source == ipaddress.ip_address("10.0.0.5")
