"""An example SMTP handler: a small, strict receiving MTA that stores every message in a Maildir.

It shows what a mailedge handler gets and how to use it. The stream it is handed has had its
PROXY header (and, on an implicit-TLS listener, its TLS handshake) dealt with already, and the
:class:`~mailedge.context.ConnectionContext` names the real client, so the EHLO reply and the
``Received:`` header carry the client's address, never the proxy's. What any line protocol
needs comes from the library: :class:`mailedge.lines.LineReader` (CRLF only, bounded),
:func:`mailedge.tls.negotiate_starttls` (drops pipelined plaintext, bounds the handshake by
the listener's ``tls_handshake_timeout``) and :class:`mailedge.connlog.ConnectionLogger`.

It is not a mail server: it accepts any recipient, relays nothing and delivers every message,
once, into one Maildir. The data is streamed into the Maildir's ``tmp/`` as it arrives, so a
session holds a bounded buffer whatever the message's size. See ``docs/smtp-handler.md``.

Policy comes from ``hooks`` (:mod:`mailedge.hooks`): ``on_helo`` for each HELO/EHLO,
``on_mail_from`` before a sender is accepted, ``on_data`` with the message (a
:class:`~mailedge.policy.Message` to read, never the bytes in memory) before it is stored.
A refusal becomes ``451`` (tempfail) or ``550`` (reject) with the verdict's enhanced
status code and reason; an accepting verdict's headers (Received-SPF, Authentication-Results)
are written into the stored message, and a ``quarantine`` flag files it in the Maildir++ folder
``.Junk`` instead of the inbox. ``on_connect`` is the server layer's, before the banner.
See ``docs/hooks-spf-dmarc.md``.

With ``users``, AUTH PLAIN (RFC 4954) is offered once the session has TLS. Each attempt asks
``on_auth_attempt`` first: a refusal (a ban) is answered ``454 4.7.0`` and no password is
checked; a wrong password is ``535 5.7.8`` and goes to ``on_auth_failure``. A session the
server ends (a ban) is closed with ``421 4.7.0`` and the reason.

The server layer calls it once per admitted connection::

    handler = SMTPHandler(
        hostname="mx.example",
        maildir=Path("/var/mail/sink"),
        ssl_context=server_ssl_context("cert.pem", "key.pem"),
        hooks=HookChain([SPFHook("mx.example"), DMARCHook("mx.example")]),
        settings=lambda: gate.settings,
    )
    await handler(stream, context)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import hmac
import itertools
import logging
import mailbox
import os
import pathlib
import re
import secrets
import shutil
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import BinaryIO

import attrs
import trio

from mailedge.connlog import ConnectionLogger
from mailedge.context import ConnectionContext, TLSTerminator
from mailedge.lines import ClientClosed, LineReader, LineTooLongError
from mailedge.names import ENHANCED_STATUS, is_hostname
from mailedge.policy import Action, BaseHooks, Envelope, Hooks, Message, Verdict
from mailedge.settings import Settings
from mailedge.shutdown import ShuttingDown, awaiting_command
from mailedge.streams import SessionEnded
from mailedge.tls import listener_handshake_timeout, negotiate_starttls

__all__ = [
    "Reply",
    "SMTPHandler",
    "Session",
    "Transaction",
    # limits
    "MAX_COMMAND_LINE",
    "MAX_TEXT_LINE",
    "MAX_RECIPIENTS",
    "MAX_LOCAL_PART",
    "MAX_DOMAIN",
    "MAX_PATH",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_BAD_COMMANDS",
    "MAX_AUTH_FAILURES",
    "MAX_AUTH_LINE",
    # policy
    "QUARANTINE_FLAG",
    "QUARANTINE_FOLDER",
]

log = logging.getLogger("mailedge.examples.smtp")

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets, CRLF included.
MAX_COMMAND_LINE = 512
# RFC 5321 4.5.3.1.6: a line of message text is at most 1000 octets, CRLF included.
MAX_TEXT_LINE = 1000
# RFC 5321 4.5.3.1.8: a server must buffer at least 100 recipients; more only costs memory.
MAX_RECIPIENTS = 100
# RFC 5321 4.5.3.1.1: a local-part is at most 64 octets.
MAX_LOCAL_PART = 64
# RFC 5321 4.5.3.1.2: a domain is at most 255 octets.
MAX_DOMAIN = 255
# RFC 5321 4.5.3.1.3: a path is at most 256 octets, angle brackets included.
MAX_PATH = 256
# 10 MiB, advertised as SIZE (RFC 1870): ample for mail; it bounds the disk a session can fill
# in tmp/ and what a hook that reads the message whole (DKIM) holds in its thread.
DEFAULT_MAX_MESSAGE_SIZE = 10 * 1024 * 1024
# RFC 5321 sets no limit; ten failures in a row is a scanner or the wrong protocol, and
# RFC 5321 3.8 lets the server end such a session with 421.
MAX_BAD_COMMANDS = 10
# A few wrong passwords are typos; more on one session is someone guessing (as in IMAP).
MAX_AUTH_FAILURES = 3
# RFC 4954 4: a server must accept an authentication exchange line of 12288 octets.
MAX_AUTH_LINE = 12288
# One receive: room for a pipelined batch of commands, and the reader's bound past one line.
RECEIVE_SIZE = 8192
# The data goes to tmp/ through a buffer of this size: what a session holds of its message
# (64 KiB x maxConnections at worst), and one worker-thread write per 64 KiB.
WRITE_BUFFER = 64 * 1024
# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets; a hook's reason gets what is left
# after the code, the enhanced status code and the CRLF, with room to spare.
MAX_POLICY_REASON = 400
# RFC 5322 2.1.1: header lines SHOULD be at most 78 characters; hook headers are folded to it.
HEADER_WIDTH = 78

# The verdict flag that files a message as junk (the DMARC hook sets it for p=quarantine),
# and where: the Maildir++ folder that IMAP servers such as Dovecot show as "Junk".
QUARANTINE_FLAG = "quarantine"
QUARANTINE_FOLDER = "Junk"

# Replies that say the command itself was wrong; ten in a row end the session.
_BAD_COMMAND_CODES = frozenset({500, 501, 502, 503, 504, 555})

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A HELO/EHLO argument: a domain (underscores tolerated, real clients send them) or an
# address literal. Nothing else, so it cannot dress itself up inside the Received header.
_HELO = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[A-Za-z0-9.:]+\]")
# A path's content: quoted strings or characters that need no quoting, up to the ">".
_PATH = r"<(?P<path>(?:\"(?:[^\"\\]|\\.)*\"|[^<>\" ])*)>(?: +(?P<params>.*))?"
_MAIL = re.compile(rf"FROM: *{_PATH}", re.IGNORECASE)
_RCPT = re.compile(rf"TO: *{_PATH}", re.IGNORECASE)
# RFC 5321 4.1.2 (with RFC 6531's UTF-8 atext): a dot-string or a quoted string.
_ATEXT = r"[\w!#$%&'*+/=?^`{|}~-]+"
_LOCAL_PART = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*|\"(?:[^\"\\]|\\.)*\"")
_ADDRESS_DOMAIN = re.compile(r"[\w-]+(?:\.[\w-]+)*|\[[A-Za-z0-9.:-]+\]")
# RFC 5321 4.1.2: esmtp-keyword and esmtp-value.
_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_PARAM_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")
# What a TLS version or cipher name may contain when written into a header.
_UNSAFE_IN_HEADER = re.compile(r"[^A-Za-z0-9_.+/-]")
# What may stand in a reply's text: printable ASCII (non-ASCII needs SMTPUTF8's extensions).
_NOT_REPLY_TEXT = re.compile(r"[^\x20-\x7e]")
# A hook's header line: an RFC 5322 field name, a colon, and text without control characters.
_HOOK_HEADER = re.compile(r"[\x21-\x39\x3b-\x7e]+:[^\x00-\x08\x0a-\x1f\x7f]*")


# Compared against when the user does not exist, so that a wrong user name costs the same
# comparison as a wrong password.
_NO_SUCH_USER = b"\x00" * 32


def _as_lines(text: str | tuple[str, ...]) -> tuple[str, ...]:
    return (text,) if isinstance(text, str) else text


@attrs.frozen
class Reply:
    """One SMTP reply: a code and one or more lines of text."""

    code: int
    lines: tuple[str, ...] = attrs.field(converter=_as_lines)
    # True when the reply says the command itself was wrong (unknown, out of sequence, bad
    # syntax); ``MAX_BAD_COMMANDS`` of those in a row end the session.
    bad_command: bool = attrs.field(kw_only=True)

    @bad_command.default
    def _bad_command_default(self) -> bool:
        return self.code in _BAD_COMMAND_CODES

    @property
    def closes(self) -> bool:
        """True when the session ends after this reply (221 to QUIT, 421)."""
        return self.code in (221, 421)

    def encode(self) -> bytes:
        last = len(self.lines) - 1
        return b"".join(
            f"{self.code}{'-' if i < last else ' '}{text}\r\n".encode()
            for i, text in enumerate(self.lines)
        )


@attrs.define
class Transaction:
    """One mail transaction: MAIL FROM to the end of DATA (or RSET)."""

    # The reverse-path without its brackets; "" is the null sender of bounces.
    sender: str
    recipients: list[str] = attrs.Factory(list)
    smtputf8: bool = False
    # The BODY parameter (RFC 6152): 7BIT or 8BITMIME. Both are stored as received.
    body: str = "7BIT"
    declared_size: int | None = None
    # From the hooks' accepting verdicts (greeting, MAIL FROM, end of DATA): header lines to
    # write into the stored message, and flags for delivery (e.g. quarantine).
    headers: list[str] = attrs.Factory(list)
    flags: set[str] = attrs.Factory(set)


@attrs.define
class Session:
    """The state of one SMTP session; STARTTLS replaces the stream, reader and context."""

    context: ConnectionContext
    stream: trio.abc.Stream = attrs.field(repr=False)
    reader: LineReader = attrs.field(repr=False)
    # Names the connection in every line this session logs.
    log: ConnectionLogger = attrs.field(repr=False)
    # The HELO/EHLO argument; None until the client greets (and again after STARTTLS).
    helo: str | None = None
    esmtp: bool = False
    transaction: Transaction | None = None
    # Consecutive replies with ``bad_command`` set.
    bad_commands: int = 0
    delivered: int = 0
    # The user AUTH authenticated, and the refused AUTH attempts so far.
    user: str | None = None
    auth_failures: int = 0
    # The greeting's accepting verdict, whose headers and flags go into each transaction.
    greeting_verdict: Verdict = attrs.field(factory=Verdict.accept, repr=False)

    def forget_greeting(self) -> None:
        """RFC 3207 4.2: after STARTTLS, nothing learnt in plaintext is kept."""
        self.helo = None
        self.esmtp = False
        self.transaction = None
        self.greeting_verdict = Verdict.accept()


class _SessionOver(Exception):
    """The session cannot go on (and there is no one left to tell)."""


class _BadAddress(ValueError):
    """A path that is not a valid mailbox; the message says why."""


Command = Callable[[Session, str], Awaitable[Reply | None]]


def _check_hostname(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    # This server's own name, in the banner and in Received: a plain DNS host name.
    if not is_hostname(value):
        raise ValueError(f"{attribute.name}: {value!r} is not a DNS host name")


@attrs.define(repr=False)
class SMTPHandler:
    """The example SMTP handler: ``await handler(stream, context)`` serves one session."""

    hostname: str = attrs.field(validator=_check_hostname)
    maildir: pathlib.Path = attrs.field(converter=pathlib.Path)
    # STARTTLS is offered only with a context, and only while the session is not already TLS.
    ssl_context: ssl.SSLContext | None = None
    max_message_size: int = attrs.field(
        default=DEFAULT_MAX_MESSAGE_SIZE, validator=attrs.validators.gt(0)
    )
    max_recipients: int = attrs.field(default=MAX_RECIPIENTS, validator=attrs.validators.gt(0))
    max_bad_commands: int = attrs.field(default=MAX_BAD_COMMANDS, validator=attrs.validators.gt(0))
    # The server's current settings (``lambda: gate.settings``), for the listener's
    # tls_handshake_timeout at STARTTLS; None uses the default timeout.
    settings: Callable[[], Settings] | None = None
    # Policy at HELO/EHLO, MAIL FROM, AUTH and the end of DATA; the default accepts everything.
    hooks: Hooks = attrs.field(factory=BaseHooks)
    # user name -> password for AUTH PLAIN, offered over TLS only; empty: no AUTH.
    users: Mapping[str, str] = attrs.field(factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        # Creates the directory with cur/, new/ and tmp/ if it is missing; it leaves an
        # existing directory alone, so an empty one still needs its subdirectories.
        mailbox.Maildir(self.maildir, create=True)
        for sub in ("cur", "new", "tmp"):
            (self.maildir / sub).mkdir(mode=0o700, exist_ok=True)

    def __repr__(self) -> str:
        starttls = "starttls" if self.ssl_context is not None else "no-starttls"
        hooks = "" if type(self.hooks) is BaseHooks else f" hooks={self.hooks!r}"
        return f"<SMTPHandler {self.hostname} maildir={self.maildir} {starttls}{hooks}>"

    async def __call__(self, stream: trio.abc.Stream, context: ConnectionContext) -> None:
        session = Session(
            context=context,
            stream=stream,
            reader=LineReader(stream, receive_size=RECEIVE_SIZE),
            log=ConnectionLogger(log, context),
        )
        session.log.info("session started")
        try:
            await self._converse(session)
        except ClientClosed:
            session.log.info("client closed the connection")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            session.log.info("connection lost: %r", exc.__cause__ or exc)
        except SessionEnded as exc:
            # The server ended the session (a ban): RFC 5321 3.8 lets it close with 421.
            session.log.info("ended by the server: %s", exc.reason)
            reason = " ".join(_CONTROL.sub(" ", exc.reason).split())
            reason = _NOT_REPLY_TEXT.sub("?", reason)[:MAX_POLICY_REASON]
            await self._goodbye(
                session, Reply(421, f"4.7.0 {self.hostname} {reason}, closing connection")
            )
        except ShuttingDown:
            # RFC 5321 3.8: a server that must shut down answers 421 and closes.
            session.log.info("server shutting down")
            await self._goodbye(
                session, Reply(421, f"4.3.2 {self.hostname} Service shutting down, closing")
            )
        except trio.TooSlowError:
            # Only a receive gets here (see _send and cmd_starttls): the server layer's idle
            # timeout. RFC 5321 4.5.3.2 lets the server close; say why if the client listens.
            session.log.info("idle timeout")
            await self._goodbye(
                session, Reply(421, f"4.4.2 {self.hostname} Idle timeout, closing connection")
            )
        except _SessionOver:
            pass
        session.log.info("session ended, %d message(s) delivered", session.delivered)

    async def _converse(self, session: Session) -> None:
        # Connect-time policy (hooks.on_connect) is the server layer's: it runs before this.
        await self._send(session, Reply(220, f"{self.hostname} ESMTP mailedge example"))
        while True:
            try:
                # Between transactions the session is idle: shutdown ends it with 421
                # (ShuttingDown); a transaction in progress gets the drain time.
                idle = awaiting_command() if session.transaction is None else nullcontext()
                with idle:
                    line = await session.reader.read_line(MAX_COMMAND_LINE)
            except LineTooLongError:
                reply: Reply | None = Reply(500, "5.5.2 Line too long")
            else:
                reply = await self._command(session, line)
            if reply is None:
                session.bad_commands = 0
                continue
            reply = self._judge(session, reply)
            await self._send(session, reply)
            if reply.closes:
                return

    async def _command(self, session: Session, line: bytes) -> Reply | None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return Reply(500, "5.5.2 Syntax error: invalid UTF-8")
        if _CONTROL.search(text):
            return Reply(500, "5.5.2 Syntax error: control character in command")
        verb, _, argument = text.partition(" ")
        command = self._commands().get(verb.upper())
        if command is None:
            session.log.debug("unknown command %r", verb[:32])
            return Reply(500, "5.5.1 Command unrecognized")
        return await command(session, argument.strip(" "))

    def _commands(self) -> dict[str, Command]:
        return {
            "EHLO": self.cmd_ehlo,
            "HELO": self.cmd_helo,
            "MAIL": self.cmd_mail,
            "RCPT": self.cmd_rcpt,
            "DATA": self.cmd_data,
            "RSET": self.cmd_rset,
            "NOOP": self.cmd_noop,
            "QUIT": self.cmd_quit,
            "VRFY": self.cmd_vrfy,
            "STARTTLS": self.cmd_starttls,
            "AUTH": self.cmd_auth,
        }

    def _judge(self, session: Session, reply: Reply) -> Reply:
        """Count bad commands in a row; the last one allowed is answered with 421."""
        if not reply.bad_command:
            session.bad_commands = 0
            return reply
        session.bad_commands += 1
        if session.bad_commands < self.max_bad_commands:
            return reply
        session.log.warning("%d bad commands in a row, closing", session.bad_commands)
        return Reply(421, f"4.7.0 {self.hostname} Too many bad commands, closing connection")

    def offers_starttls(self, session: Session) -> bool:
        """True when EHLO advertises STARTTLS: a context is set and the session is not TLS."""
        # A proxy that terminated the client's TLS (context.tls with tls_terminated_by PROXY)
        # counts: the client already has TLS, and RFC 3207 forbids offering it twice.
        return self.ssl_context is not None and not session.context.tls

    # -- commands. Each takes the session and the argument after the verb. ----------------

    async def cmd_ehlo(self, session: Session, argument: str) -> Reply:
        if len(argument) > MAX_DOMAIN or not _HELO.fullmatch(argument):
            return Reply(501, "5.5.4 Syntax: EHLO domain-or-address-literal")
        refusal = await self._greet(session, argument, esmtp=True)
        if refusal is not None:
            return refusal
        keywords = [
            "PIPELINING",
            f"SIZE {self.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if self.offers_starttls(session):
            keywords.append("STARTTLS")
        if self.users and session.context.tls:
            # RFC 4954 4: no plaintext password mechanism without TLS.
            keywords.append("AUTH PLAIN")
        keywords.append("SMTPUTF8")
        return Reply(250, (self._hello(session), *keywords))

    async def cmd_helo(self, session: Session, argument: str) -> Reply:
        if len(argument) > MAX_DOMAIN or not _HELO.fullmatch(argument):
            return Reply(501, "5.5.4 Syntax: HELO domain-or-address-literal")
        refusal = await self._greet(session, argument, esmtp=False)
        if refusal is not None:
            return refusal
        return Reply(250, self._hello(session))

    async def _greet(self, session: Session, helo: str, *, esmtp: bool) -> Reply | None:
        """Policy hook (HELO/EHLO): the refusal to send, or None with the greeting recorded."""
        # RFC 5321 4.1.4: a new greeting also resets any transaction, accepted or not; a
        # refused one leaves the session ungreeted, so MAIL needs a greeting that passes.
        session.helo, session.esmtp, session.transaction = None, False, None
        session.greeting_verdict = Verdict.accept()
        verdict = await self._consult(
            session, "HELO", lambda: self.hooks.on_helo(session.context, helo)
        )
        refusal = _policy_reply(verdict)
        if refusal is None:
            session.helo, session.esmtp, session.greeting_verdict = helo, esmtp, verdict
        return refusal

    def _hello(self, session: Session) -> str:
        return f"{self.hostname} Hello {session.helo} [{session.context.client_ip}]"

    async def cmd_mail(self, session: Session, argument: str) -> Reply:
        if session.helo is None:
            return Reply(503, "5.5.1 Send EHLO or HELO first")
        if session.transaction is not None:
            return Reply(503, "5.5.1 Sender already given; RSET first")
        match = _MAIL.fullmatch(argument)
        if match is None:
            return Reply(501, "5.5.4 Syntax: MAIL FROM:<address> [parameters]")
        params = _parse_params(match["params"])
        if params is None:
            return Reply(501, "5.5.4 Syntax error in parameters")
        if params and not session.esmtp:
            return Reply(555, "5.5.4 Parameters need EHLO")
        transaction = Transaction(sender="")
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not _SIZE_VALUE.fullmatch(value):
                    return Reply(501, "5.5.4 Syntax: SIZE=<octets>")
                transaction.declared_size = int(value)
                if transaction.declared_size > self.max_message_size:
                    return Reply(552, "5.3.4 Message size exceeds fixed maximum message size")
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return Reply(501, "5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME")
                transaction.body = value.upper()
            elif key == "SMTPUTF8":
                if value is not None:
                    return Reply(501, "5.5.4 SMTPUTF8 takes no value")
                transaction.smtputf8 = True
            else:
                return Reply(555, f"5.5.4 Unsupported parameter {key}")
        try:
            transaction.sender = _parse_path(match["path"], sender=True)
        except _BadAddress as exc:
            return Reply(501, f"5.5.4 Bad sender address: {exc}")
        if not transaction.sender.isascii() and not transaction.smtputf8:
            return Reply(553, "5.6.7 Non-ASCII address needs SMTPUTF8")
        # Policy hook (MAIL FROM): SPF, for one, judges the sender here.
        helo = session.helo
        verdict = await self._consult(
            session,
            "MAIL FROM",
            lambda: self.hooks.on_mail_from(session.context, helo, transaction.sender),
        )
        refusal = _policy_reply(verdict)
        if refusal is not None:
            return refusal
        _adopt(transaction, session.greeting_verdict, verdict)
        session.transaction = transaction
        return Reply(250, "2.1.0 Sender OK")

    async def cmd_rcpt(self, session: Session, argument: str) -> Reply:
        transaction = session.transaction
        if transaction is None:
            return Reply(503, "5.5.1 Need MAIL before RCPT")
        match = _RCPT.fullmatch(argument)
        if match is None:
            return Reply(501, "5.5.4 Syntax: RCPT TO:<address>")
        if match["params"]:
            return Reply(555, "5.5.4 RCPT parameters are not supported")
        try:
            recipient = _parse_path(match["path"], sender=False)
        except _BadAddress as exc:
            return Reply(501, f"5.5.4 Bad recipient address: {exc}")
        if not recipient.isascii() and not transaction.smtputf8:
            return Reply(553, "5.6.7 Non-ASCII address needs SMTPUTF8")
        if len(transaction.recipients) >= self.max_recipients:
            # RFC 5321 4.5.3.1.10: 452, and the client sends the rest in another transaction.
            return Reply(452, "4.5.3 Too many recipients")
        transaction.recipients.append(recipient)
        return Reply(250, "2.1.5 Recipient OK")

    async def cmd_data(self, session: Session, argument: str) -> Reply:
        if argument:
            return Reply(501, "5.5.4 Syntax: DATA")
        transaction = session.transaction
        if transaction is None:
            return Reply(503, "5.5.1 Need MAIL before DATA")
        if not transaction.recipients:
            return Reply(503, "5.5.1 Need RCPT before DATA")
        # Whatever the outcome, the transaction ends with the data (RFC 5321 4.1.1.4).
        session.transaction = None
        # The message as stored, streamed into tmp/ as it arrives: lines end with LF, the
        # Maildir convention. Whatever ends the data (a refusal, EOF, a timeout, cancellation,
        # or delivery, which copies it) removes this file on the way out.
        try:
            spool = await _Spool.create(self.maildir / "tmp", _unique_name())
        except OSError:
            session.log.exception("cannot store a message in %s", self.maildir / "tmp")
            return Reply(451, "4.3.0 Delivery failed, try again later")
        try:
            await self._send(session, Reply(354, "End data with <CR><LF>.<CR><LF>"))
            return await self._receive_data(session, transaction, spool)
        finally:
            spool.discard()

    async def _receive_data(
        self, session: Session, transaction: Transaction, spool: _Spool
    ) -> Reply:
        size = 0
        too_big = too_long = bare_newline = False
        while True:
            try:
                line = await session.reader.read_line(MAX_TEXT_LINE)
            except LineTooLongError:
                too_long = True
                spool.discard()
                continue
            if line == b".":
                break
            if line.startswith(b"."):
                # RFC 5321 4.5.2: the client doubled every leading dot.
                line = line[1:]
            size += len(line) + 2
            if size > self.max_message_size:
                # Keep reading to the end of the data, so the session stays in step; what was
                # stored so far goes at once.
                too_big = True
                spool.discard()
                continue
            if b"\r" in line or b"\n" in line:
                bare_newline = True
                spool.discard()
            if not (too_big or too_long or bare_newline):
                await spool.write_line(line)
        # These replies end the data, not a command: they never count as bad commands.
        if too_big:
            session.log.info(
                "refused a message of %d octets (limit %d)",
                size,
                self.max_message_size,
            )
            return Reply(552, "5.3.4 Message too big", bad_command=False)
        if too_long:
            return Reply(500, "5.5.2 Line too long", bad_command=False)
        if bare_newline:
            # RFC 5321 2.3.8: CR and LF appear only together. A relay that passed a bare one
            # on could be tricked into ending the data early.
            return Reply(554, "5.6.0 Bare CR or LF in message", bad_command=False)
        message = await spool.close()
        if spool.error is not None:
            # The disk, not the client: the client keeps the message and tries again.
            session.log.error("storing the data failed: %r", spool.error)
            return Reply(451, "4.3.0 Delivery failed, try again later", bad_command=False)
        # Policy hook (end of DATA): the message as received (LF line ends, without this
        # server's trace headers), in its file in tmp/, before it is stored. DMARC, for one,
        # reads it back there, in its worker thread.
        envelope = Envelope(
            helo=session.helo or "",
            mail_from=transaction.sender,
            rcpt_to=tuple(transaction.recipients),
        )
        verdict = await self._consult(
            session, "DATA", lambda: self.hooks.on_data(session.context, envelope, message)
        )
        refusal = _policy_reply(verdict)
        if refusal is not None:
            return refusal
        _adopt(transaction, verdict)
        return await self._deliver(session, transaction, message)

    async def cmd_rset(self, session: Session, argument: str) -> Reply:
        if argument:
            return Reply(501, "5.5.4 Syntax: RSET")
        session.transaction = None
        return Reply(250, "2.0.0 Reset state")

    async def cmd_noop(self, session: Session, argument: str) -> Reply:
        # RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored.
        return Reply(250, "2.0.0 OK")

    async def cmd_quit(self, session: Session, argument: str) -> Reply:
        if argument:
            return Reply(501, "5.5.4 Syntax: QUIT")
        return Reply(221, f"2.0.0 {self.hostname} Closing connection")

    async def cmd_vrfy(self, session: Session, argument: str) -> Reply:
        if not argument:
            return Reply(501, "5.5.4 Syntax: VRFY address")
        # RFC 5321 3.5.3: 252 neither confirms nor denies; this server verifies no one.
        return Reply(252, "2.5.0 Cannot verify the address; send mail and it will be attempted")

    async def cmd_starttls(self, session: Session, argument: str) -> Reply | None:
        if argument:
            return Reply(501, "5.5.4 Syntax: STARTTLS")
        if session.context.tls:
            return Reply(503, "5.5.1 TLS already active")
        if self.ssl_context is None:
            return Reply(502, "5.5.1 STARTTLS not available")
        await self._send(session, Reply(220, "2.0.0 Ready to start TLS"))
        settings = None if self.settings is None else self.settings()
        upgraded = await negotiate_starttls(
            session.stream,
            session.context,
            self.ssl_context,
            plaintext=session.reader,
            handshake_timeout=listener_handshake_timeout(settings, session.context),
            log=session.log,
        )
        if upgraded is None:
            raise _SessionOver
        session.stream, session.context = upgraded
        session.reader = LineReader(session.stream, receive_size=RECEIVE_SIZE)
        session.log.context = session.context
        session.forget_greeting()
        return None

    async def cmd_auth(self, session: Session, argument: str) -> Reply:
        """AUTH PLAIN (RFC 4954, RFC 4616): policy first, then the password."""
        if not self.users:
            return Reply(502, "5.5.1 AUTH not available")
        if not session.context.tls:
            return Reply(538, "5.7.11 Encryption required for requested authentication mechanism")
        if session.helo is None or not session.esmtp:
            return Reply(503, "5.5.1 Send EHLO first")
        if session.user is not None:
            return Reply(503, "5.5.1 Already authenticated")
        if session.transaction is not None:
            return Reply(503, "5.5.1 AUTH is not allowed during a mail transaction")
        mechanism, _, response = argument.partition(" ")
        if mechanism.upper() != "PLAIN":
            return Reply(504, "5.5.4 Unrecognized authentication type")
        if not response:
            await self._send(session, Reply(334, ""))
            try:
                line = await session.reader.read_line(MAX_AUTH_LINE)
            except LineTooLongError:
                return Reply(500, "5.5.6 Authentication exchange line is too long")
            response = line.decode("ascii", "replace")
            if response == "*":
                return Reply(501, "5.0.0 Authentication cancelled")
        credentials = _decode_plain(response)
        if credentials is None:
            return Reply(501, "5.5.2 Cannot decode the PLAIN response")
        username, password = credentials
        # Policy first (a ban): a refused client's password is never checked.
        verdict = await self._consult(
            session, "AUTH", lambda: self.hooks.on_auth_attempt(session.context, username)
        )
        if not verdict.accepted:
            # RFC 4954 6: 454 4.7.0 is the temporary authentication failure, which a ban is;
            # 535 would tell the client its password is wrong, which nobody checked.
            reply = _auth_refusal(verdict)
        elif not self.check_password(username, password):
            session.log.warning("AUTH failed for user %r", username[:64])
            await self.hooks.on_auth_failure(session.context, username)
            reply = Reply(535, "5.7.8 Authentication credentials invalid", bad_command=False)
        else:
            session.user = username
            session.log.info("user %r authenticated", username)
            return Reply(235, "2.7.0 Authentication successful")
        session.auth_failures += 1
        if session.auth_failures >= MAX_AUTH_FAILURES:
            await self._send(session, reply)
            return Reply(421, f"4.7.0 {self.hostname} Too many authentication failures")
        return reply

    def check_password(self, username: str, password: str) -> bool:
        """True when ``password`` is ``username``'s, compared in constant time."""
        expected = self.users.get(username)
        reference = _NO_SUCH_USER if expected is None else expected.encode()
        matches = hmac.compare_digest(reference, password.encode())
        return matches and expected is not None

    # -- policy --------------------------------------------------------------------------

    async def _consult(
        self, session: Session, point: str, call: Callable[[], Awaitable[Verdict]]
    ) -> Verdict:
        """A hook's verdict; a hook that raises is a temporary failure, not a lost session."""
        try:
            verdict = await call()
        except Exception:
            session.log.exception("%s hook failed", point)
            return Verdict.tempfail("Policy check failed, try again later", status="4.3.0")
        if not verdict.accepted:
            session.log.info(
                "%s refused by policy (%s): %s",
                point,
                verdict.action.value,
                verdict.reason,
            )
        return verdict

    # -- delivery ------------------------------------------------------------------------

    async def _deliver(self, session: Session, transaction: Transaction, body: Message) -> Reply:
        message_id = secrets.token_hex(8)
        headers = self.trace_headers(session, transaction, message_id)
        folder = QUARANTINE_FOLDER if QUARANTINE_FLAG in transaction.flags else None
        try:
            key = await trio.to_thread.run_sync(self.deliver, headers, body, folder)
        except Exception:
            session.log.exception("delivery of %s failed", message_id)
            return Reply(451, "4.3.0 Delivery failed, try again later")
        session.delivered += 1
        session.log.info(
            "delivered id=%s key=%s folder=%s from=<%s> recipients=%d size=%d flags=%s",
            message_id,
            key,
            folder or "INBOX",
            transaction.sender,
            len(transaction.recipients),
            len(headers) + body.size,
            ",".join(sorted(transaction.flags)) or "-",
        )
        return Reply(250, f"2.0.0 OK queued as {key}")

    def trace_headers(self, session: Session, transaction: Transaction, message_id: str) -> bytes:
        """The Return-Path and Received headers this server prepends (RFC 5321 4.4), with the
        hooks' headers between them: RFC 7208 9.1 puts Received-SPF above this server's
        Received, and RFC 8601 Authentication-Results likewise; Return-Path stays on top."""
        context = session.context
        # Only a client the gate vouches for is named; a LOCAL or UNKNOWN header leaves
        # client_ip standing in for the proxy, which must not look like the sender's address.
        client = f"[{context.client_ip}]" if context.client_known else "client address unknown"
        with_ = f"with {_protocol(session, transaction)}"
        if context.tls:
            with_ += f" ({_tls_comment(context)})"
        lines = [
            # This is the final delivery, which records the reverse-path (RFC 5321 4.4).
            f"Return-Path: <{transaction.sender}>",
            *_hook_headers(session, transaction.headers),
            f"Received: from {session.helo} ({client})",
            f"\tby {self.hostname} (mailedge example) {with_}",
            f"\tid {message_id}; {email.utils.formatdate(localtime=True)}",
        ]
        return "".join(f"{line}\n" for line in lines).encode()

    def deliver(self, headers: bytes, body: Message, folder: str | None = None) -> str:
        """Store ``headers`` then ``body`` in the Maildir durably and return the key. Blocks:
        run it in a worker thread. ``body`` is copied through a 64 KiB buffer, never read
        whole, and left where it is (the caller removes its file).

        ``folder`` names a Maildir++ subfolder (``.Junk`` for "Junk"), created if missing;
        None is the inbox. The file is written in the folder's ``tmp/``, fsynced, linked into
        ``new/`` (a link never replaces a message that is there already), fsynced there again
        with ``new/`` itself, so that the link survives a crash too.
        """
        path = self.maildir
        if folder is not None:
            # Maildir++: a subfolder is a Maildir named "." + its name, with a marker file.
            mailbox.Maildir(self.maildir, create=False).add_folder(folder)
            path = self.maildir / f".{folder}"
        key = _unique_name()
        tmp, new = path / "tmp" / key, path / "new"
        try:
            # Buffered, unlike the spool: it writes all it is given, as copyfileobj expects.
            with open(tmp, "xb", opener=_private) as out, body.open() as source:
                out.write(headers)
                shutil.copyfileobj(source, out, WRITE_BUFFER)
                out.flush()
                os.fsync(out.fileno())
            os.link(tmp, new / key)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync(new / key)
        _fsync(new, directory=True)
        return key

    # -- I/O -----------------------------------------------------------------------------

    async def _send(self, session: Session, reply: Reply) -> None:
        try:
            await session.stream.send_all(reply.encode())
        except trio.TooSlowError as exc:
            # The client stopped reading; a goodbye would wait just as long.
            session.log.info("send timed out")
            raise _SessionOver from exc

    async def _goodbye(self, session: Session, reply: Reply) -> None:
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError
        ):
            await session.stream.send_all(reply.encode())


