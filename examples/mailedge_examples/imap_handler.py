"""An example IMAP handler: the not-authenticated state of IMAP4rev1, done carefully.

It greets, answers CAPABILITY, NOOP and LOGOUT, upgrades with STARTTLS, and checks LOGIN
against a fixed table of users. Given a ``maildir``, a logged-in client can read it as a
read-only INBOX (:mod:`mailedge_examples.imap_inbox`); without one it has no mailboxes. What
it shows is how a protocol handler uses the connection context the gate built:

* plaintext LOGIN is refused (``LOGINDISABLED``) until ``context.tls`` is true, and a
  session whose TLS a trusted proxy terminated counts as TLS, since the proxy said so;
* the logs name the connection id and the real client, never the proxy's address
  (:class:`mailedge.connlog.ConnectionLogger`);
* commands are CRLF lines read by :class:`mailedge.lines.LineReader`, and STARTTLS goes
  through :func:`mailedge.tls.negotiate_starttls`, which drops pipelined plaintext and honours
  the listener's ``tls_handshake_timeout`` when the handler has ``settings``;
* a failed LOGIN calls the ``on_auth_failure`` hook with the context, so an
  :class:`~mailedge.hooks.autoban.AutoBan` in ``hooks`` bans the real client, not the proxy;
* every LOGIN asks the ``on_auth_attempt`` hook first, so a banned client is refused
  (``NO [UNAVAILABLE]``) without its password being checked, even on a session opened before
  the ban; and a session the server ends (a ban) says ``* BYE`` with the reason.

The server layer has already run the PROXY gate (and the handshake, on an implicit-TLS
listener); it closes the stream after the handler returns, and bounds idle time with a stream
wrapper that raises ``trio.TooSlowError``, which this handler answers with ``* BYE``.
Cancellation always propagates; a client that disconnects just ends the session.
"""

from __future__ import annotations

import hmac
import logging
import pathlib
import re
import ssl
from collections.abc import Callable, Mapping

import attrs
import trio

import mailedge_examples.imap_inbox as imap_inbox
from mailedge.connlog import ConnectionLogger
from mailedge.context import ConnectionContext
from mailedge.hooks import BaseHooks, Hooks
from mailedge.lines import ClientClosed, LineReader, LineTooLongError
from mailedge.policy import Action, Verdict
from mailedge.settings import Settings
from mailedge.shutdown import ShuttingDown, awaiting_command
from mailedge.streams import SessionEnded
from mailedge.tls import listener_handshake_timeout, negotiate_starttls

__all__ = [
    "IMAPHandler",
    "IMAPSyntaxError",
    "MAX_AUTH_FAILURES",
    "MAX_BAD_COMMANDS",
    "MAX_LINE_LENGTH",
    "parse_astrings",
]

logger = logging.getLogger("mailedge.examples.imap")

# RFC 7162 section 4 asks servers to accept command lines of at least 8192 octets; anything
# longer is a broken or hostile client, and refusing it caps what one connection can buffer.
MAX_LINE_LENGTH = 8192
# A real client sends the odd command we lack; a run of them is a scanner or another
# protocol aimed at the wrong port, and not worth answering forever.
MAX_BAD_COMMANDS = 10
# A few wrong passwords are typos; more on one connection is someone guessing.
MAX_AUTH_FAILURES = 3

# Characters an atom may not contain (RFC 3501 atom-specials, without CTL and SP, which
# are checked separately). "]" is allowed in an astring, so it is not listed.
_ATOM_SPECIALS = frozenset('(){%*"\\')
# A tag is an astring without "+", which marks a continuation.
_TAG_SPECIALS = _ATOM_SPECIALS | {"+"}

# Commands of the authenticated and selected states: known, but this example has no mailboxes.
_MAILBOX_COMMANDS = frozenset(
    {
        "APPEND",
        "CHECK",
        "CLOSE",
        "COPY",
        "CREATE",
        "DELETE",
        "ENABLE",
        "EXAMINE",
        "EXPUNGE",
        "FETCH",
        "IDLE",
        "LIST",
        "LSUB",
        "MOVE",
        "NAMESPACE",
        "RENAME",
        "SEARCH",
        "SELECT",
        "STATUS",
        "STORE",
        "SUBSCRIBE",
        "UID",
        "UNSELECT",
        "UNSUBSCRIBE",
    }
)

# A hook's reason goes into a response line; nothing in it may end the line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

