"""``mailedge probe``'s client: connect to a listener as a proxy would, and record the reply.

The probe opens one TCP connection to a listener, sends a PROXY header the way HAProxy
would (v1, v2, a v2 LOCAL health check, or none at all), then speaks just enough of the
listener's protocol to learn which client the server believes it is talking to:

* SMTP: the banner, ``EHLO`` (whose first reply line names the client, ``[ip]``), ``QUIT``;
* IMAP: the greeting, ``CAPABILITY`` and ``LOGOUT``;
* HTTP: ``GET /whoami``, whose JSON body is the connection context in the form of
  :func:`mailedge.context.context_to_json` (the example HTTP handler serves it).

It compares the client the server reports with the one the header claimed. Every network
wait is bounded by the timeout, and no more than :data:`MAX_RECEIVE` bytes are read.

:mod:`mailedge.cli.probe_options` says what to send; :func:`probe` does the work and
returns a :class:`ProbeResult`. :mod:`mailedge.cli.probe_report` says what a result means and shows
it; :mod:`mailedge.cli.probe_command` is the ``mailedge probe`` subcommand. See docs/probe.md.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
import re
from contextlib import AbstractContextManager

import attrs
import trio

from mailedge.cli.probe_options import HeaderMode, ProbeOptions, build_header
from mailedge.cli.render import JSONObject
from mailedge.networks import format_endpoint, normalize_ip
from mailedge.proxy import InetAddress, IPAddress
from mailedge.settings import ListenerProtocol

__all__ = ["EHLO_NAME", "MAX_RECEIVE", "Outcome", "ProbeResult", "probe", "same_ip"]

# The name the probe greets SMTP servers with; .test is reserved (RFC 2606), never real.
EHLO_NAME = "probe.mailedge.test"
# Everything the probe reads from one connection: these exchanges take a few KiB, and a
# server that streams more (or never ends a line) must not make the probe buffer it all.
MAX_RECEIVE = 64 * 1024
# One read: an SMTP or IMAP reply, or an HTTP head, fits in one.
_RECEIVE_SIZE = 4096

_SMTP_REPLY = re.compile(r"([2-5][0-9][0-9])(?:([ -])(.*))?")
# The client's address in an EHLO reply: "mx.example Hello client.example [192.0.2.1]".
_EHLO_CLIENT = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")
_HTTP_STATUS = re.compile(r"HTTP/\d\.\d ([1-5][0-9][0-9])(?: (.*))?")


class Outcome(enum.StrEnum):
    """How the exchange ended."""

    # Every step got its reply.
    COMPLETED = "completed"
    # The server closed (or reset) the connection while the probe waited for a reply.
    CLOSED = "closed"
    # A reply did not arrive within the timeout.
    TIMEOUT = "timeout"
    # The TCP connection could not be made.
    CONNECT_FAILED = "connect_failed"
    # The server answered with a refusal (421, 554, * BYE, an HTTP error status).
    REFUSED = "refused"
    # The server answered with something that is not the protocol the probe speaks.
    BAD_REPLY = "bad_reply"


@attrs.frozen
class ProbeResult:
    """What one probe sent, what came back, and what the server made of the client."""

    options: ProbeOptions
    outcome: Outcome
    # The header as sent (b"" with --no-header, or when the connection failed first).
    header: bytes = b""
    # Every line, in order: ("sent", line) or ("received", line), without line endings.
    # An HTTP body is not in it: it is ``whoami``.
    transcript: tuple[tuple[str, str], ...] = ()
    # The probe's own end of the connection: the peer address the server sees.
    local: str | None = None
    # The client address the server reported (SMTP EHLO reply, HTTP whoami); None if none.
    client_seen: str | None = None
    # The /whoami JSON (HTTP only).
    whoami: JSONObject | None = None
    http_status: int | None = None
    # What went wrong, in words, when the exchange did not complete.
    detail: str | None = None
    # Whether client_seen is the client the header claimed; None when there is nothing
    # to compare (no claim, or the server did not say).
    matched: bool | None = None

    @property
    def replies(self) -> list[str]:
        """Every line the server sent, in order."""
        return [line for direction, line in self.transcript if direction == "received"]

    @property
    def closed_early(self) -> bool:
        """True when the server closed the connection instead of replying."""
        return self.outcome is Outcome.CLOSED

    @property
    def exit_code(self) -> int:
        """0 when the exchange completed and nothing contradicts the header; else 1."""
        return 0 if self.outcome is Outcome.COMPLETED and self.matched is not False else 1


# --- the exchange ------------------------------------------------------------------------


class _Ended(Exception):
    """The exchange stopped early; ``outcome`` and ``detail`` say how."""

    def __init__(self, outcome: Outcome, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


class _Conversation:
    """One connection: bounded reads and sends, the transcript, and what was learnt."""

    def __init__(self, stream: trio.SocketStream, options: ProbeOptions) -> None:
        self.stream = stream
        self.options = options
        self.transcript: list[tuple[str, str]] = []
        # What the probe is doing, for the message if it ends badly ("waiting for ...").
        self.stage = "connecting"
        self.client_seen: str | None = None
        self.whoami: JSONObject | None = None
        self.http_status: int | None = None
        self._buffer = bytearray()
        self._received = 0
        self._eof = False

    def waiting(self, stage: str) -> AbstractContextManager[trio.CancelScope]:
        """Enter a wait for a reply: names the stage and bounds it by the timeout."""
        self.stage = stage
        return trio.fail_after(self.options.timeout)

    async def send(self, data: bytes, what: str, lines: tuple[str, ...] = ()) -> None:
        self.stage = f"sending {what}"
        self.transcript.extend(("sent", line) for line in lines)
        try:
            with trio.fail_after(self.options.timeout):
                await self.stream.send_all(data)
        except trio.BrokenResourceError:
            raise _Ended(
                Outcome.CLOSED, f"the server had closed the connection before the probe sent {what}"
            ) from None

    def _closed(self) -> _Ended:
        return _Ended(
            Outcome.CLOSED, f"the server closed the connection while the probe was {self.stage}"
        )

    async def _fill(self) -> None:
        """One receive into the buffer; raises _Ended at the end of the stream."""
        if self._eof:
            raise self._closed()
        try:
            data = await self.stream.receive_some(_RECEIVE_SIZE)
        except trio.BrokenResourceError:
            raise _Ended(
                Outcome.CLOSED, f"the server reset the connection while the probe was {self.stage}"
            ) from None
        if not data:
            self._eof = True
            raise self._closed()
        self._received += len(data)
        if self._received > MAX_RECEIVE:
            raise _Ended(
                Outcome.BAD_REPLY,
                f"the server sent more than {MAX_RECEIVE} bytes while the probe was {self.stage}",
            )
        self._buffer += data

    async def line(self, *, record: bool = True) -> str:
        """The next line, ended by LF or CRLF, without its ending."""
        while (end := self._buffer.find(b"\n")) < 0:
            await self._fill()
        text = bytes(self._buffer[:end]).removesuffix(b"\r").decode("utf-8", "backslashreplace")
        del self._buffer[: end + 1]
        if record:
            self.transcript.append(("received", text))
        return text

    async def exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            await self._fill()
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def to_end(self) -> bytes:
        """Everything up to the server's close (an HTTP body without a length)."""
        while not self._eof:
            try:
                await self._fill()
            except _Ended:
                if not self._eof:
                    raise
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