def _policy_reply(verdict: Verdict) -> Reply | None:
    """The reply to a refusing verdict (None when it accepts): 451 or 550, with its status
    code when that fits the reply's class, and its reason made safe for one reply line."""
    if verdict.accepted:
        return None
    if verdict.action is Action.TEMPFAIL:
        code, status, fallback = 451, "4.7.1", "Try again later"
    else:
        code, status, fallback = 550, "5.7.1", "Refused by policy"
    # A status code of the wrong class (a 5.x.x on a 451) would contradict the reply.
    if (
        verdict.status
        and ENHANCED_STATUS.fullmatch(verdict.status)
        and verdict.status[0] == str(code)[0]
    ):
        status = verdict.status
    # Control characters become spaces (no reason can end the line and forge another reply),
    # anything else outside printable ASCII a "?".
    reason = " ".join(_CONTROL.sub(" ", verdict.reason).split())
    reason = _NOT_REPLY_TEXT.sub("?", reason)[:MAX_POLICY_REASON]
    # Not a bad command: the client said nothing wrong, the policy said no.
    return Reply(code, f"{status} {reason or fallback}", bad_command=False)


def _auth_refusal(verdict: Verdict) -> Reply:
    """454 4.7.0 for a TEMPFAIL (a ban), 535 5.7.8 for a REJECT, with the verdict's reason."""
    reply = _policy_reply(verdict)
    assert reply is not None
    _, _, reason = reply.lines[0].partition(" ")
    if verdict.action is Action.TEMPFAIL:
        return Reply(454, f"4.7.0 {reason}", bad_command=False)
    return Reply(535, f"5.7.8 {reason}", bad_command=False)


