"""The example SMTP handler, driven over in-memory streams as the server layer would drive it."""

from __future__ import annotations

import base64
import contextlib
import email
import email.message
import email.utils
import functools
import ipaddress
import logging
import mailbox
import os
import pathlib
import shutil
import socket
import ssl
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trustme
from mailedge_examples.smtp_handler import (
    MAX_COMMAND_LINE,
    MAX_TEXT_LINE,
    QUARANTINE_FOLDER,
    SMTPHandler,
)

from mailedge.context import AddressSource, ConnectionContext, TLSTerminator
from mailedge.policy import BaseHooks, Envelope, HookChain, Message, Verdict
from mailedge.server import Server, serve
from mailedge.settings import BindAddress, ListenerProtocol, NetworkListener, Settings
from mailedge.streams import IdleTimeoutStream

HOSTNAME = "mx.example"
BANNER = ["220 mx.example ESMTP mailedge example"]
CLIENT_IP = "198.51.100.7"
PROXY_IP = "127.0.0.1"


def make_context(**changes: Any) -> ConnectionContext:
    """A client at 198.51.100.7 whose connection a trusted proxy at 127.0.0.1 forwarded."""
    base = ConnectionContext(
        connection_id=25,
        listener="smtp",
        protocol=ListenerProtocol.SMTP,
        client_ip=ipaddress.ip_address(CLIENT_IP),
        client_port=40123,
        server_ip=ipaddress.ip_address("192.0.2.25"),
        server_port=25,
        peer_ip=ipaddress.ip_address(PROXY_IP),
        peer_port=51000,
        local_ip=ipaddress.ip_address("127.0.0.1"),
        local_port=2525,
        proxied=True,
        address_source=AddressSource.HEADER,
    )
    return attrs.evolve(base, **changes)


def ipv6_context() -> ConnectionContext:
    return make_context(
        client_ip=ipaddress.ip_address("2001:db8::7"),
        server_ip=ipaddress.ip_address("2001:db8::25"),
        peer_ip=ipaddress.ip_address("::1"),
        local_ip=ipaddress.ip_address("::1"),
    )


class Client:
    """The client side: sends lines, reads whole (multi-line) replies."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = b""

    async def send(self, data: str | bytes) -> None:
        await self.stream.send_all(data.encode() if isinstance(data, str) else data)

    async def _line(self) -> str:
        while b"\r\n" not in self._buffer:
            data = await self.stream.receive_some()
            assert data, f"server closed the connection; unread: {self._buffer!r}"
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line.decode()

    async def reply(self) -> list[str]:
        lines = [await self._line()]
        while lines[-1][3:4] == "-":
            lines.append(await self._line())
        return lines

    async def command(self, line: str) -> list[str]:
        await self.send(line + "\r\n")
        return await self.reply()

    async def start(self, helo: str = "client.example") -> None:
        """Read the banner and greet with EHLO."""
        assert await self.reply() == BANNER
        assert (await self.command(f"EHLO {helo}"))[-1] == "250 SMTPUTF8"

    async def mail(
        self, body: str, sender: str = "alice@example.org", recipient: str = "bob@example.net"
    ) -> list[str]:
        """One whole transaction; returns the reply to the end of the data."""
        assert await self.command(f"MAIL FROM:<{sender}>") == ["250 2.1.0 Sender OK"]
        assert await self.command(f"RCPT TO:<{recipient}>") == ["250 2.1.5 Recipient OK"]
        assert await self.command("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
        return await self.command(body + ".")

    async def starttls(self, client_ssl: ssl.SSLContext) -> trio.SSLStream[trio.abc.Stream]:
        assert await self.command("STARTTLS") == ["220 2.0.0 Ready to start TLS"]
        assert not self._buffer
        tls = trio.SSLStream(self.stream, client_ssl, server_hostname=HOSTNAME)
        await tls.do_handshake()
        self.stream = tls
        return tls

    async def assert_closed(self) -> None:
        """The server sent nothing more and closed the connection."""
        assert not self._buffer
        assert await self.stream.receive_some() == b""


Script = Callable[[Client], Awaitable[None]]


async def converse(
    handler: SMTPHandler,
    context: ConnectionContext,
    script: Script,
    *,
    wrap: Callable[[trio.abc.Stream], trio.abc.Stream] = lambda stream: stream,
) -> None:
    """Run ``script`` against the handler; then hang up, and wait for the handler to end."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server = wrap(server_stream)

    async def serve() -> None:
        # What the server layer does: the handler runs, then the stream is closed regardless.
        try:
            await handler(server, context)
        finally:
            await trio.aclose_forcefully(server)

    # A hang is a failure, not a stuck test run.
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await script(Client(client_stream))
            await client_stream.aclose()


def received(message: email.message.Message) -> str:
    """The Received header, unfolded."""
    value = message["Received"]
    assert isinstance(value, str)
    return " ".join(value.split())


def stored(maildir: pathlib.Path) -> dict[str, email.message.Message]:
    box = mailbox.Maildir(maildir, create=False)
    return {key: email.message_from_bytes(box.get_bytes(key)) for key in box.iterkeys()}


@pytest.fixture
def handler(tmp_path: pathlib.Path) -> SMTPHandler:
    return SMTPHandler(hostname=HOSTNAME, maildir=tmp_path / "Maildir")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOSTNAME).configure_cert(context)
    return context


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def tls_handler(tmp_path: pathlib.Path, server_ssl: ssl.SSLContext) -> SMTPHandler:
    return SMTPHandler(hostname=HOSTNAME, maildir=tmp_path / "Maildir", ssl_context=server_ssl)


# -- construction ------------------------------------------------------------------------


def test_the_maildir_is_created_and_the_repr_is_short(tmp_path: pathlib.Path) -> None:
    handler = SMTPHandler(hostname=HOSTNAME, maildir=str(tmp_path / "box"))
    assert all((tmp_path / "box" / sub).is_dir() for sub in ("cur", "new", "tmp"))
    assert repr(handler) == f"<SMTPHandler mx.example maildir={tmp_path / 'box'} no-starttls>"
    # An existing, empty directory gets its subdirectories too.
    SMTPHandler(hostname=HOSTNAME, maildir=tmp_path / "box" / "cur")
    assert (tmp_path / "box" / "cur" / "new").is_dir()


@pytest.mark.parametrize("hostname", ["", "mx example", "mx.example\r\nX-Evil: 1", "-mx.example"])
def test_a_hostname_that_could_break_the_protocol_is_refused(
    tmp_path: pathlib.Path, hostname: str
) -> None:
    with pytest.raises(ValueError, match="hostname"):
        SMTPHandler(hostname=hostname, maildir=tmp_path)


# -- greeting ----------------------------------------------------------------------------