async def _smtp_reply(conversation: _Conversation, stage: str) -> tuple[int, list[str]]:
    """One SMTP reply, multi-line or not: its code and the text of each line."""
    texts: list[str] = []
    code = 0
    with conversation.waiting(stage):
        while True:
            line = await conversation.line()
            match = _SMTP_REPLY.fullmatch(line)
            if match is None or (texts and int(match[1]) != code):
                raise _Ended(Outcome.BAD_REPLY, f"not an SMTP reply while {stage}: {line!r}")
            code = int(match[1])
            texts.append(match[3] or "")
            if match[2] != "-":
                break
    return code, texts


async def _smtp(conversation: _Conversation) -> None:
    code, texts = await _smtp_reply(conversation, "waiting for the banner")
    if code != 220:
        raise _Ended(Outcome.REFUSED, f"the server refused the session: {code} {texts[0]}")
    ehlo = f"EHLO {EHLO_NAME}"
    await conversation.send(f"{ehlo}\r\n".encode(), "EHLO", (ehlo,))
    code, texts = await _smtp_reply(conversation, "waiting for the reply to EHLO")
    if code != 250:
        raise _Ended(Outcome.REFUSED, f"the server refused EHLO: {code} {texts[0]}")
    match = _EHLO_CLIENT.search(texts[0])
    if match is not None:
        conversation.client_seen = match[1]
    await conversation.send(b"QUIT\r\n", "QUIT", ("QUIT",))
    await _smtp_reply(conversation, "waiting for the reply to QUIT")


