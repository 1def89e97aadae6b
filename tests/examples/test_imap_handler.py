"""The example IMAP handler: greeting, CAPABILITY, STARTTLS, LOGINDISABLED and LOGIN."""

from __future__ import annotations

import functools
import ipaddress
import logging
import pathlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trustme
from handler_support import handler_session, outcome_when_cancelled
from mailedge_examples.imap_handler import (
    MAX_LINE_LENGTH,
    IMAPHandler,
    IMAPSyntaxError,
    parse_astrings,
)
from mailedge_examples.smtp_handler import SMTPHandler

from mailedge.context import AddressSource, ConnectionContext, TLSTerminator
from mailedge.hooks import BaseHooks, HookChain, Verdict
from mailedge.hooks.autoban import AutoBan
from mailedge.hooks.store import MemoryStore
from mailedge.networks import TrustedNetworks
from mailedge.proxy import ClientFlags, Command, InetAddress, SSLInfo, encode_v2
from mailedge.server import Handler, Server, serve
from mailedge.settings import (
    AutoBanSettings,
    ListenerProtocol,
    NetworkListener,
    Settings,
    SystemSettings,
)

HOSTNAME = "imap.example"
USERS = {"alice": "correct horse", "bob": 'p\u00e4ss "w\\rd'}
GREETING_PLAIN = (
    "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED]"
    " imap.example IMAP4rev1 mailedge example ready"
)


def make_context(**changes: Any) -> ConnectionContext:
    """A direct plaintext connection from 198.51.100.7, unless ``changes`` say otherwise."""
    base = ConnectionContext(
        connection_id=17,
        listener="imap",
        protocol=ListenerProtocol.IMAP,
        client_ip=ipaddress.ip_address("198.51.100.7"),
        client_port=40123,
        server_ip=ipaddress.ip_address("192.0.2.143"),
        server_port=143,
        peer_ip=ipaddress.ip_address("198.51.100.7"),
        peer_port=40123,
        local_ip=ipaddress.ip_address("192.0.2.143"),
        local_port=143,
        proxied=False,
        address_source=AddressSource.SOCKET,
    )
    return attrs.evolve(base, **changes)


def proxy_tls_context() -> ConnectionContext:
    """A client whose TLS a trusted proxy terminated, as its SSL TLV reported."""
    return make_context(
        peer_ip=ipaddress.ip_address("10.0.0.2"),
        peer_port=55000,
        proxied=True,
        address_source=AddressSource.HEADER,
        server_port=993,
        tls=True,
        tls_terminated_by=TLSTerminator.PROXY,
        tls_version="TLSv1.3",
    )


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOSTNAME).configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@attrs.define
class Client:
    """The client's end of the connection, reading CRLF lines."""

    stream: trio.abc.Stream
    buffer: bytearray = attrs.field(factory=bytearray)

    async def send(self, data: str | bytes) -> None:
        await self.stream.send_all(data.encode() if isinstance(data, str) else data)

    async def line(self) -> str:
        while b"\r\n" not in self.buffer:
            data = await self.stream.receive_some()
            assert data, f"connection closed; unterminated data {bytes(self.buffer)!r}"
            self.buffer += data
        line, _, rest = bytes(self.buffer).partition(b"\r\n")
        self.buffer[:] = rest
        return line.decode()

    async def command(self, line: str) -> list[str]:
        """Send one command; return every response line up to and including the tagged one."""
        tag = line.split(" ", 1)[0]
        await self.send(line + "\r\n")
        lines = [await self.line()]
        while not lines[-1].startswith(tag + " "):
            lines.append(await self.line())
        return lines

    async def closed(self) -> bool:
        """True when the server closes the connection with nothing more to say."""
        data = await self.stream.receive_some()
        return not data and not self.buffer

    async def starttls(self, context: ssl.SSLContext) -> None:
        assert not self.buffer, "the server spoke after its STARTTLS reply"
        self.stream = trio.SSLStream(self.stream, context, server_hostname=HOSTNAME)
        await self.stream.do_handshake()


@asynccontextmanager
async def session(
    handler: IMAPHandler, context: ConnectionContext, *, idle_timeout: float | None = None
) -> AsyncIterator[Client]:
    """The client's side of one in-memory session with ``handler`` (see handler_session)."""
    async with handler_session(handler, context, idle_timeout=idle_timeout) as stream:
        yield Client(stream)