async def test_banner(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        assert await client.reply() == BANNER

    await converse(handler, make_context(), script)


async def test_ehlo_names_the_recovered_client_not_the_proxy(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        assert await client.command("ehlo client.example") == [
            f"250-mx.example Hello client.example [{CLIENT_IP}]",
            "250-PIPELINING",
            "250-SIZE 10485760",
            "250-8BITMIME",
            "250-ENHANCEDSTATUSCODES",
            "250 SMTPUTF8",
        ]

    await converse(handler, make_context(), script)


async def test_ehlo_shows_an_ipv6_client_in_brackets(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        reply = await client.command("EHLO [IPv6:2001:db8::7]")
        assert reply[0] == "250-mx.example Hello [IPv6:2001:db8::7] [2001:db8::7]"

    await converse(handler, ipv6_context(), script)


async def test_helo(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        assert await client.command("HELO client.example") == [
            f"250 mx.example Hello client.example [{CLIENT_IP}]"
        ]
        # ESMTP parameters belong to EHLO sessions only.
        assert await client.command("MAIL FROM:<a@example.org> SIZE=10") == [
            "555 5.5.4 Parameters need EHLO"
        ]

    await converse(handler, make_context(), script)


@pytest.mark.parametrize(
    "line",
    ["EHLO", "EHLO two words", "HELO x([10.0.0.1])", "EHLO a;b", "HELO \u00e9.example"],
)
async def test_a_greeting_that_is_not_a_name_is_refused(handler: SMTPHandler, line: str) -> None:
    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        (reply,) = await client.command(line)
        assert reply.startswith("501 5.5.4 ")
        assert await client.command("MAIL FROM:<a@example.org>") == [
            "503 5.5.1 Send EHLO or HELO first"
        ]

    await converse(handler, make_context(), script)


# -- a transaction -----------------------------------------------------------------------


async def test_a_message_is_delivered_with_the_clients_address_in_received(
    handler: SMTPHandler,
) -> None:
    replies: list[str] = []

    async def script(client: Client) -> None:
        await client.start()
        replies.extend(await client.mail("Subject: hello\r\n\r\nHi Bob.\r\n"))

    await converse(handler, make_context(), script)
    messages = stored(handler.maildir)
    assert replies == [f"250 2.0.0 OK queued as {next(iter(messages))}"]
    (message,) = messages.values()
    trace = received(message)
    assert trace.startswith(
        f"from client.example ([{CLIENT_IP}]) by mx.example (mailedge example) with ESMTP id "
    )
    assert PROXY_IP not in trace
    # The date after the ";" is an RFC 5322 date-time.
    assert email.utils.parsedate_to_datetime(trace.rpartition(";")[2].strip()).tzinfo is not None
    assert message["Return-Path"] == "<alice@example.org>"
    assert message["Subject"] == "hello"
    assert message.get_payload() == "Hi Bob.\n"


async def test_received_shows_an_ipv6_client(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        assert (await client.mail("Subject: v6\r\n\r\n.\r\n"))[0].startswith("250 2.0.0")

    await converse(handler, ipv6_context(), script)
    (message,) = stored(handler.maildir).values()
    assert received(message).startswith("from client.example ([2001:db8::7]) by mx.example")


async def test_helo_sessions_are_stamped_smtp(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        await client.command("HELO old.example")
        assert (await client.mail("\r\nbody\r\n"))[0].startswith("250 2.0.0")

    await converse(handler, make_context(), script)
    (message,) = stored(handler.maildir).values()
    assert " with SMTP id " in received(message)


@pytest.mark.parametrize("source", [AddressSource.PROXY_LOCAL, AddressSource.UNKNOWN])
async def test_an_unknown_client_is_not_given_the_proxys_address(
    handler: SMTPHandler, source: AddressSource
) -> None:
    # Without a client address, client_ip stands in for the proxy's own.
    context = make_context(address_source=source, client_ip=ipaddress.ip_address(PROXY_IP))

    async def script(client: Client) -> None:
        await client.start()
        assert (await client.mail("\r\nbody\r\n"))[0].startswith("250 2.0.0")

    await converse(handler, context, script)
    (message,) = stored(handler.maildir).values()
    trace = received(message)
    assert trace.startswith("from client.example (client address unknown) by mx.example")
    assert PROXY_IP not in trace


async def test_dot_stuffing_is_undone(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        body = "Subject: dots\r\n\r\n..\r\n...two\r\n.one\r\nmid.dle\r\n"
        assert (await client.mail(body))[0].startswith("250 2.0.0")

    await converse(handler, make_context(), script)
    (message,) = stored(handler.maildir).values()
    assert message.get_payload() == ".\n..two\none\nmid.dle\n"


async def test_null_sender_postmaster_and_source_routes_are_accepted(
    handler: SMTPHandler,
) -> None:
    async def script(client: Client) -> None:
        await client.start()
        assert await client.command("MAIL FROM:<>") == ["250 2.1.0 Sender OK"]
        assert await client.command("RCPT TO:<Postmaster>") == ["250 2.1.5 Recipient OK"]
        assert await client.command("RCPT TO:<@relay.example:bob@example.net>") == [
            "250 2.1.5 Recipient OK"
        ]
        assert await client.command('RCPT TO: <"b o b"@example.net>') == ["250 2.1.5 Recipient OK"]
        assert await client.command("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
        assert (await client.command("\r\nbounce\r\n."))[0].startswith("250 2.0.0")

    await converse(handler, make_context(), script)
    (message,) = stored(handler.maildir).values()
    assert message["Return-Path"] == "<>"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("MAIL FROM:alice@example.org", "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"),
        ("MAIL TO:<alice@example.org>", "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"),
        ("MAIL FROM:<alice>", "501 5.5.4 Bad sender address: not local-part@domain"),
        ("MAIL FROM:<a b@example.org>", "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"),
        (
            f"MAIL FROM:<{'a' * 65}@example.org>",
            "501 5.5.4 Bad sender address: local part too long",
        ),
        (f"MAIL FROM:<a@{'b' * 260}>", "501 5.5.4 Bad sender address: path too long"),
        ("MAIL FROM:<a@example.org> SIZE=big", "501 5.5.4 Syntax: SIZE=<octets>"),
        ("MAIL FROM:<a@example.org> SIZE=1 SIZE=1", "501 5.5.4 Syntax error in parameters"),
        (
            "MAIL FROM:<a@example.org> BODY=BINARYMIME",
            "501 5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME",
        ),
        ("MAIL FROM:<a@example.org> RET=FULL", "555 5.5.4 Unsupported parameter RET"),
        ("MAIL FROM:<j\u00f6rg@example.org>", "553 5.6.7 Non-ASCII address needs SMTPUTF8"),
    ],
)
async def test_bad_mail_commands(handler: SMTPHandler, line: str, reply: str) -> None:
    async def script(client: Client) -> None:
        await client.start()
        assert await client.command(line) == [reply]
        # Nothing was started: a good MAIL is not "nested".
        assert await client.command("MAIL FROM:<a@example.org> BODY=8BITMIME SIZE=5") == [
            "250 2.1.0 Sender OK"
        ]

    await converse(handler, make_context(), script)


async def test_smtputf8(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        assert await client.command("MAIL FROM:<j\u00f6rg@b\u00fccher.example> SMTPUTF8") == [
            "250 2.1.0 Sender OK"
        ]
        assert await client.command("RCPT TO:<\u00e5sa@example.net>") == ["250 2.1.5 Recipient OK"]
        assert await client.command("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
        body = "Subject: gr\u00fc\u00dfe\r\n\r\n\u00e4\r\n."
        assert (await client.command(body))[0].startswith("250 2.0.0")

    await converse(handler, make_context(), script)
    (message,) = stored(handler.maildir).values()
    assert " with UTF8SMTP id " in received(message)
    (raw,) = (path.read_bytes() for path in (handler.maildir / "new").iterdir())
    assert raw.startswith("Return-Path: <j\u00f6rg@b\u00fccher.example>\n".encode())


async def test_too_many_recipients(tmp_path: pathlib.Path) -> None:
    handler = SMTPHandler(hostname=HOSTNAME, maildir=tmp_path, max_recipients=2)

    async def script(client: Client) -> None:
        await client.start()
        await client.command("MAIL FROM:<a@example.org>")
        assert await client.command("RCPT TO:<b@example.net>") == ["250 2.1.5 Recipient OK"]
        assert await client.command("RCPT TO:<c@example.net>") == ["250 2.1.5 Recipient OK"]
        assert await client.command("RCPT TO:<d@example.net>") == ["452 4.5.3 Too many recipients"]

    await converse(handler, make_context(), script)


# -- limits --------------------------------------------------------------------------------


async def test_the_size_limit(tmp_path: pathlib.Path) -> None:
    handler = SMTPHandler(hostname=HOSTNAME, maildir=tmp_path, max_message_size=100)

    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        assert "250-SIZE 100" in await client.command("EHLO client.example")
        assert await client.command("MAIL FROM:<a@example.org> SIZE=101") == [
            "552 5.3.4 Message size exceeds fixed maximum message size"
        ]
        # 98 octets and a CRLF: exactly the limit, accepted.
        assert (await client.mail("x" * 98 + "\r\n"))[0].startswith("250 2.0.0")
        # One more octet, refused only once the whole message has been read.
        assert await client.mail("x" * 50 + "\r\n" + "y" * 48 + "\r\n") == [
            "552 5.3.4 Message too big"
        ]
        # The session goes on, and the refused transaction is over.
        assert await client.command("NOOP") == ["250 2.0.0 OK"]
        assert (await client.mail("z\r\n"))[0].startswith("250 2.0.0")

    await converse(handler, make_context(), script)
    bodies = sorted(str(message.get_payload()) for message in stored(tmp_path).values())
    assert bodies == ["x" * 98 + "\n", "z\n"]


async def test_an_over_long_command_line_is_refused_and_the_session_continues(
    handler: SMTPHandler,
) -> None:
    async def script(client: Client) -> None:
        await client.start()
        # 512 octets with the CRLF is allowed; 513 is not.
        longest = "NOOP " + "x" * (MAX_COMMAND_LINE - len("NOOP ") - 2)
        assert await client.command(longest) == ["250 2.0.0 OK"]
        assert await client.command(longest + "x") == ["500 5.5.2 Line too long"]
        # A line far longer than any buffer is read to its end, then dropped.
        assert await client.command("NOOP " + "y" * 200_000) == ["500 5.5.2 Line too long"]
        assert await client.command("NOOP") == ["250 2.0.0 OK"]

    await converse(handler, make_context(), script)


async def test_an_over_long_text_line_refuses_the_message(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        longest = "x" * (MAX_TEXT_LINE - 2)
        assert (await client.mail(f"\r\n{longest}\r\n"))[0].startswith("250 2.0.0")
        assert await client.mail(f"\r\n{longest}x\r\nafter\r\n") == ["500 5.5.2 Line too long"]
        assert await client.command("NOOP") == ["250 2.0.0 OK"]

    await converse(handler, make_context(), script)
    (message,) = stored(handler.maildir).values()
    assert message.get_payload() == "x" * (MAX_TEXT_LINE - 2) + "\n"


async def test_a_bare_lf_neither_ends_the_data_nor_gets_delivered(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        # An "SMTP smuggling" attempt: <LF>.<LF> must not end the data.
        smuggled = "Subject: a\r\n\r\nhi\n.\nMAIL FROM:<evil@example.org>\r\n"
        assert await client.mail(smuggled) == ["554 5.6.0 Bare CR or LF in message"]
        assert await client.command("NOOP") == ["250 2.0.0 OK"]

    await converse(handler, make_context(), script)
    assert stored(handler.maildir) == {}


# -- sequence and errors -------------------------------------------------------------------


async def test_commands_out_of_sequence(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        assert await client.command("MAIL FROM:<a@example.org>") == [
            "503 5.5.1 Send EHLO or HELO first"
        ]
        assert (await client.command("EHLO client.example"))[-1] == "250 SMTPUTF8"
        assert await client.command("RCPT TO:<b@example.net>") == [
            "503 5.5.1 Need MAIL before RCPT"
        ]
        assert await client.command("DATA") == ["503 5.5.1 Need MAIL before DATA"]
        assert await client.command("MAIL FROM:<a@example.org>") == ["250 2.1.0 Sender OK"]
        assert await client.command("DATA") == ["503 5.5.1 Need RCPT before DATA"]
        assert await client.command("MAIL FROM:<a@example.org>") == [
            "503 5.5.1 Sender already given; RSET first"
        ]

    await converse(handler, make_context(), script)


async def test_unknown_commands_and_vrfy(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        assert await client.command("FROB") == ["500 5.5.1 Command unrecognized"]
        assert await client.command("") == ["500 5.5.1 Command unrecognized"]
        assert await client.command("NOOP\x00") == [
            "500 5.5.2 Syntax error: control character in command"
        ]
        await client.send(b"NOOP \xff\r\n")
        assert await client.reply() == ["500 5.5.2 Syntax error: invalid UTF-8"]
        (reply,) = await client.command("VRFY bob")
        assert reply.startswith("252 2.5.0 ")

    await converse(handler, make_context(), script)


async def test_ten_bad_commands_in_a_row_end_the_session(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        for _ in range(9):
            assert await client.command("FROB") == ["500 5.5.1 Command unrecognized"]
        assert await client.command("RCPT TO:<b@example.net>") == [
            "421 4.7.0 mx.example Too many bad commands, closing connection"
        ]
        await client.assert_closed()

    await converse(handler, make_context(), script)


async def test_a_good_command_resets_the_bad_command_count(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        for _ in range(2):
            for _ in range(9):
                assert await client.command("FROB") == ["500 5.5.1 Command unrecognized"]
            assert await client.command("NOOP") == ["250 2.0.0 OK"]

    await converse(handler, make_context(), script)


async def test_rset_ends_the_transaction_but_keeps_the_greeting(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        await client.command("MAIL FROM:<a@example.org>")
        await client.command("RCPT TO:<b@example.net>")
        assert await client.command("RSET") == ["250 2.0.0 Reset state"]
        assert await client.command("DATA") == ["503 5.5.1 Need MAIL before DATA"]
        assert await client.command("MAIL FROM:<a@example.org>") == ["250 2.1.0 Sender OK"]
        assert await client.command("RSET now") == ["501 5.5.4 Syntax: RSET"]

    await converse(handler, make_context(), script)


async def test_noop(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        assert await client.command("NOOP") == ["250 2.0.0 OK"]
        assert await client.command("noop with an argument") == ["250 2.0.0 OK"]

    await converse(handler, make_context(), script)


async def test_quit_closes_the_session(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        assert await client.command("QUIT") == ["221 2.0.0 mx.example Closing connection"]
        await client.assert_closed()

    await converse(handler, make_context(), script)


async def test_pipelined_commands_are_answered_in_order(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        await client.send(
            "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
            "RCPT TO:<c@example.net>\r\nDATA\r\n"
        )
        assert [await client.reply() for _ in range(4)] == [
            ["250 2.1.0 Sender OK"],
            ["250 2.1.5 Recipient OK"],
            ["250 2.1.5 Recipient OK"],
            ["354 End data with <CR><LF>.<CR><LF>"],
        ]
        await client.send("Subject: pipelined\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
        (queued,) = await client.reply()
        assert queued.startswith("250 2.0.0 OK queued as ")
        assert await client.reply() == ["250 2.0.0 OK"]
        assert await client.reply() == ["221 2.0.0 mx.example Closing connection"]
        await client.assert_closed()

    await converse(handler, make_context(), script)
    (message,) = stored(handler.maildir).values()
    assert message["Subject"] == "pipelined"


# -- STARTTLS ------------------------------------------------------------------------------


async def test_starttls(tls_handler: SMTPHandler, client_ssl: ssl.SSLContext) -> None:
    session: list[str] = []

    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        ehlo = await client.command("EHLO client.example")
        assert ehlo[-2:] == ["250-STARTTLS", "250 SMTPUTF8"]
        tls = await client.starttls(client_ssl)
        cipher = tls.cipher()
        assert cipher is not None
        session.extend([str(tls.version()), cipher[0]])
        # RFC 3207: the greeting is forgotten, and STARTTLS is no longer offered.
        assert await client.command("MAIL FROM:<a@example.org>") == [
            "503 5.5.1 Send EHLO or HELO first"
        ]
        ehlo = await client.command("EHLO client.example")
        assert ehlo[0] == f"250-mx.example Hello client.example [{CLIENT_IP}]"
        assert "250-STARTTLS" not in ehlo
        assert await client.command("STARTTLS") == ["503 5.5.1 TLS already active"]
        assert (await client.mail("Subject: secret\r\n\r\nhush\r\n"))[0].startswith("250 2.0.0")

    await converse(tls_handler, make_context(), script)
    version, cipher = session
    (message,) = stored(tls_handler.maildir).values()
    trace = received(message)
    assert trace.startswith(f"from client.example ([{CLIENT_IP}]) by mx.example")
    assert f" with ESMTPS (version={version} cipher={cipher}) id " in trace
    assert message.get_payload() == "hush\n"


async def test_commands_pipelined_after_starttls_are_dropped(
    tls_handler: SMTPHandler, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    async def script(client: Client) -> None:
        await client.start()
        # A man in the middle appends plaintext commands to the client's STARTTLS.
        await client.send("STARTTLS\r\nRSET\r\nEHLO evil.example\r\n")
        assert await client.reply() == ["220 2.0.0 Ready to start TLS"]
        tls = trio.SSLStream(client.stream, client_ssl, server_hostname=HOSTNAME)
        await tls.do_handshake()
        client.stream = tls
        # Had the RSET run, its "Reset state" would come first; had the EHLO, MAIL would work.
        assert await client.command("NOOP") == ["250 2.0.0 OK"]
        assert await client.command("MAIL FROM:<a@example.org>") == [
            "503 5.5.1 Send EHLO or HELO first"
        ]

    await converse(tls_handler, make_context(), script)
    assert any("pipelined after STARTTLS" in record.getMessage() for record in caplog.records)


async def test_no_starttls_without_a_context(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        assert await client.command("STARTTLS") == ["502 5.5.1 STARTTLS not available"]

    await converse(handler, make_context(), script)


async def test_tls_terminated_by_the_proxy(tls_handler: SMTPHandler) -> None:
    context = make_context(
        tls=True,
        tls_terminated_by=TLSTerminator.PROXY,
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
    )

    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        assert "250-STARTTLS" not in await client.command("EHLO client.example")
        assert await client.command("STARTTLS") == ["503 5.5.1 TLS already active"]
        assert (await client.mail("\r\nbody\r\n"))[0].startswith("250 2.0.0")

    await converse(tls_handler, context, script)
    (message,) = stored(tls_handler.maildir).values()
    assert (
        " with ESMTPS (version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 terminated-by=proxy) id "
        in received(message)
    )


async def test_a_failed_handshake_ends_the_session_quietly(tls_handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        assert await client.command("STARTTLS") == ["220 2.0.0 Ready to start TLS"]
        await client.send("this is not a ClientHello\r\n" * 10)
        # The server gives up; whatever it sends (an alert) is followed by the close.
        while await client.stream.receive_some():
            pass

    await converse(tls_handler, make_context(), script)


async def test_a_stalled_handshake_times_out(
    tmp_path: pathlib.Path, server_ssl: ssl.SSLContext, autojump_clock: trio.testing.MockClock
) -> None:
    # The listener's tlsHandshakeTimeout bounds STARTTLS too.
    listener = NetworkListener(
        name="smtp",
        protocol=ListenerProtocol.SMTP,
        bind=(BindAddress.parse("127.0.0.1:2525"),),
        tls_handshake_timeout=3,
    )
    handler = SMTPHandler(
        hostname=HOSTNAME,
        maildir=tmp_path,
        ssl_context=server_ssl,
        settings=lambda: Settings(listeners=(listener,)),
    )

    async def script(client: Client) -> None:
        await client.start()
        assert await client.command("STARTTLS") == ["220 2.0.0 Ready to start TLS"]
        start = trio.current_time()
        # No ClientHello: the server gives up after the handshake timeout and hangs up.
        await client.assert_closed()
        assert 3 <= trio.current_time() - start < 4

    await converse(handler, make_context(), script)


# -- the client goes away ------------------------------------------------------------------


async def test_eof_in_the_data_delivers_nothing(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        await client.start()
        await client.command("MAIL FROM:<a@example.org>")
        await client.command("RCPT TO:<b@example.net>")
        assert await client.command("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
        await client.send("Subject: cut short\r\n\r\nhalf a mess")

    await converse(handler, make_context(), script)
    assert stored(handler.maildir) == {}


async def test_a_client_that_hangs_up_with_replies_pending(handler: SMTPHandler) -> None:
    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        await client.send("NOOP\r\nNOOP\r\nNOOP\r\n")
        await client.stream.aclose()

    await converse(handler, make_context(), script)


class BrokenStream(trio.abc.Stream):
    """A connection that breaks on the first ``broken`` operation."""

    def __init__(self, broken: str) -> None:
        self.broken = broken
        self.sent = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self.broken == "send":
            raise trio.BrokenResourceError("connection reset")
        self.sent += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.broken == "receive":
            raise trio.BrokenResourceError("connection reset")
        return b"NOOP\r\n"

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("broken", ["send", "receive"])
async def test_a_broken_connection_does_not_raise_out_of_the_handler(
    handler: SMTPHandler, broken: str
) -> None:
    stream = BrokenStream(broken)
    await handler(stream, make_context())
    assert stream.sent == (
        b"" if broken == "send" else b"220 mx.example ESMTP mailedge example\r\n"
    )


async def test_cancellation_is_never_swallowed(
    handler: SMTPHandler, autojump_clock: trio.testing.MockClock
) -> None:
    _client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.move_on_after(60) as scope:
        await handler(server_stream, make_context())
    assert scope.cancelled_caught


async def test_an_idle_client_is_told_before_the_close(
    handler: SMTPHandler, autojump_clock: trio.testing.MockClock
) -> None:
    async def script(client: Client) -> None:
        await client.start()
        assert await client.reply() == ["421 4.4.2 mx.example Idle timeout, closing connection"]
        await client.assert_closed()

    await converse(
        handler, make_context(), script, wrap=lambda stream: IdleTimeoutStream(stream, 10)
    )


# -- delivery --------------------------------------------------------------------------------


async def test_a_failed_delivery_is_a_temporary_error(
    handler: SMTPHandler, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.rmtree(handler.maildir / "new")

    async def script(client: Client) -> None:
        await client.start()
        assert await client.mail("\r\nbody\r\n") == ["451 4.3.0 Delivery failed, try again later"]
        assert await client.command("NOOP") == ["250 2.0.0 OK"]

    await converse(handler, make_context(), script)
    assert list((handler.maildir / "tmp").iterdir()) == []
    assert any(record.levelno == logging.ERROR for record in caplog.records)


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of every file and directory fsynced while the test runs (Linux's /proc)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name an fsynced descriptor")
    paths: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return paths


async def test_the_message_and_its_directory_are_synced_before_the_250(
    handler: SMTPHandler, fsynced: list[str]
) -> None:
    synced_at_reply: list[str] = []

    async def script(client: Client) -> None:
        await client.start()
        (reply,) = await client.mail("\r\nbody\r\n")
        assert reply.startswith("250 2.0.0 OK queued as ")
        synced_at_reply.extend(fsynced)

    await converse(handler, make_context(), script)
    (key,) = stored(handler.maildir)
    new = (handler.maildir / "new").resolve()
    assert str(new / key) in synced_at_reply
    assert str(new) in synced_at_reply


# -- policy hooks ----------------------------------------------------------------------------------


@attrs.define
class FakeHooks(BaseHooks):
    """Answers each point with a set verdict (or raises) and records what it was asked."""

    helo: Verdict = attrs.field(factory=Verdict.accept)
    mail_from: Verdict = attrs.field(factory=Verdict.accept)
    data: Verdict = attrs.field(factory=Verdict.accept)
    fail_at: str | None = None
    calls: list[tuple[object, ...]] = attrs.field(factory=list)

    def _answer(self, point: str, verdict: Verdict) -> Verdict:
        if self.fail_at == point:
            raise RuntimeError(f"{point} hook is broken")
        return verdict

    async def on_helo(self, context: ConnectionContext, helo: str) -> Verdict:
        await trio.lowlevel.checkpoint()
        self.calls.append(("helo", context.client_ip, helo))
        return self._answer("helo", self.helo)

    async def on_mail_from(self, context: ConnectionContext, helo: str, mail_from: str) -> Verdict:
        await trio.lowlevel.checkpoint()
        self.calls.append(("mail_from", context.client_ip, helo, mail_from))
        return self._answer("mail_from", self.mail_from)

    async def on_data(
        self, context: ConnectionContext, envelope: Envelope, message: Message
    ) -> Verdict:
        # A hook that wants the bytes reads them (in a worker thread, for a file).
        self.calls.append(("data", context.client_ip, envelope, await message.read()))
        return self._answer("data", self.data)


def hooked(tmp_path: pathlib.Path, hooks: BaseHooks) -> SMTPHandler:
    return SMTPHandler(hostname=HOSTNAME, maildir=tmp_path / "Maildir", hooks=hooks)


async def test_the_hooks_see_the_recovered_client_and_the_transaction(
    tmp_path: pathlib.Path,
) -> None:
    hooks = FakeHooks()
    handler = hooked(tmp_path, hooks)

    async def script(client: Client) -> None:
        await client.start()
        assert (await client.mail("Subject: hi\r\n\r\n..dot\r\n"))[0].startswith("250 2.0.0")

    await converse(handler, make_context(), script)
    client_ip = ipaddress.ip_address(CLIENT_IP)
    assert hooks.calls == [
        ("helo", client_ip, "client.example"),
        ("mail_from", client_ip, "client.example", "alice@example.org"),
        (
            "data",
            client_ip,
            Envelope("client.example", "alice@example.org", ("bob@example.net",)),
            # As received, unstuffed, LF line ends, without this server's trace headers.
            b"Subject: hi\n\n.dot\n",
        ),
    ]


@pytest.mark.parametrize(
    ("verdict", "reply"),
    [
        (Verdict.tempfail("Slow down"), "451 4.7.1 Slow down"),
        (Verdict.tempfail("SPF temperror", status="4.7.24"), "451 4.7.24 SPF temperror"),
        (Verdict.reject("Go away"), "550 5.7.1 Go away"),
        (Verdict.reject("SPF fail", status="5.7.23"), "550 5.7.23 SPF fail"),
        # A status of the wrong class would contradict the code: the default replaces it.
        (Verdict.tempfail("Later", status="5.7.1"), "451 4.7.1 Later"),
        (Verdict.reject("No", status="not-a-status"), "550 5.7.1 No"),
        # The reason cannot break the reply, and an empty one still says something.
        (Verdict.reject("two\r\nlines\x00\u00e9"), "550 5.7.1 two lines ?"),
        (Verdict.tempfail(""), "451 4.7.1 Try again later"),
        (Verdict.reject("x" * 600), "550 5.7.1 " + "x" * 400),
    ],
)
async def test_a_refused_sender_gets_the_verdicts_reply_and_no_transaction(
    tmp_path: pathlib.Path, verdict: Verdict, reply: str
) -> None:
    handler = hooked(tmp_path, FakeHooks(mail_from=verdict))

    async def script(client: Client) -> None:
        await client.start()
        assert await client.command("MAIL FROM:<alice@example.org>") == [reply]
        assert await client.command("RCPT TO:<bob@example.net>") == [
            "503 5.5.1 Need MAIL before RCPT"
        ]

    await converse(handler, make_context(), script)


@pytest.mark.parametrize(
    ("verdict", "reply"),
    [
        (Verdict.tempfail("DNS trouble", status="4.4.3"), "451 4.4.3 DNS trouble"),
        (
            Verdict.reject("DMARC policy of example.org rejects this message", status="5.7.1"),
            "550 5.7.1 DMARC policy of example.org rejects this message",
        ),
    ],
)
async def test_a_refused_message_is_not_stored_and_the_session_goes_on(
    tmp_path: pathlib.Path, verdict: Verdict, reply: str
) -> None:
    hooks = FakeHooks(data=verdict)
    handler = hooked(tmp_path, hooks)

    async def script(client: Client) -> None:
        await client.start()
        assert await client.mail("Subject: no\r\n\r\nbody\r\n") == [reply]
        # The transaction is over, and a refusal at the end of the data is no bad command.
        assert await client.command("RCPT TO:<bob@example.net>") == [
            "503 5.5.1 Need MAIL before RCPT"
        ]
        hooks.data = Verdict.accept()
        assert (await client.mail("Subject: yes\r\n\r\nbody\r\n"))[0].startswith("250 2.0.0")

    await converse(handler, make_context(), script)
    (message,) = stored(handler.maildir).values()
    assert message["Subject"] == "yes"


@pytest.mark.parametrize(
    ("verdict", "reply"),
    [
        (Verdict.tempfail("Greeting later"), "451 4.7.1 Greeting later"),
        (Verdict.reject("Bad name", status="5.7.1"), "550 5.7.1 Bad name"),
    ],
)
@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
async def test_a_refused_greeting_leaves_the_session_ungreeted(
    tmp_path: pathlib.Path, verdict: Verdict, reply: str, verb: str
) -> None:
    hooks = FakeHooks(helo=verdict)
    handler = hooked(tmp_path, hooks)

    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        assert await client.command(f"{verb} client.example") == [reply]
        assert await client.command("MAIL FROM:<a@example.org>") == [
            "503 5.5.1 Send EHLO or HELO first"
        ]
        # The session stays open; a greeting the policy accepts works.
        hooks.helo = Verdict.accept()
        assert (await client.command(f"{verb} client.example"))[0].startswith("250")
        assert await client.command("MAIL FROM:<a@example.org>") == ["250 2.1.0 Sender OK"]

    await converse(handler, make_context(), script)


async def test_a_refused_second_greeting_ends_the_earlier_one(tmp_path: pathlib.Path) -> None:
    hooks = FakeHooks()
    handler = hooked(tmp_path, hooks)

    async def script(client: Client) -> None:
        await client.start()
        hooks.helo = Verdict.reject("Not that name")
        assert await client.command("EHLO other.example") == ["550 5.7.1 Not that name"]
        assert await client.command("MAIL FROM:<a@example.org>") == [
            "503 5.5.1 Send EHLO or HELO first"
        ]

    await converse(handler, make_context(), script)


async def test_a_hook_that_raises_is_a_temporary_failure(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = FakeHooks(fail_at="mail_from")
    handler = hooked(tmp_path, hooks)

    async def script(client: Client) -> None:
        await client.start()
        assert await client.command("MAIL FROM:<a@example.org>") == [
            "451 4.3.0 Policy check failed, try again later"
        ]
        hooks.fail_at = "data"
        assert await client.mail("\r\nbody\r\n", sender="a@example.org") == [
            "451 4.3.0 Policy check failed, try again later"
        ]
        assert await client.command("NOOP") == ["250 2.0.0 OK"]

    await converse(handler, make_context(), script)
    assert stored(handler.maildir) == {}
    assert "MAIL FROM hook failed" in caplog.text and "DATA hook failed" in caplog.text


async def test_accepting_verdicts_headers_are_stored_above_received(
    tmp_path: pathlib.Path,
) -> None:
    long_value = "mx.example; " + "; ".join(
        f"method{i}=pass header.d=example.org" for i in range(6)
    )
    hooks = FakeHooks(
        helo=Verdict.accept(headers=["X-Greeting: checked"]),
        mail_from=Verdict.accept(
            headers=["Received-SPF: pass (mx.example: test) client-ip=198.51.100.7;"],
            flags=frozenset({"spf:pass"}),
        ),
        data=Verdict.accept(
            headers=[
                f"Authentication-Results: {long_value}",
                "X-Evil: smuggled\r\nBcc: victim@example.net",
                "not a header",
            ],
            flags=frozenset({"dmarc:pass"}),
        ),
    )
    handler = hooked(tmp_path, hooks)

    async def script(client: Client) -> None:
        await client.start()
        assert (await client.mail("Subject: hi\r\n\r\nbody\r\n"))[0].startswith("250 2.0.0")

    await converse(handler, make_context(), script)
    (raw,) = (path.read_bytes() for path in (handler.maildir / "new").iterdir())
    head = raw.decode().split("\n\n", 1)[0]
    names = [line.split(":", 1)[0] for line in head.split("\n") if not line[:1].isspace()]
    assert names == [
        "Return-Path",
        "X-Greeting",
        "Received-SPF",
        "Authentication-Results",
        "Received",
        "Subject",
    ]
    # Long hook headers are folded at spaces to 78 characters, and unfold to what was given.
    assert all(len(line) <= 78 for line in head.split("\n"))
    (message,) = stored(handler.maildir).values()
    assert " ".join(str(message["Authentication-Results"]).split()) == long_value
    assert "Bcc" not in message and "X-Evil" not in message


async def test_a_quarantine_flag_files_the_message_as_junk(tmp_path: pathlib.Path) -> None:
    hooks = FakeHooks(data=Verdict.accept(flags=frozenset({"quarantine"})))
    handler = hooked(tmp_path, hooks)

    async def script(client: Client) -> None:
        await client.start()
        assert (await client.mail("Subject: junk\r\n\r\nbody\r\n"))[0].startswith("250 2.0.0")
        hooks.data = Verdict.accept()
        assert (await client.mail("Subject: ham\r\n\r\nbody\r\n"))[0].startswith("250 2.0.0")

    await converse(handler, make_context(), script)
    junk = handler.maildir / f".{QUARANTINE_FOLDER}"
    assert (junk / "maildirfolder").is_file()
    assert [m["Subject"] for m in stored(junk).values()] == ["junk"]
    assert [m["Subject"] for m in stored(handler.maildir).values()] == ["ham"]


async def test_a_quarantined_message_is_synced_in_its_folder(
    tmp_path: pathlib.Path, fsynced: list[str]
) -> None:
    handler = hooked(tmp_path, FakeHooks(data=Verdict.accept(flags=frozenset({"quarantine"}))))

    async def script(client: Client) -> None:
        await client.start()
        assert (await client.mail("\r\nbody\r\n"))[0].startswith("250 2.0.0")

    await converse(handler, make_context(), script)
    new = (handler.maildir / f".{QUARANTINE_FOLDER}" / "new").resolve()
    (key,) = os.listdir(new)
    assert str(new / key) in fsynced and str(new) in fsynced


async def test_headers_and_flags_belong_to_their_transaction(tmp_path: pathlib.Path) -> None:
    hooks = FakeHooks(mail_from=Verdict.accept(headers=["X-First: 1"]))
    handler = hooked(tmp_path, hooks)

    async def script(client: Client) -> None:
        await client.start()
        assert await client.command("MAIL FROM:<a@example.org>") == ["250 2.1.0 Sender OK"]
        assert await client.command("RSET") == ["250 2.0.0 Reset state"]
        hooks.mail_from = Verdict.accept(headers=["X-Second: 2"])
        assert (await client.mail("Subject: t\r\n\r\nbody\r\n"))[0].startswith("250 2.0.0")

    await converse(handler, make_context(), script)
    (message,) = stored(handler.maildir).values()
    assert message["X-Second"] == "2" and "X-First" not in message


async def test_a_chain_of_hooks_is_consulted_in_order(tmp_path: pathlib.Path) -> None:
    first = FakeHooks(mail_from=Verdict.accept(headers=["X-First: 1"]))
    second = FakeHooks(mail_from=Verdict.reject("Second says no", status="5.7.1"))
    handler = hooked(tmp_path, HookChain([first, second]))

    async def script(client: Client) -> None:
        await client.start()
        assert await client.command("MAIL FROM:<a@example.org>") == ["550 5.7.1 Second says no"]

    await converse(handler, make_context(), script)
    assert [call[0] for call in first.calls] == ["helo", "mail_from"]
    assert [call[0] for call in second.calls] == ["helo", "mail_from"]


async def test_starttls_forgets_the_greetings_verdict(
    tmp_path: pathlib.Path, server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    hooks = FakeHooks(helo=Verdict.accept(headers=["X-Plaintext-Greeting: yes"]))
    handler = SMTPHandler(
        hostname=HOSTNAME, maildir=tmp_path / "Maildir", ssl_context=server_ssl, hooks=hooks
    )

    async def script(client: Client) -> None:
        await client.start()
        await client.starttls(client_ssl)
        hooks.helo = Verdict.accept()
        assert (await client.command("EHLO client.example"))[-1] == "250 SMTPUTF8"
        assert (await client.mail("\r\nbody\r\n"))[0].startswith("250 2.0.0")

    await converse(handler, make_context(), script)
    (message,) = stored(handler.maildir).values()
    assert "X-Plaintext-Greeting" not in message


def test_the_repr_names_the_hooks(tmp_path: pathlib.Path) -> None:
    handler = hooked(tmp_path, HookChain([BaseHooks()]))
    assert repr(handler) == (
        f"<SMTPHandler mx.example maildir={tmp_path / 'Maildir'} no-starttls "
        "hooks=<HookChain ['BaseHooks']>>"
    )


# -- AUTH PLAIN, and the ban check before it -------------------------------------------------------


def plain(user: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


@attrs.define
class AuthHooks(BaseHooks):
    """Refuses logins once ``banned``; records failures."""

    banned: bool = False
    failures: list[str] = attrs.field(factory=list)

    async def on_auth_attempt(self, context: ConnectionContext, username: str) -> Verdict:
        return Verdict.tempfail("banned until 2030-01-01T00:00:00Z") if self.banned else Verdict()

    async def on_auth_failure(self, context: ConnectionContext, username: str) -> None:
        self.failures.append(username)


@attrs.define(repr=False)
class CountingSMTPHandler(SMTPHandler):
    checks: list[str] = attrs.field(factory=list)

    def check_password(self, username: str, password: str) -> bool:
        self.checks.append(username)
        return super().check_password(username, password)


def auth_handler(tmp_path: pathlib.Path, hooks: AuthHooks) -> CountingSMTPHandler:
    return CountingSMTPHandler(
        hostname=HOSTNAME,
        maildir=tmp_path / "Maildir",
        hooks=hooks,
        users={"alice": "correct horse"},
    )


PROXY_TLS = {"tls": True, "tls_terminated_by": TLSTerminator.PROXY, "tls_version": "TLSv1.3"}


async def test_auth_plain_over_tls(tmp_path: pathlib.Path) -> None:
    hooks = AuthHooks()
    handler = auth_handler(tmp_path, hooks)

    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        assert "250-AUTH PLAIN" in await client.command("EHLO client.example")
        assert await client.command("AUTH LOGIN") == ["504 5.5.4 Unrecognized authentication type"]
        assert await client.command("AUTH PLAIN !!") == [
            "501 5.5.2 Cannot decode the PLAIN response"
        ]
        assert await client.command(f"AUTH PLAIN {plain('alice', 'guess')}") == [
            "535 5.7.8 Authentication credentials invalid"
        ]
        # Without an initial response, the server asks for it.
        assert await client.command("AUTH PLAIN") == ["334 "]
        assert await client.command(plain("alice", "correct horse")) == [
            "235 2.7.0 Authentication successful"
        ]
        assert await client.command(f"AUTH PLAIN {plain('alice', 'x')}") == [
            "503 5.5.1 Already authenticated"
        ]

    await converse(handler, make_context(**PROXY_TLS), script)
    assert hooks.failures == ["alice"]
    assert handler.checks == ["alice", "alice"]


async def test_auth_is_not_offered_without_tls(tmp_path: pathlib.Path) -> None:
    handler = auth_handler(tmp_path, AuthHooks())

    async def script(client: Client) -> None:
        assert await client.reply() == BANNER
        assert "250-AUTH PLAIN" not in await client.command("EHLO client.example")
        assert await client.command(f"AUTH PLAIN {plain('alice', 'correct horse')}") == [
            "538 5.7.11 Encryption required for requested authentication mechanism"
        ]

    await converse(handler, make_context(), script)
    assert handler.checks == []


async def test_a_banned_client_gets_454_and_its_password_is_not_checked(
    tmp_path: pathlib.Path,
) -> None:
    hooks = AuthHooks(banned=True)
    handler = auth_handler(tmp_path, hooks)

    async def script(client: Client) -> None:
        await client.start()
        for _ in range(2):
            assert await client.command(f"AUTH PLAIN {plain('alice', 'correct horse')}") == [
                "454 4.7.0 banned until 2030-01-01T00:00:00Z"
            ]
        # The third refused attempt ends the session.
        assert await client.command(f"AUTH PLAIN {plain('alice', 'correct horse')}") == [
            "454 4.7.0 banned until 2030-01-01T00:00:00Z"
        ]
        assert await client.reply() == ["421 4.7.0 mx.example Too many authentication failures"]
        await client.assert_closed()

    await converse(handler, make_context(**PROXY_TLS), script)
    assert handler.checks == []
    assert hooks.failures == []


# -- the data streams into tmp/: real sockets on 127.0.0.1 --------------------------------------

# How long the tests below wait for the server's worker thread to have written the data into
# tmp/: they poll (the write happens in a thread, which no trio event announces), 10 ms at a
# time, at most this many times.
SPOOL_POLLS = 1000
# A line of message text as long as RFC 5321 allows (998 octets and the CRLF), so that a
# block of them is exactly 64 KiB on the wire (65 lines and a shorter one).
BLOCK = 64 * 1024


@attrs.define
class Listening:
    """A running :func:`listening` server: its address, and its first session's end."""

    address: tuple[str, int]
    ended: trio.Event
    cancel_scope: trio.CancelScope
    # Closed when the block ends.
    clients: list[trio.SocketStream] = attrs.field(factory=list)

    async def connect(self) -> Client:
        stream = await trio.open_tcp_stream(*self.address)
        self.clients.append(stream)
        return Client(stream)


@contextlib.asynccontextmanager
async def listening(
    handler: SMTPHandler, *, idle_timeout: float = 60.0
) -> AsyncIterator[Listening]:
    """``mailedge.serve`` with ``handler`` on 127.0.0.1 port 0 until the block ends, which must
    end within 60 seconds. Clients connect directly: the client is the socket's peer."""
    ended = trio.Event()

    async def session(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        try:
            await handler(stream, context)
        finally:
            ended.set()

    settings = Settings(
        listeners=(
            NetworkListener(
                name="smtp",
                protocol=ListenerProtocol.SMTP,
                bind=(BindAddress.parse("127.0.0.1:0"),),
                idle_timeout=idle_timeout,
            ),
        )
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                functools.partial(serve, settings, {ListenerProtocol.SMTP: session})
            )
            running = Listening(server.addresses["smtp"][0], ended, nursery.cancel_scope)
            try:
                yield running
            finally:
                for stream in running.clients:
                    await trio.aclose_forcefully(stream)
                nursery.cancel_scope.cancel()


def tmp_files(maildir: pathlib.Path) -> list[pathlib.Path]:
    return sorted((maildir / "tmp").iterdir())


async def spooled(maildir: pathlib.Path, at_least: int) -> pathlib.Path:
    """The one file in tmp/, once it holds ``at_least`` octets (bounded: see SPOOL_POLLS)."""
    for _ in range(SPOOL_POLLS):
        for path in tmp_files(maildir):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size >= at_least:
                    return path
        await trio.sleep(0.01)
    raise AssertionError(f"no file of {at_least} octets in tmp/: {tmp_files(maildir)}")


def text_block(seed: int) -> tuple[bytes, bytes]:
    """64 KiB of message text as sent (CRLF, leading dots doubled) and as stored (LF)."""
    lines: list[bytes] = []
    while sum(len(line) + 2 for line in lines) < BLOCK:
        room = BLOCK - sum(len(line) + 2 for line in lines) - 2
        # Every fourth line starts with a dot, which the client doubles on the wire.
        lead = "." if len(lines) % 4 == 0 else ""
        lines.append(f"{lead}{seed:04d}-{len(lines):03d} ".encode() + b"x" * min(980, room - 10))
    sent = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    stored = b"".join(line + b"\n" for line in lines)
    return sent, stored


async def begin_data(client: Client) -> None:
    await client.start()
    assert await client.command("MAIL FROM:<alice@example.org>") == ["250 2.1.0 Sender OK"]
    assert await client.command("RCPT TO:<bob@example.net>") == ["250 2.1.5 Recipient OK"]
    assert await client.command("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]


async def test_the_data_goes_to_tmp_as_it_arrives_and_is_delivered_as_before(
    handler: SMTPHandler,
) -> None:
    head_sent = b"Subject: streamed\r\n\r\n"
    blocks = [text_block(seed) for seed in range(8)]
    async with listening(handler) as server:
        client = await server.connect()
        await begin_data(client)
        await client.send(head_sent + b"".join(sent for sent, _ in blocks))
        # Half a megabyte in, and no final dot yet: the message is on disk, not in memory
        # (all of it but what the 64 KiB buffer still holds, and LF for CRLF).
        spool = await spooled(handler.maildir, 6 * BLOCK)
        assert spool.read_bytes().startswith(b"Subject: streamed\n\n" + blocks[0][1])
        assert list((handler.maildir / "new").iterdir()) == []
        # Dot-unstuffing and the end of the data, split across receives at the worst places.
        for piece in (b"\r", b"\n.", b".tail\r", b"\n", b".", b"\r", b"\n"):
            await client.send(piece)
            # Each piece its own receive, as far as the server's scheduling allows.
            await trio.testing.wait_all_tasks_blocked()
        (reply,) = await client.reply()
        assert reply.startswith("250 2.0.0 OK queued as ")
        key = reply.rsplit(" ", 1)[1]
        assert await client.command("QUIT") == ["221 2.0.0 mx.example Closing connection"]
    assert tmp_files(handler.maildir) == []
    data = (handler.maildir / "new" / key).read_bytes()
    head, separator, body = data.partition(b"\nSubject: streamed\n\n")
    assert separator
    # Exactly today's bytes: the trace headers, then the message as received, LF line ends.
    assert head.startswith(b"Return-Path: <alice@example.org>\nReceived: from client.example")
    assert body == b"".join(stored for _, stored in blocks) + b"\n.tail\n"


async def test_memory_does_not_grow_with_the_message(handler: SMTPHandler) -> None:
    sent, stored_block = text_block(0)
    blocks = 64  # 4 MiB
    async with listening(handler) as server:
        client = await server.connect()
        await begin_data(client)
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            for _ in range(blocks):
                await client.send(sent)
            (reply,) = await client.command(".")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert reply.startswith("250 2.0.0 OK queued as ")
    # A 4 MiB message, and the session held at most a few buffers of it at once.
    assert peak - before < 1024 * 1024, f"{(peak - before) / 1024:.0f} KiB"
    (message,) = (handler.maildir / "new").iterdir()
    assert message.read_bytes().endswith(b"\n" + stored_block * blocks)
    assert tmp_files(handler.maildir) == []


@pytest.mark.parametrize("ending", ["close", "reset", "idle timeout", "server cancelled"])
async def test_an_aborted_data_leaves_nothing_in_tmp(handler: SMTPHandler, ending: str) -> None:
    sent, _ = text_block(0)
    async with listening(handler, idle_timeout=1.0) as server:
        client = await server.connect()
        await begin_data(client)
        await client.send(sent * 4)
        await spooled(handler.maildir, 2 * BLOCK)
        if ending == "close":
            await client.stream.aclose()
        elif ending == "reset":
            assert isinstance(client.stream, trio.SocketStream)
            client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.stream.aclose()
        elif ending == "idle timeout":
            assert await client.reply() == ["421 4.4.2 mx.example Idle timeout, closing connection"]
        else:
            server.cancel_scope.cancel()
        await server.ended.wait()
    assert tmp_files(handler.maildir) == []
    assert list((handler.maildir / "new").iterdir()) == []


async def test_a_message_over_the_cap_is_dropped_from_tmp_at_once(tmp_path: pathlib.Path) -> None:
    handler = SMTPHandler(hostname=HOSTNAME, maildir=tmp_path, max_message_size=4 * BLOCK)
    sent, _ = text_block(0)
    async with listening(handler) as server:
        client = await server.connect()
        await begin_data(client)
        await client.send(sent * 3)
        spool = await spooled(tmp_path, BLOCK)
        # Past the cap the file goes while the client is still sending; the data is read to
        # its end, then refused as before.
        await client.send(sent * 2)
        for _ in range(SPOOL_POLLS):
            if not spool.exists():
                break
            await trio.sleep(0.01)
        assert tmp_files(tmp_path) == []
        await client.send(sent)
        assert await client.command(".") == ["552 5.3.4 Message too big"]
        assert await client.command("NOOP") == ["250 2.0.0 OK"]
    assert tmp_files(tmp_path) == []
    assert list((tmp_path / "new").iterdir()) == []


@attrs.define
class ReadingHook(BaseHooks):
    """Reads the message it is handed, notes where it was, and answers with ``verdict``."""

    verdict: Verdict
    seen: list[tuple[pathlib.Path | None, int, bytes]] = attrs.field(factory=list)

    async def on_data(
        self, context: ConnectionContext, envelope: Envelope, message: Message
    ) -> Verdict:
        self.seen.append((message.path, message.size, await message.read()))
        return self.verdict


@pytest.mark.parametrize(
    ("verdict", "reply"),
    [
        (Verdict.reject("No", status="5.7.1"), "550 5.7.1 No"),
        (Verdict.tempfail("Later", status="4.7.1"), "451 4.7.1 Later"),
        (Verdict.accept(headers=["X-Checked: yes"]), "250 2.0.0 OK queued as "),
    ],
)
async def test_on_data_reads_the_message_from_its_file_in_tmp(
    tmp_path: pathlib.Path, verdict: Verdict, reply: str
) -> None:
    hook = ReadingHook(verdict)
    handler = hooked(tmp_path, hook)
    sent, stored_block = text_block(0)
    async with listening(handler) as server:
        client = await server.connect()
        await begin_data(client)
        await client.send(b"Subject: judged\r\n\r\n" + sent * 2)
        (answer,) = await client.command(".")
        assert answer.startswith(reply)
    ((path, size, data),) = hook.seen
    expected = b"Subject: judged\n\n" + stored_block * 2
    assert data == expected and size == len(expected)
    assert path is not None and path.parent == handler.maildir / "tmp"
    # Gone once the data is answered, whatever the answer.
    assert tmp_files(handler.maildir) == []
    delivered = list((handler.maildir / "new").iterdir())
    if verdict.accepted:
        (message,) = delivered
        assert b"\nX-Checked: yes\nReceived: from " in message.read_bytes()
        assert message.read_bytes().endswith(b"\n" + expected)
    else:
        assert delivered == []


async def test_no_room_in_tmp_refuses_the_data_before_the_354(
    handler: SMTPHandler, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.rmtree(handler.maildir / "tmp")

    async def script(client: Client) -> None:
        await client.start()
        assert await client.command("MAIL FROM:<a@example.org>") == ["250 2.1.0 Sender OK"]
        assert await client.command("RCPT TO:<b@example.net>") == ["250 2.1.5 Recipient OK"]
        assert await client.command("DATA") == ["451 4.3.0 Delivery failed, try again later"]
        # The transaction is over; the session goes on.
        assert await client.command("RCPT TO:<b@example.net>") == [
            "503 5.5.1 Need MAIL before RCPT"
        ]

    await converse(handler, make_context(), script)
    assert any(record.levelno == logging.ERROR for record in caplog.records)