def _decode_plain(response: str) -> tuple[str, str] | None:
    """RFC 4616's ``[authzid] NUL authcid NUL passwd``, as (user, password); None if invalid.

    ``=`` is the empty response (RFC 4954 4). An authorization identity other than the user
    itself is refused: this example lets no one act for another.
    """
    try:
        decoded = base64.b64decode("" if response == "=" else response, validate=True)
        parts = decoded.decode("utf-8").split("\x00")
    except (binascii.Error, ValueError):
        return None
    if len(parts) != 3 or not parts[1] or parts[0] not in ("", parts[1]):
        return None
    return parts[1], parts[2]


def _adopt(transaction: Transaction, *verdicts: Verdict) -> None:
    for verdict in verdicts:
        transaction.headers.extend(verdict.headers)
        transaction.flags.update(verdict.flags)


def _hook_headers(session: Session, headers: Iterable[str]) -> list[str]:
    """The hooks' header lines, unfolded then folded at spaces to HEADER_WIDTH.

    A line that is not ``Name: text`` without control characters is dropped (and logged):
    whatever a hook returns, it cannot add a line break of its own to the stored message.
    """
    lines: list[str] = []
    for header in headers:
        if not _HOOK_HEADER.fullmatch(header):
            session.log.warning("dropped a malformed hook header %r", header)
            continue
        name, _, value = header.partition(":")
        folded = f"{name}:"
        for word in value.split():
            line = len(folded) - (folded.rfind("\n") + 1)
            # Folding inserts a line break before a space (RFC 5322 2.2.3), so unfolding
            # gives the line back (spaces collapsed); a word longer than a line stays whole.
            separator = (
                "\n " if line + 1 + len(word) > HEADER_WIDTH and line > len(name) + 1 else " "
            )
            folded += separator + word
        lines.append(folded)
    return lines