def plain_handler(ssl_context: ssl.SSLContext | None = None) -> IMAPHandler:
    return IMAPHandler(HOSTNAME, USERS, ssl_context)


# Greeting and CAPABILITY


async def test_greeting_on_a_plaintext_connection(
    autojump_clock: trio.testing.MockClock, server_ssl: ssl.SSLContext
) -> None:
    async with session(plain_handler(server_ssl), make_context()) as client:
        assert await client.line() == GREETING_PLAIN


async def test_greeting_without_starttls_support(autojump_clock: trio.testing.MockClock) -> None:
    async with session(plain_handler(), make_context()) as client:
        assert await client.line() == (
            "* OK [CAPABILITY IMAP4rev1 LOGINDISABLED]"
            " imap.example IMAP4rev1 mailedge example ready"
        )


async def test_capability_before_and_after_starttls(
    autojump_clock: trio.testing.MockClock,
    server_ssl: ssl.SSLContext,
    client_ssl: ssl.SSLContext,
) -> None:
    async with session(plain_handler(server_ssl), make_context()) as client:
        await client.line()
        assert await client.command("a CAPABILITY") == [
            "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED",
            "a OK CAPABILITY completed",
        ]
        assert await client.command("b STARTTLS") == ["b OK Begin TLS negotiation now"]
        await client.starttls(client_ssl)
        assert await client.command("c CAPABILITY") == [
            "* CAPABILITY IMAP4rev1",
            "c OK CAPABILITY completed",
        ]


async def test_proxy_terminated_tls_counts_as_tls(
    autojump_clock: trio.testing.MockClock, server_ssl: ssl.SSLContext
) -> None:
    async with session(plain_handler(server_ssl), proxy_tls_context()) as client:
        assert await client.line() == (
            "* OK [CAPABILITY IMAP4rev1] imap.example IMAP4rev1 mailedge example ready"
        )
        assert await client.command("a CAPABILITY") == [
            "* CAPABILITY IMAP4rev1",
            "a OK CAPABILITY completed",
        ]
        # The client already has TLS (to the proxy): no second layer.
        assert await client.command("b STARTTLS") == ["b BAD TLS is already active"]


async def test_noop_and_command_names_are_case_insensitive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(plain_handler(), make_context()) as client:
        await client.line()
        assert await client.command("a1 noop") == ["a1 OK NOOP completed"]
        assert await client.command("a2 NOOP extra") == ["a2 BAD NOOP takes no arguments"]


# LOGINDISABLED and LOGIN


@pytest.mark.parametrize("with_starttls", [True, False])
async def test_login_refused_before_tls_on_a_direct_connection(
    autojump_clock: trio.testing.MockClock,
    server_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    with_starttls: bool,
) -> None:
    handler = plain_handler(server_ssl if with_starttls else None)
    async with session(handler, make_context()) as client:
        await client.line()
        # Even the right password is refused, and never looked at.
        [reply] = await client.command('a LOGIN alice "correct horse"')
        assert reply.startswith("a NO [PRIVACYREQUIRED] ")
        assert ("STARTTLS" in reply) is with_starttls
        # The session goes on; the client is still not logged in.
        assert await client.command("b SELECT INBOX") == ["b BAD SELECT is not valid before LOGIN"]
    assert "correct horse" not in caplog.text


async def test_login_refused_when_proxied_without_tls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A proxied client is no safer than a direct one unless the proxy reported TLS.
    context = make_context(
        peer_ip=ipaddress.ip_address("10.0.0.2"), proxied=True, address_source=AddressSource.HEADER
    )
    async with session(plain_handler(), context) as client:
        await client.line()
        [reply] = await client.command("a LOGIN alice secret")
        assert reply.startswith("a NO [PRIVACYREQUIRED] ")


async def test_login_accepted_when_a_proxy_terminated_tls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(plain_handler(), proxy_tls_context()) as client:
        await client.line()
        assert await client.command('a LOGIN alice "correct horse"') == ["a OK LOGIN completed"]
        assert await client.command("b NOOP") == ["b OK NOOP completed"]