async def _imap(conversation: _Conversation) -> None:
    with conversation.waiting("waiting for the greeting"):
        greeting = await conversation.line()
    status = greeting.split(" ", 2)[1].upper() if greeting.startswith("* ") else ""
    if status == "BYE":
        raise _Ended(Outcome.REFUSED, f"the server refused the session: {greeting}")
    if status not in ("OK", "PREAUTH"):
        raise _Ended(Outcome.BAD_REPLY, f"not an IMAP greeting: {greeting!r}")
    for tag, command in (("a1", "CAPABILITY"), ("a2", "LOGOUT")):
        request = f"{tag} {command}"
        await conversation.send(f"{request}\r\n".encode(), request, (request,))
        stage = f"waiting for the reply to {request}"
        with conversation.waiting(stage):
            while not (line := await conversation.line()).startswith(f"{tag} "):
                if not line.startswith(("* ", "+")):
                    raise _Ended(Outcome.BAD_REPLY, f"not an IMAP response while {stage}: {line!r}")
        status = line.split(" ", 2)[1].upper() if " " in line else ""
        if status != "OK":
            raise _Ended(Outcome.REFUSED, f"the server answered {request} with {line!r}")


async def _http(conversation: _Conversation) -> None:
    options = conversation.options
    host = options.authority if options.authority is not None else str(options.target)
    request = (
        "GET /whoami HTTP/1.1",
        f"Host: {host}",
        "User-Agent: mailedge-probe",
        "Accept: application/json",
        "Connection: close",
    )
    data = "".join(f"{line}\r\n" for line in request) + "\r\n"
    await conversation.send(data.encode(), "GET /whoami", request)
    with conversation.waiting("waiting for the response to GET /whoami"):
        status_line = await conversation.line()
        match = _HTTP_STATUS.fullmatch(status_line)
        if match is None:
            raise _Ended(Outcome.BAD_REPLY, f"not an HTTP response: {status_line!r}")
        conversation.http_status = int(match[1])
        headers: dict[str, str] = {}
        while line := await conversation.line(record=False):
            conversation.transcript.append(("received", line))
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await _http_body(conversation, headers)
    if conversation.http_status != 200:
        raise _Ended(
            Outcome.REFUSED,
            f"the server answered {status_line.partition(' ')[2]}, not the /whoami JSON",
        )
    try:
        whoami = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        whoami = None
    if not isinstance(whoami, dict):
        raise _Ended(Outcome.BAD_REPLY, "the /whoami response is not a JSON object")
    conversation.whoami = whoami
    client_ip = whoami.get("client_ip")
    conversation.client_seen = client_ip if isinstance(client_ip, str) else None