def _parse_params(text: str | None) -> dict[str, str | None] | None:
    """ESMTP parameters as {KEY: value or None}; None when one is malformed or repeated."""
    params: dict[str, str | None] = {}
    for word in (text or "").split():
        key, eq, value = word.partition("=")
        if not _PARAM_KEY.fullmatch(key) or (eq and not _PARAM_VALUE.fullmatch(value)):
            return None
        if key.upper() in params:
            return None
        params[key.upper()] = value if eq else None
    return params


def _parse_path(path: str, *, sender: bool) -> str:
    """The mailbox in a path, without a source route; raises _BadAddress."""
    if len(path.encode()) + 2 > MAX_PATH:
        raise _BadAddress("path too long")
    if path.startswith("@"):
        # RFC 5321 4.1.2 and C: a source route is accepted and ignored.
        _, colon, path = path.partition(":")
        if not colon:
            raise _BadAddress("bad source route")
    if not path:
        if sender:
            return ""  # the null reverse-path
        raise _BadAddress("empty address")
    if not sender and path.lower() == "postmaster":
        return path  # RFC 5321 4.5.1: always accepted without a domain
    local, at, domain = path.rpartition("@")
    if not at or not _LOCAL_PART.fullmatch(local) or not _ADDRESS_DOMAIN.fullmatch(domain):
        raise _BadAddress("not local-part@domain")
    if len(local.encode()) > MAX_LOCAL_PART:
        raise _BadAddress("local part too long")
    if len(domain.encode()) > MAX_DOMAIN:
        raise _BadAddress("domain too long")
    return path