# Compared against when the user does not exist, so that a wrong user name costs the same
# comparison as a wrong password.
_NO_SUCH_USER = b"\x00" * 32


class IMAPSyntaxError(ValueError):
    """A command's arguments are not valid IMAP; the message is the reply's text."""


def _is_astring_char(char: str) -> bool:
    # Non-ASCII is let through: IMAP4rev2 and UTF8=ACCEPT clients send UTF-8 in strings.
    return char > " " and char != "\x7f" and char not in _ATOM_SPECIALS


def _is_valid_tag(tag: str) -> bool:
    return bool(tag) and all("!" <= char <= "~" and char not in _TAG_SPECIALS for char in tag)


def parse_astrings(text: str) -> list[str]:
    """Split command arguments into astrings: atoms and quoted strings, one space apart.

    Literals (``{5}``) are refused with :class:`IMAPSyntaxError`: this example never sends
    the ``+`` continuation a client would wait for.
    """
    values: list[str] = []
    position = 0
    while position < len(text):
        if values:
            if text[position] != " ":
                raise IMAPSyntaxError("Arguments must be separated by one space")
            position += 1
        if position < len(text) and text[position] == '"':
            value, position = _parse_quoted(text, position + 1)
        elif position < len(text) and text[position] == "{":
            raise IMAPSyntaxError("Literals are not supported by this example server")
        else:
            end = position
            while end < len(text) and _is_astring_char(text[end]):
                end += 1
            if end == position:
                raise IMAPSyntaxError("Expected an atom or a quoted string")
            value, position = text[position:end], end
        values.append(value)
    return values


def _parse_quoted(text: str, position: int) -> tuple[str, int]:
    """The quoted string whose opening quote is just before ``position``, and the index after it."""
    chars: list[str] = []
    while position < len(text):
        char = text[position]
        if char == '"':
            return "".join(chars), position + 1
        if char == "\\":
            if position + 1 >= len(text) or text[position + 1] not in '"\\':
                raise IMAPSyntaxError("A backslash may only escape a quote or a backslash")
            char = text[position + 1]
            position += 1
        elif char < " " or char == "\x7f":
            raise IMAPSyntaxError("Control characters are not allowed in a quoted string")
        chars.append(char)
        position += 1
    raise IMAPSyntaxError("Unterminated quoted string")


@attrs.define
class IMAPHandler:
    """A connection handler speaking a minimal IMAP4rev1.

    ``users`` maps user names to passwords. Without ``ssl_context`` there is no STARTTLS,
    so LOGIN works only where the connection already had TLS (an implicit-TLS listener, or
    a proxy that terminated TLS and said so in its header). ``hooks`` hears every failed
    LOGIN (``on_auth_failure``); the server runs their ``on_connect`` before this handler.
    """

    hostname: str
    # Kept out of repr: a handler logged by repr must not print passwords.
    users: Mapping[str, str] = attrs.field(repr=False)
    ssl_context: ssl.SSLContext | None = None
    max_line_length: int = MAX_LINE_LENGTH
    max_bad_commands: int = MAX_BAD_COMMANDS
    max_auth_failures: int = MAX_AUTH_FAILURES
    hooks: Hooks = attrs.field(factory=BaseHooks)
    # The server's current settings (``lambda: gate.settings``), for the listener's
    # tls_handshake_timeout at STARTTLS; None uses the default timeout.
    settings: Callable[[], Settings] | None = attrs.field(default=None, repr=False)
    # A Maildir to serve, read-only, as every user's INBOX (the SMTP handler's); None: no
    # mailboxes at all. See mailedge_examples.imap_inbox.
    maildir: pathlib.Path | None = None

    async def __call__(self, stream: trio.abc.Stream, context: ConnectionContext) -> None:
        session = _Session(self, stream, context)
        try:
            await session.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            session.log.debug("client went away")

    def check_password(self, username: str, password: str) -> bool:
        """True when ``password`` is ``username``'s, compared in constant time."""
        expected = self.users.get(username)
        # compare_digest refuses non-ASCII str, so compare the UTF-8 bytes.
        reference = _NO_SUCH_USER if expected is None else expected.encode()
        matches = hmac.compare_digest(reference, password.encode())
        return matches and expected is not None