async def _http_body(conversation: _Conversation, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await conversation.line(record=False)
            size_text = size_line.partition(";")[0].strip()
            if not size_text or any(c not in "0123456789abcdefABCDEF" for c in size_text):
                raise _Ended(Outcome.BAD_REPLY, f"bad HTTP chunk size {size_line!r}")
            size = int(size_text, 16)
            if size == 0:
                return bytes(body)
            if size > MAX_RECEIVE:
                raise _Ended(Outcome.BAD_REPLY, f"an HTTP chunk of {size} bytes is too large")
            body += (await conversation.exactly(size + 2))[:size]
    length = headers.get("content-length")
    if length is None:
        return await conversation.to_end()
    if not length.isdigit() or int(length) > MAX_RECEIVE:
        raise _Ended(Outcome.BAD_REPLY, f"Content-Length {length!r} is not one the probe reads")
    return await conversation.exactly(int(length))


_EXCHANGES = {
    ListenerProtocol.SMTP: _smtp,
    ListenerProtocol.IMAP: _imap,
    ListenerProtocol.HTTP: _http,
}


def _connect_error(error: OSError) -> str:
    """The reason a connection failed: trio wraps each attempt's error in a group."""
    cause = error.__cause__
    if isinstance(cause, BaseExceptionGroup):
        reasons = {
            os.strerror(inner.errno)
            for inner in cause.exceptions
            if isinstance(inner, OSError) and inner.errno
        }
        if reasons:
            return ", ".join(sorted(reasons))
    return error.strerror or str(error)


def same_ip(seen: str, claimed: IPAddress) -> bool:
    """True when ``seen`` (an address as a server reported it) is ``claimed``, v4-mapped or not."""
    try:
        ip = ipaddress.ip_address(seen)
    except ValueError:
        return False
    return normalize_ip(ip) == normalize_ip(claimed)


async def probe(options: ProbeOptions) -> ProbeResult:
    """Connect, send the header, run the protocol's exchange, and report what came back.

    Network trouble (refused, reset, closed, silent) is reported in the result, never
    raised; each wait is bounded by ``options.timeout``. Raises :class:`ProbeUsageError`
    only for values that do not fit in a header.
    """
    target = options.target
    header = b""
    if options.mode is not HeaderMode.NONE and target.header_address is not None:
        # Built before connecting, so that a failed connection still shows the header.
        header = build_header(options, target.header_address)
    try:
        with trio.fail_after(options.timeout):
            source = None if options.source is None else str(options.source)
            stream = await trio.open_tcp_stream(target.host, target.port, local_address=source)
    except trio.TooSlowError:
        late = f"no connection to {target} within {options.timeout:g} s"
        return ProbeResult(options, Outcome.TIMEOUT, header, detail=late)
    except OSError as error:
        failed = f"cannot connect to {target}: {_connect_error(error)}"
        return ProbeResult(options, Outcome.CONNECT_FAILED, header, detail=failed)
    async with stream:
        local = format_endpoint(*stream.socket.getsockname()[:2])
        if options.mode is not HeaderMode.NONE and not header:
            # A host name: the header's default server is the address it resolved to.
            host, port = stream.socket.getpeername()[:2]
            header = build_header(
                options, InetAddress(normalize_ip(ipaddress.ip_address(host)), port)
            )
        conversation = _Conversation(stream, options)
        outcome = Outcome.COMPLETED
        detail: str | None = None
        try:
            if header:
                await conversation.send(header, "the PROXY header")
            await _EXCHANGES[options.protocol](conversation)
        except _Ended as ended:
            outcome, detail = ended.outcome, ended.detail
        except trio.TooSlowError:
            outcome = Outcome.TIMEOUT
            detail = f"no reply within {options.timeout:g} s while {conversation.stage}"
    claimed = options.claimed_client
    seen = conversation.client_seen
    return ProbeResult(
        options,
        outcome,
        header,
        tuple(conversation.transcript),
        local=local,
        client_seen=seen,
        whoami=conversation.whoami,
        http_status=conversation.http_status,
        detail=detail,
        matched=None if claimed is None or seen is None else same_ip(seen, claimed.ip),
    )