async def test_starttls_then_login(
    autojump_clock: trio.testing.MockClock,
    server_ssl: ssl.SSLContext,
    client_ssl: ssl.SSLContext,
) -> None:
    async with session(plain_handler(server_ssl), make_context()) as client:
        await client.line()
        assert await client.command("a STARTTLS") == ["a OK Begin TLS negotiation now"]
        await client.starttls(client_ssl)
        assert await client.command('b LOGIN alice "correct horse"') == ["b OK LOGIN completed"]
        assert await client.command("c LOGOUT") == [
            "* BYE imap.example logging out",
            "c OK LOGOUT completed",
        ]
        # A clean TLS close (close_notify), not a truncated stream.
        assert await client.closed()


async def test_starttls_discards_pipelined_plaintext(
    autojump_clock: trio.testing.MockClock,
    server_ssl: ssl.SSLContext,
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with session(plain_handler(server_ssl), make_context()) as client:
        await client.line()
        # A man in the middle appends a command to the client's STARTTLS, in plaintext.
        injected = 'b LOGIN alice "correct horse"\r\n'
        await client.send("a STARTTLS\r\n" + injected)
        assert await client.line() == "a OK Begin TLS negotiation now"
        await client.starttls(client_ssl)
        # Had the injected LOGIN run, its reply would come first, over TLS.
        assert await client.command("c NOOP") == ["c OK NOOP completed"]
        assert await client.command("d SELECT INBOX") == ["d BAD SELECT is not valid before LOGIN"]
    assert f"discarded {len(injected)} plaintext bytes sent after STARTTLS" in caplog.text


async def test_starttls_unavailable_without_a_server_context(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(plain_handler(), make_context()) as client:
        await client.line()
        assert await client.command("a STARTTLS") == ["a BAD STARTTLS is not available"]


async def test_failed_starttls_handshake_ends_quietly(
    autojump_clock: trio.testing.MockClock,
    server_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailedge.examples.imap")
    async with session(plain_handler(server_ssl), make_context()) as client:
        await client.line()
        assert await client.command("a STARTTLS") == ["a OK Begin TLS negotiation now"]
        await client.send(b"this is not a TLS ClientHello\r\n")
        # The server gives up on the handshake; how it says so is TLS's business.
        while await client.stream.receive_some():
            pass
    assert "STARTTLS handshake failed" in caplog.text


@pytest.mark.parametrize(
    "line",
    [
        'a LOGIN alice "correct horse"',
        'a login "alice" "correct horse"',
        'a LOGIN bob "p\u00e4ss \\"w\\\\rd"',
    ],
)
async def test_login_syntax(autojump_clock: trio.testing.MockClock, line: str) -> None:
    async with session(plain_handler(), proxy_tls_context()) as client:
        await client.line()
        assert await client.command(line) == ["a OK LOGIN completed"]


@pytest.mark.parametrize(
    "line",
    [
        "a LOGIN alice wrong",
        'a LOGIN alice "correct horse "',
        'a LOGIN mallory "correct horse"',
        'a LOGIN Alice "correct horse"',
        'a LOGIN alice ""',
    ],
)
async def test_bad_credentials(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, line: str
) -> None:
    caplog.set_level(logging.INFO, logger="mailedge.examples.imap")
    async with session(plain_handler(), proxy_tls_context()) as client:
        await client.line()
        assert await client.command(line) == ["a NO [AUTHENTICATIONFAILED] Authentication failed"]
        assert await client.command("b SELECT INBOX") == ["b BAD SELECT is not valid before LOGIN"]
    [record] = [r for r in caplog.records if "LOGIN failed" in r.getMessage()]
    # The log names the connection and the real client, never the password.
    assert record.getMessage().startswith("#17 imap client=198.51.100.7:40123: LOGIN failed")
    assert "correct horse" not in caplog.text
    assert "wrong" not in caplog.text


async def test_too_many_failed_logins_end_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(plain_handler(), proxy_tls_context()) as client:
        await client.line()
        for tag in ("a", "b"):
            assert await client.command(f"{tag} LOGIN alice guess") == [
                f"{tag} NO [AUTHENTICATIONFAILED] Authentication failed"
            ]
        assert await client.command("c LOGIN alice guess") == [
            "c NO [AUTHENTICATIONFAILED] Authentication failed"
        ]
        assert await client.line() == "* BYE Too many authentication failures"
        assert await client.closed()


@pytest.mark.parametrize(
    ("arguments", "reply"),
    [
        ("alice", "a BAD LOGIN takes a user name and a password"),
        ("alice secret extra", "a BAD LOGIN takes a user name and a password"),
        ("", "a BAD LOGIN takes a user name and a password"),
        ('alice "unterminated', "a BAD Unterminated quoted string"),
        ("alice {6}", "a BAD Literals are not supported by this example server"),
    ],
)
async def test_malformed_login(
    autojump_clock: trio.testing.MockClock, arguments: str, reply: str
) -> None:
    async with session(plain_handler(), proxy_tls_context()) as client:
        await client.line()
        assert await client.command(f"a LOGIN {arguments}".rstrip()) == [reply]


async def test_authenticated_state(autojump_clock: trio.testing.MockClock) -> None:
    async with session(plain_handler(), proxy_tls_context()) as client:
        await client.line()
        await client.command('a LOGIN alice "correct horse"')
        assert await client.command("b SELECT INBOX") == [
            "b NO [CANNOT] This example server has no mailboxes"
        ]
        assert await client.command("c LOGIN alice x") == ["c BAD Already logged in"]
        assert await client.command("d CAPABILITY") == [
            "* CAPABILITY IMAP4rev1",
            "d OK CAPABILITY completed",
        ]
        assert await client.command("e FROB") == ["e BAD Unknown command"]


# LOGOUT, errors and limits


async def test_logout(autojump_clock: trio.testing.MockClock) -> None:
    async with session(plain_handler(), make_context()) as client:
        await client.line()
        assert await client.command("a LOGOUT") == [
            "* BYE imap.example logging out",
            "a OK LOGOUT completed",
        ]
        assert await client.closed()


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("a FROB", "a BAD Unknown command"),
        ("a", "a BAD Missing command"),
        ("a AUTHENTICATE PLAIN", "a NO Unsupported authentication mechanism"),
        ("+ NOOP", "* BAD Missing or invalid tag"),
        ("* NOOP", "* BAD Missing or invalid tag"),
        ("", "* BAD Missing or invalid tag"),
    ],
)
async def test_bad_commands(autojump_clock: trio.testing.MockClock, line: str, reply: str) -> None:
    async with session(plain_handler(), make_context()) as client:
        await client.line()
        await client.send(line + "\r\n")
        assert await client.line() == reply


async def test_invalid_utf8(autojump_clock: trio.testing.MockClock) -> None:
    async with session(plain_handler(), make_context()) as client:
        await client.line()
        await client.send(b"a LOGIN \xff\xfe x\r\n")
        assert await client.line() == "* BAD Command line is not valid UTF-8"


async def test_too_many_bad_commands_end_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(plain_handler(), make_context()) as client:
        await client.line()
        # Say, an HTTP client on the IMAP port: every line is a bad command.
        for number in range(9):
            assert await client.command(f"x{number} GET / HTTP/1.1") == [
                f"x{number} BAD Unknown command"
            ]
        assert await client.command("x9 FROB") == ["x9 BAD Unknown command"]
        assert await client.line() == "* BYE Too many invalid commands"
        assert await client.closed()


async def test_a_line_at_the_limit_is_served(autojump_clock: trio.testing.MockClock) -> None:
    async with session(plain_handler(), make_context()) as client:
        await client.line()
        line = "a NOOP " + "x" * (MAX_LINE_LENGTH - len("a NOOP \r\n"))
        assert len(line) + 2 == MAX_LINE_LENGTH
        assert await client.command(line) == ["a BAD NOOP takes no arguments"]
        assert await client.command("b NOOP") == ["b OK NOOP completed"]


async def test_an_over_long_line_ends_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(plain_handler(), make_context()) as client:
        await client.line()
        await client.send("a NOOP " + "x" * (MAX_LINE_LENGTH - len("a NOOP \r\n") + 1) + "\r\n")
        assert await client.line() == "* BYE Command line too long"
        assert await client.closed()


async def test_the_limit_holds_wherever_the_line_starts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(plain_handler(), make_context()) as client:
        await client.line()
        # A short command first shifts the long line off the receive-chunk boundaries.
        long_line = "a NOOP " + "x" * (MAX_LINE_LENGTH - len("a NOOP \r\n") + 1) + "\r\n"
        await client.send("b NOOP\r\n" + long_line)
        assert await client.line() == "b OK NOOP completed"
        assert await client.line() == "* BYE Command line too long"
        assert await client.closed()


async def test_an_endless_line_is_not_buffered(autojump_clock: trio.testing.MockClock) -> None:
    async with session(plain_handler(), make_context()) as client:
        await client.line()
        # No line terminator ever: the server must not wait for one.
        await client.send(b"a " + b"x" * (2 * MAX_LINE_LENGTH))
        assert await client.line() == "* BYE Command line too long"


async def test_idle_timeout_logs_out(autojump_clock: trio.testing.MockClock) -> None:
    async with session(plain_handler(), make_context(), idle_timeout=30) as client:
        await client.line()
        assert await client.command("a NOOP") == ["a OK NOOP completed"]
        start = trio.current_time()
        assert await client.line() == "* BYE Autologout; idle for too long"
        assert trio.current_time() - start == pytest.approx(30)
        assert await client.closed()


# Disconnects and cancellation


async def test_client_vanishing_after_the_greeting(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with session(plain_handler(), make_context()) as client:
        await client.line()
        await client.send("a NOO")
        await client.stream.aclose()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_client_vanishing_before_the_greeting(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await client_stream.aclose()
    # Sending the greeting fails with BrokenResourceError; the handler returns normally.
    await plain_handler()(server_stream, make_context())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_cancellation_propagates(autojump_clock: trio.testing.MockClock) -> None:
    async def exchange(stream: trio.abc.Stream) -> None:
        await Client(stream).line()

    assert await outcome_when_cancelled(plain_handler(), make_context(), exchange) == "cancelled"


# The argument parser


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("", []),
        ("alice secret", ["alice", "secret"]),
        ('"alice" "two words"', ["alice", "two words"]),
        ('"" x', ["", "x"]),
        ('"a\\"b\\\\c"', ['a"b\\c']),
        ("user]name p\u00e4ss", ["user]name", "p\u00e4ss"]),
    ],
)
def test_parse_astrings(text: str, values: list[str]) -> None:
    assert parse_astrings(text) == values


@pytest.mark.parametrize(
    "text",
    ["a  b", "a ", " a", '"open', '"bad \\x escape"', "{5}", "a {5+}", "a(b", 'a"b', "a%", "\x01"],
)
def test_parse_astrings_rejects(text: str) -> None:
    with pytest.raises(IMAPSyntaxError):
        parse_astrings(text)


def test_repr_hides_passwords() -> None:
    assert "correct horse" not in repr(plain_handler())


# The auth-failure hook


@attrs.define
class RecordingHooks(BaseHooks):
    failures: list[tuple[ConnectionContext, str]] = attrs.field(factory=list)

    async def on_auth_failure(self, context: ConnectionContext, username: str) -> None:
        self.failures.append((context, username))


async def test_a_failed_login_calls_the_hook(autojump_clock: trio.testing.MockClock) -> None:
    hooks = RecordingHooks()
    handler = IMAPHandler(HOSTNAME, USERS, hooks=hooks)
    context = proxy_tls_context()
    async with session(handler, context) as client:
        await client.line()
        await client.command("a LOGIN mallory guess")
        await client.command('b LOGIN alice "correct horse"')
    assert hooks.failures == [(context, "mallory")]


@pytest.mark.parametrize("line", ["a LOGIN alice", 'a LOGIN alice "open', "a LOGIN a b c"])
async def test_malformed_logins_are_not_auth_failures(
    autojump_clock: trio.testing.MockClock, line: str
) -> None:
    hooks = RecordingHooks()
    async with session(IMAPHandler(HOSTNAME, USERS, hooks=hooks), proxy_tls_context()) as client:
        await client.line()
        await client.command(line)
    assert hooks.failures == []


async def test_a_refused_plaintext_login_is_not_an_auth_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hooks = RecordingHooks()
    async with session(IMAPHandler(HOSTNAME, USERS, hooks=hooks), make_context()) as client:
        await client.line()
        await client.command("a LOGIN alice guess")
    assert hooks.failures == []


async def test_failed_logins_ban_the_real_client_not_the_proxy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conf = Settings(
        system=SystemSettings(TrustedNetworks(["10.0.0.2"])),
        auto_ban=AutoBanSettings(failures=5, window=600.0, duration=3600.0),
    )
    autoban = AutoBan(lambda: conf)
    handler = IMAPHandler(HOSTNAME, USERS, hooks=autoban)
    context = proxy_tls_context()  # 198.51.100.7 behind the proxy at 10.0.0.2
    # Three failures end a session; the count carries over to the next one.
    for tags in (("a", "b", "c"), ("d", "e")):
        assert (await autoban.on_connect(context)).accepted
        async with session(handler, context) as client:
            await client.line()
            for tag in tags:
                await client.command(f"{tag} LOGIN alice guess")
    verdict = await autoban.on_connect(context)
    assert verdict.reason.startswith("banned until ")
    [ban] = await autoban.bans()
    assert ban.key == "198.51.100.7"
    assert ban.reason == "failed login for 'alice' on listener imap"
    other = attrs.evolve(context, client_ip=ipaddress.ip_address("198.51.100.8"))
    assert (await autoban.on_connect(other)).accepted


# Bans on sessions already open: over real sockets, behind a proxy that terminated TLS


@attrs.define
class CountingIMAPHandler(IMAPHandler):
    """Counts every password check, so a test can see that a banned client got none."""

    checks: list[str] = attrs.field(factory=list)

    def check_password(self, username: str, password: str) -> bool:
        self.checks.append(username)
        return super().check_password(username, password)


def ban_settings() -> Settings:
    return Settings(
        system=SystemSettings(TrustedNetworks(["127.0.0.1"])),
        listeners=(
            NetworkListener(name="imap", protocol=ListenerProtocol.IMAP, bind="127.0.0.1:0"),
            NetworkListener(name="smtp", protocol=ListenerProtocol.SMTP, bind="127.0.0.1:0"),
        ),
        auto_ban=AutoBanSettings(failures=3, window=600.0, duration=3600.0),
    )


async def start_ban_server(
    nursery: trio.Nursery, conf: Settings, autoban: AutoBan, maildir: pathlib.Path
) -> tuple[Server, CountingIMAPHandler]:
    hooks = HookChain([autoban])
    imap = CountingIMAPHandler(HOSTNAME, USERS, hooks=hooks)
    handlers: dict[ListenerProtocol, Handler] = {
        ListenerProtocol.IMAP: imap,
        ListenerProtocol.SMTP: SMTPHandler(hostname="mx.example", maildir=maildir, hooks=hooks),
    }
    server: Server = await nursery.start(functools.partial(serve, conf, handlers, hooks=hooks))
    return server, imap


@pytest.fixture
async def sockets() -> AsyncIterator[list[trio.SocketStream]]:
    """The test's client sockets, closed when it ends, pass or fail."""
    opened: list[trio.SocketStream] = []
    yield opened
    for stream in opened:
        await trio.aclose_forcefully(stream)


async def proxied(
    server: Server, listener: str, ip: str, sockets: list[trio.SocketStream]
) -> Client:
    """A client at ``ip`` behind the proxy at 127.0.0.1, whose TLS the proxy terminated."""
    host, port = server.addresses[listener][0]
    stream = await trio.open_tcp_stream(host, port)
    sockets.append(stream)
    source = InetAddress(ipaddress.ip_address(ip), 40000)
    destination = InetAddress(ipaddress.ip_address("192.0.2.143"), 993)
    ssl_info = SSLInfo(client=ClientFlags.SSL, verify=0, version="TLSv1.3")
    await stream.send_all(encode_v2(Command.PROXY, source, destination, ssl=ssl_info))
    client = Client(stream)
    greeting = await client.line()
    assert greeting.startswith(("* OK", "220 "))
    return client


async def test_a_ban_ends_the_clients_open_sessions_on_every_listener(
    nursery: trio.Nursery, tmp_path: pathlib.Path, sockets: list[trio.SocketStream]
) -> None:
    conf = ban_settings()
    autoban = AutoBan(lambda: conf)
    server, imap = await start_ban_server(nursery, conf, autoban, tmp_path / "Maildir")
    # Five IMAP sessions and an SMTP one from the guesser, opened before any ban.
    guesser = [await proxied(server, "imap", "198.51.100.7", sockets) for _ in range(5)]
    guesser_smtp = await proxied(server, "smtp", "198.51.100.7", sockets)
    other = await proxied(server, "imap", "198.51.100.8", sockets)
    other_smtp = await proxied(server, "smtp", "198.51.100.8", sockets)
    # Three wrong passwords, on three sessions: the third bans.
    for tag, client in zip("abc", guesser[:3], strict=True):
        assert (await client.command(f"{tag} LOGIN alice guess"))[-1] == (
            f"{tag} NO [AUTHENTICATIONFAILED] Authentication failed"
        )
    [ban] = await autoban.bans()
    assert ban.key == "198.51.100.7"
    # Every session of the banned client says goodbye within a second, then closes.
    with trio.fail_after(1):
        for client in guesser:
            assert await client.line() == f"* BYE banned until {ban.until_text}"
            assert await client.closed()
        line = await guesser_smtp.line()
        assert line == f"421 4.7.0 mx.example banned until {ban.until_text}, closing connection"
        assert await guesser_smtp.closed()
    # Three passwords were checked: the three wrong ones, nothing after.
    assert imap.checks == ["alice"] * 3
    # Another client behind the same proxy keeps its sessions, and logs in.
    assert (await other.command('d LOGIN alice "correct horse"'))[-1] == "d OK LOGIN completed"
    await other_smtp.send("NOOP\r\n")
    assert await other_smtp.line() == "250 2.0.0 OK"
    assert len(server.sessions) == 2
    nursery.cancel_scope.cancel()


async def test_a_ban_made_elsewhere_refuses_the_login_before_the_password_is_checked(
    nursery: trio.Nursery, tmp_path: pathlib.Path, sockets: list[trio.SocketStream]
) -> None:
    """Two processes sharing one store: the other one bans; this one has a session open."""
    conf = ban_settings()
    store = MemoryStore()
    here = AutoBan(lambda: conf, store)
    elsewhere = AutoBan(lambda: conf, store)  # not started by any server here
    server, imap = await start_ban_server(nursery, conf, here, tmp_path / "Maildir")
    old = await proxied(server, "imap", "198.51.100.7", sockets)
    second = await proxied(server, "imap", "198.51.100.7", sockets)
    for _ in range(3):
        await elsewhere.record_failure("198.51.100.7", "failed login")
    [ban] = await here.bans()
    # The right password, on a session opened before the ban: refused, and never checked.
    assert await old.command('a LOGIN alice "correct horse"') == [
        f"a NO [UNAVAILABLE] banned until {ban.until_text}"
    ]
    assert imap.checks == []
    # The seam a shared store's notification calls: the sessions here end as for a local ban.
    assert await here.ban_learned(ban.key) == 2
    with trio.fail_after(1):
        for client in (old, second):
            assert await client.line() == f"* BYE banned until {ban.until_text}"
            assert await client.closed()
    nursery.cancel_scope.cancel()


async def test_a_banned_client_cannot_log_in_without_a_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The handler alone (no server to end sessions): a ban still stops every LOGIN."""
    conf = Settings(
        system=SystemSettings(TrustedNetworks(["10.0.0.2"])),
        auto_ban=AutoBanSettings(failures=1),
    )
    autoban = AutoBan(lambda: conf)
    handler = CountingIMAPHandler(HOSTNAME, USERS, hooks=autoban)
    async with session(handler, proxy_tls_context()) as client:
        await client.line()
        await client.command("a LOGIN alice guess")
        assert handler.checks == ["alice"]
        reply = await client.command('b LOGIN alice "correct horse"')
        assert reply[-1].startswith("b NO [UNAVAILABLE] banned until ")
        assert handler.checks == ["alice"]
        # Refused attempts count towards the session's limit: the third ends it.
        reply = await client.command('c LOGIN alice "correct horse"')
        assert reply[-1].startswith("c NO [UNAVAILABLE] banned until ")
        assert await client.line() == "* BYE Too many authentication failures"
        assert await client.closed()
    assert handler.checks == ["alice"]


async def test_a_failing_auth_hook_refuses_for_now(autojump_clock: trio.testing.MockClock) -> None:
    class Broken(BaseHooks):
        async def on_auth_attempt(self, context: ConnectionContext, username: str) -> Verdict:
            raise RuntimeError("store unreachable")

    handler = CountingIMAPHandler(HOSTNAME, USERS, hooks=Broken())
    async with session(handler, proxy_tls_context()) as client:
        await client.line()
        reply = await client.command('a LOGIN alice "correct horse"')
    assert reply == ["a NO [UNAVAILABLE] Login temporarily unavailable, try again later"]
    assert handler.checks == []