@attrs.define
class _Session:
    """One connection's IMAP state."""

    handler: IMAPHandler
    stream: trio.abc.Stream
    context: ConnectionContext
    reader: LineReader = attrs.field(init=False)
    log: ConnectionLogger = attrs.field(init=False)
    # The logged-in user; None in the not-authenticated state.
    user: str | None = None
    bad_commands: int = 0
    auth_failures: int = 0
    # Set by LOGOUT and by anything that ends the session with a BYE.
    done: bool = False
    # True once STARTTLS replaced ``stream`` with a TLS stream this session owns.
    upgraded: bool = False
    # The selected INBOX's snapshot; None in the authenticated state.
    inbox: imap_inbox.Inbox | None = None

    def __attrs_post_init__(self) -> None:
        self.reader = LineReader(self.stream)
        self.log = ConnectionLogger(logger, self.context)

    def capabilities(self) -> str:
        names = ["IMAP4rev1"]
        if not self.context.tls:
            if self.handler.ssl_context is not None:
                names.append("STARTTLS")
            names.append("LOGINDISABLED")
        return " ".join(names)

    async def send(self, line: str) -> None:
        await self.stream.send_all(line.encode() + b"\r\n")

    async def run(self) -> None:
        await self.send(
            f"* OK [CAPABILITY {self.capabilities()}] {self.handler.hostname}"
            " IMAP4rev1 mailedge example ready"
        )
        while not self.done:
            try:
                # Between commands the session is idle: shutdown ends it (ShuttingDown).
                with awaiting_command():
                    line = await self.reader.read_line(self.handler.max_line_length)
            except LineTooLongError:
                self.log.info("command line longer than %d bytes", self.handler.max_line_length)
                await self.send("* BYE Command line too long")
                break
            except SessionEnded as exc:
                # The server ended the session (a ban): say why, as RFC 3501 7.1.5 allows.
                self.log.info("ended by the server: %s", exc.reason)
                await self.send(f"* BYE {_CONTROL.sub(' ', exc.reason)}")
                return
            except ShuttingDown:
                self.log.info("server shutting down; logging out")
                await self.send(f"* BYE {self.handler.hostname} shutting down")
                return
            except trio.TooSlowError:
                # The server's idle timeout (its IdleTimeoutStream): announce the autologout.
                self.log.info("idle for too long; logging out")
                await self.send("* BYE Autologout; idle for too long")
                return
            except ClientClosed:
                self.log.debug("client closed the connection")
                return
            await self.dispatch(line)
        if self.upgraded:
            # Say goodbye at the TLS layer too (close_notify), so the client sees a clean end.
            await self.stream.aclose()

    async def dispatch(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            await self.bad("*", "Command line is not valid UTF-8")
            return
        tag, _, rest = text.partition(" ")
        if not _is_valid_tag(tag):
            await self.bad("*", "Missing or invalid tag")
            return
        name, _, arguments = rest.partition(" ")
        command = name.upper()
        match command:
            case "":
                await self.bad(tag, "Missing command")
            case "CAPABILITY":
                if await self.no_arguments(tag, command, arguments):
                    await self.send(f"* CAPABILITY {self.capabilities()}")
                    await self.send(f"{tag} OK CAPABILITY completed")
            case "NOOP":
                if await self.no_arguments(tag, command, arguments):
                    await self.send(f"{tag} OK NOOP completed")
            case "LOGOUT":
                if await self.no_arguments(tag, command, arguments):
                    await self.send(f"* BYE {self.handler.hostname} logging out")
                    await self.send(f"{tag} OK LOGOUT completed")
                    self.done = True
            case "STARTTLS":
                if await self.no_arguments(tag, command, arguments):
                    await self.starttls(tag)
            case "LOGIN":
                await self.login(tag, arguments)
            case "AUTHENTICATE":
                if self.user is not None:
                    await self.bad(tag, "Already logged in")
                else:
                    await self.send(f"{tag} NO Unsupported authentication mechanism")
            case _ if command in _MAILBOX_COMMANDS:
                if self.user is None:
                    await self.bad(tag, f"{command} is not valid before LOGIN")
                elif self.handler.maildir is None:
                    await self.send(f"{tag} NO [CANNOT] This example server has no mailboxes")
                else:
                    await self.mailbox(tag, command, arguments, self.handler.maildir)
            case _:
                await self.bad(tag, "Unknown command")

    async def bad(self, tag: str, text: str) -> None:
        """Reply BAD, and end the session once the client has had too many."""
        await self.send(f"{tag} BAD {text}")
        self.bad_commands += 1
        if self.bad_commands >= self.handler.max_bad_commands:
            self.log.info("%d invalid commands; closing", self.bad_commands)
            await self.send("* BYE Too many invalid commands")
            self.done = True

    async def no_arguments(self, tag: str, command: str, arguments: str) -> bool:
        if arguments:
            await self.bad(tag, f"{command} takes no arguments")
            return False
        return True

    async def starttls(self, tag: str) -> None:
        ssl_context = self.handler.ssl_context
        if self.context.tls:
            await self.bad(tag, "TLS is already active")
            return
        if ssl_context is None:
            await self.bad(tag, "STARTTLS is not available")
            return
        await self.send(f"{tag} OK Begin TLS negotiation now")
        settings = None if self.handler.settings is None else self.handler.settings()
        upgraded = await negotiate_starttls(
            self.stream,
            self.context,
            ssl_context,
            plaintext=self.reader,
            handshake_timeout=listener_handshake_timeout(settings, self.context),
            log=self.log,
        )
        if upgraded is None:
            self.done = True
            return
        self.stream, self.context = upgraded
        self.upgraded = True
        self.reader = LineReader(self.stream)
        self.log.context = self.context

    async def login(self, tag: str, arguments: str) -> bool:
        """Handle LOGIN and reply to it; True when the client is now logged in.

        A wrong user name or password is reported to ``on_auth_failure`` (for bans) before
        the reply; a LOGIN refused before any password was checked is not a failed login.
        """
        if self.user is not None:
            await self.bad(tag, "Already logged in")
            return False
        if not self.context.tls:
            # Checked before parsing: a plaintext password is never even looked at.
            self.log.info("refused LOGIN without TLS")
            hint = "connect with TLS" if self.handler.ssl_context is None else "use STARTTLS first"
            await self.send(f"{tag} NO [PRIVACYREQUIRED] Plaintext LOGIN is disabled; {hint}")
            return False
        try:
            values = parse_astrings(arguments)
        except IMAPSyntaxError as exc:
            await self.bad(tag, str(exc))
            return False
        if len(values) != 2:
            await self.bad(tag, "LOGIN takes a user name and a password")
            return False
        username, password = values
        # Policy first (a ban): a refused client's password is never checked.
        verdict = await self.auth_verdict(username)
        if not verdict.accepted:
            code = "UNAVAILABLE" if verdict.action is Action.TEMPFAIL else "CONTACTADMIN"
            reason = _CONTROL.sub(" ", verdict.reason).strip() or "Login refused"
            self.log.warning("LOGIN for user %r refused by policy: %s", username, reason)
            await self.send(f"{tag} NO [{code}] {reason}")
            # Not a failed login (no password was checked), but it counts towards the
            # session's limit, so that a refused client cannot go on sending LOGINs.
            await self.count_auth_failure()
            return False
        if not self.handler.check_password(username, password):
            self.log.warning("LOGIN failed for user %r", username)
            await self.handler.hooks.on_auth_failure(self.context, username)
            await self.send(f"{tag} NO [AUTHENTICATIONFAILED] Authentication failed")
            await self.count_auth_failure()
            return False
        self.user = username
        self.log.info("user %r logged in", username)
        await self.send(f"{tag} OK LOGIN completed")
        return True

    async def auth_verdict(self, username: str) -> Verdict:
        """The ``on_auth_attempt`` verdict; a hook that fails refuses for now (fails closed)."""
        try:
            return await self.handler.hooks.on_auth_attempt(self.context, username)
        except Exception:
            self.log.exception("on_auth_attempt hook failed")
            return Verdict.tempfail("Login temporarily unavailable, try again later")

    async def count_auth_failure(self) -> None:
        """One more refused login on this session; the last allowed one ends it."""
        self.auth_failures += 1
        if self.auth_failures >= self.handler.max_auth_failures:
            await self.send("* BYE Too many authentication failures")
            self.done = True

    # -- the read-only INBOX (mailedge_examples.imap_inbox) ------------------------------------

    async def mailbox(self, tag: str, command: str, arguments: str, maildir: pathlib.Path) -> None:
        """A command of the authenticated or selected state, on the read-only INBOX."""
        try:
            match command:
                case "SELECT" | "EXAMINE":
                    await self.select(tag, command, arguments, maildir)
                case "LIST" | "LSUB":
                    await self.list_inbox(tag, command, arguments)
                case "CLOSE" | "UNSELECT" | "CHECK":
                    self.selected()
                    if command != "CHECK":
                        self.inbox = None
                    await self.send(f"{tag} OK {command} completed")
                case "FETCH" | "SEARCH":
                    await self.fetch_or_search(tag, command, arguments, uid=False)
                case "UID":
                    name, _, rest = arguments.partition(" ")
                    await self.fetch_or_search(tag, name.upper(), rest, uid=True)
                case _:
                    await self.send(f"{tag} NO [CANNOT] The INBOX is read-only; no {command} here")
        except imap_inbox.RequestError as exc:
            await self.bad(tag, str(exc))

    def selected(self) -> imap_inbox.Inbox:
        if self.inbox is None:
            raise imap_inbox.RequestError("No mailbox selected; SELECT or EXAMINE INBOX first")
        return self.inbox

    async def select(self, tag: str, command: str, arguments: str, maildir: pathlib.Path) -> None:
        try:
            values = parse_astrings(arguments)
        except IMAPSyntaxError as exc:
            raise imap_inbox.RequestError(str(exc)) from None
        if len(values) != 1:
            raise imap_inbox.RequestError(f"{command} takes one mailbox name")
        self.inbox = None
        if values[0].upper() != imap_inbox.INBOX:
            await self.send(f"{tag} NO [NONEXISTENT] This example server has only INBOX")
            return
        inbox = await trio.to_thread.run_sync(imap_inbox.scan, maildir)
        self.inbox = inbox
        await self.send("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)")
        await self.send("* OK [PERMANENTFLAGS ()] The INBOX is read-only")
        await self.send(f"* {len(inbox.messages)} EXISTS")
        await self.send("* 0 RECENT")
        await self.send(f"* OK [UIDVALIDITY {inbox.uid_validity}] UIDs valid")
        await self.send(f"* OK [UIDNEXT {inbox.uid_next}] Predicted next UID")
        await self.send(f"{tag} OK [READ-ONLY] {command} completed")

    async def list_inbox(self, tag: str, command: str, arguments: str) -> None:
        try:
            values = parse_astrings(arguments)
        except IMAPSyntaxError as exc:
            raise imap_inbox.RequestError(str(exc)) from None
        if len(values) != 2:
            raise imap_inbox.RequestError(f"{command} takes a reference and a mailbox pattern")
        pattern = values[1]
        if pattern == "":
            await self.send(f'* {command} (\\Noselect) "/" ""')
        elif pattern in ("*", "%") or pattern.upper() == imap_inbox.INBOX:
            await self.send(f'* {command} (\\HasNoChildren) "/" INBOX')
        await self.send(f"{tag} OK {command} completed")

    async def fetch_or_search(self, tag: str, command: str, arguments: str, *, uid: bool) -> None:
        if command not in ("FETCH", "SEARCH"):
            raise imap_inbox.RequestError("This example server has UID FETCH and UID SEARCH")
        inbox = self.selected()
        name = f"UID {command}" if uid else command
        if command == "SEARCH":
            if arguments.strip().upper() != "ALL":
                raise imap_inbox.RequestError("This example server searches only ALL")
            found = (str(m.uid if uid else n) for n, m in enumerate(inbox.messages, 1))
            await self.send(" ".join(["* SEARCH", *found]))
            await self.send(f"{tag} OK {name} completed")
            return
        numbers, _, items_text = arguments.partition(" ")
        items = imap_inbox.parse_fetch_items(items_text)
        largest = inbox.uid_next - 1 if uid else len(inbox.messages)
        wanted = imap_inbox.parse_sequence_set(numbers, largest)
        chosen = inbox.by_uid(wanted) if uid else inbox.by_sequence(wanted)
        if not uid and len(chosen) != len(wanted):
            raise imap_inbox.RequestError("No such message")
        needs_body = any(
            item not in ("UID", "FLAGS", "RFC822.SIZE", "INTERNALDATE") for item in items
        )
        for number, message in chosen:
            body = None
            if needs_body:
                try:
                    body = await trio.to_thread.run_sync(message.path.read_bytes)
                except FileNotFoundError:
                    body = b""  # removed since SELECT: an empty message, as IMAP servers do
            text, literal = imap_inbox.fetch_response(number, message, items, uid=uid, body=body)
            if literal is None:
                await self.send(text)
            else:
                await self.stream.send_all(text.encode() + b"\r\n" + literal + b")\r\n")
        await self.send(f"{tag} OK {name} completed")