def _protocol(session: Session, transaction: Transaction) -> str:
    """The Received header's "with" keyword (RFC 3848, RFC 6531)."""
    if transaction.smtputf8:
        return "UTF8SMTPS" if session.context.tls else "UTF8SMTP"
    if session.context.tls:
        return "ESMTPS"
    return "ESMTP" if session.esmtp else "SMTP"


def _tls_comment(context: ConnectionContext) -> str:
    version = _UNSAFE_IN_HEADER.sub("?", context.tls_version or "unknown")
    cipher = _UNSAFE_IN_HEADER.sub("?", context.tls_cipher or "unknown")
    comment = f"version={version} cipher={cipher}"
    if context.tls_terminated_by is TLSTerminator.PROXY:
        comment += " terminated-by=proxy"
    return comment


def _fsync(path: pathlib.Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private(path: str, flags: int) -> int:
    # Mail is private: only the server's user reads a message it stores.
    return os.open(path, flags, 0o600)


def _create(path: pathlib.Path) -> BinaryIO:
    """A new file (never an existing one) for writing, unbuffered: no data waits in Python."""
    return open(path, "xb", buffering=0, opener=_private)


def _write_all(file: BinaryIO, data: bytes | bytearray) -> None:
    # An unbuffered write may write less than it is given.
    view = memoryview(data)
    while view:
        view = view[file.write(view) or 0 :]


# The Maildir's unique names (https://cr.yp.to/proto/maildir.html): time, then what makes the
# name unique on this host (microseconds, the process, a counter, random bits), then the host.
_HOST = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
_COUNTER = itertools.count(1)


def _unique_name() -> str:
    now = time.time()
    micro = int(now % 1 * 1e6)
    unique = f"M{micro}P{os.getpid()}Q{next(_COUNTER)}R{secrets.token_hex(8)}"
    return f"{int(now)}.{unique}.{_HOST}"


@attrs.define(repr=False)
class _Spool:
    """The message as it arrives: a file in ``tmp/`` and a bounded write buffer.

    Lines are buffered, and written out in a worker thread each time the buffer holds
    ``WRITE_BUFFER`` octets, so memory stays bounded whatever the message's size and the
    event loop never waits on the disk. ``discard`` removes the file; it may be called at any
    time and again, from a ``finally`` too (it does not await, so cancellation cannot stop it).
    """

    path: pathlib.Path
    _file: BinaryIO | None
    _buffer: bytearray = attrs.Factory(bytearray)
    # Octets of the message written or buffered so far.
    size: int = 0
    # Why the file could not be written (the disk full, say); the file is gone then.
    error: OSError | None = None

    @classmethod
    async def create(cls, directory: pathlib.Path, name: str) -> _Spool:
        path = directory / name
        return cls(path, await trio.to_thread.run_sync(_create, path))

    async def write_line(self, line: bytes) -> None:
        """Add one line of the message, with its LF."""
        if self._file is None:
            return
        self._buffer += line
        self._buffer += b"\n"
        self.size += len(line) + 1
        if len(self._buffer) >= WRITE_BUFFER:
            await self._flush()

    async def _flush(self) -> None:
        data, self._buffer = self._buffer, bytearray()
        file = self._file
        if data and file is not None:
            try:
                await trio.to_thread.run_sync(_write_all, file, data)
            except OSError as exc:
                self.error = exc
                self.discard()

    async def close(self) -> Message:
        """Write out the rest and close the file; the message, for the hooks to read."""
        await self._flush()
        file, self._file = self._file, None
        if file is not None:
            try:
                await trio.to_thread.run_sync(file.close)
            except OSError as exc:
                self.error = exc
                self.discard()
        return Message(self.size, self.path)

    def discard(self) -> None:
        """Drop the message: the buffer, the open file and the file in tmp/."""
        self._buffer = bytearray()
        file, self._file = self._file, None
        if file is not None:
            file.close()
        self.path.unlink(missing_ok=True)
