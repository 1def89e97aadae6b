"""``mailedge probe``: connect to a listener as a proxy would, and show what the server sees.

The probe opens one TCP connection to a listener, sends a PROXY header the way HAProxy
would (v1, v2, a v2 LOCAL health check, or none at all), then speaks just enough of the
listener's protocol to learn which client the server believes it is talking to:

* SMTP: the banner, ``EHLO`` (whose first reply line names the client, ``[ip]``), ``QUIT``;
* IMAP: the greeting, ``CAPABILITY`` and ``LOGOUT``;
* HTTP: ``GET /whoami``, whose JSON body is the connection context (see the example handler).

It compares the client the server reports with the one the header claimed, and when the
server closes the connection instead, says what the gate most likely objected to. Every
network wait is bounded by the timeout, and no more than :data:`MAX_RECEIVE` bytes are read.

:func:`probe` does the work and returns a :class:`ProbeResult`; :func:`format_result` turns
it into text or JSON; :func:`probe_command` is the ``mailedge probe`` subcommand.
See docs/probe.md.
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import json as json_module
import math
import os
import re
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager

import attrs
import trio

from mailedge.cli import JSONObject, address_to_json, header_to_json
from mailedge.events import escape_bytes
from mailedge.networks import format_endpoint, normalize_ip
from mailedge.proxy import (
    TLV,
    ClientFlags,
    Command,
    Family,
    InetAddress,
    ProxyProtocolError,
    SSLInfo,
    TLVType,
    encode_v1,
    encode_v2,
    parse_header,
)
from mailedge.settings import Protocol

__all__ = [
    "DEFAULT_CLIENT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TLS_VERSION",
    "EHLO_NAME",
    "MAX_RECEIVE",
    "HeaderMode",
    "Outcome",
    "ProbeOptions",
    "ProbeResult",
    "ProbeUsageError",
    "Target",
    "add_probe_arguments",
    "build_header",
    "explain",
    "format_result",
    "parse_inet_address",
    "parse_target",
    "probe",
    "probe_command",
    "result_to_json",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# A documentation address (RFC 5737, TEST-NET-3): never a real client, so easy to spot.
DEFAULT_CLIENT = InetAddress(ipaddress.IPv4Address("203.0.113.7"), 40000)
DEFAULT_TIMEOUT = 10.0
DEFAULT_TLS_VERSION = "TLSv1.3"
# The name the probe greets SMTP servers with; .test is reserved (RFC 2606), never real.
EHLO_NAME = "probe.mailedge.test"
# Everything the probe reads from one connection: these exchanges take a few KiB, and a
# server that streams more (or never ends a line) must not make the probe buffer it all.
MAX_RECEIVE = 64 * 1024
# The spec's bound on PP2_TYPE_UNIQUE_ID; a mailedge listener rejects longer ones.
_UNIQUE_ID_MAX = 128
_RECEIVE_SIZE = 4096
# Bytes of header hex per output line.
_HEX_LINE = 32

_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.?")
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_SMTP_REPLY = re.compile(r"([2-5][0-9][0-9])(?:([ -])(.*))?")
# The client's address in an EHLO reply: "mx.example Hello client.example [192.0.2.1]".
_EHLO_CLIENT = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")
_HTTP_STATUS = re.compile(r"HTTP/\d\.\d ([1-5][0-9][0-9])(?: (.*))?")


class ProbeUsageError(ValueError):
    """Options that cannot make a probe (exit status 2). The message says which and why."""


class HeaderMode(enum.StrEnum):
    """What the probe sends before speaking the protocol."""

    V1 = "v1"
    V2 = "v2"
    # A v2 LOCAL header, as HAProxy's health checks send: no client address.
    LOCAL = "local"
    # No header at all: a direct client.
    NONE = "none"

    @property
    def claims_client(self) -> bool:
        """True when the header names a client (v1 and v2 PROXY)."""
        return self in (HeaderMode.V1, HeaderMode.V2)


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


def _split_host_port(text: str, what: str) -> tuple[str, str]:
    """``host`` and ``port`` text of ``HOST:PORT`` or ``[IPv6]:PORT``."""
    example = "such as 127.0.0.1:25 or [::1]:25"
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ProbeUsageError(f"{what} {text!r} is not an address and port {example}")
        return host, rest[1:]
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ProbeUsageError(f"{what} {text!r} has no port; write it {example}")
    if ":" in host:
        raise ProbeUsageError(f"{what} {text!r}: put an IPv6 address in brackets, {example}")
    return host, port


def _port(text: str, what: str, whole: str, *, allow_zero: bool) -> int:
    if not _PORT.fullmatch(text) or int(text) > 0xFFFF or (int(text) == 0 and not allow_zero):
        low = 0 if allow_zero else 1
        raise ProbeUsageError(f"{what} {whole!r} has an invalid port {text!r} ({low} to 65535)")
    return int(text)


@attrs.frozen
class Target:
    """Where the probe connects: an IP address or a host name, and a port."""

    host: str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        """The host as an address, when it is one (not a name)."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def header_address(self) -> InetAddress | None:
        """The target as a header's server address; None for a host name.

        A header cannot carry a zone id (``fe80::1%eth0``), so the address goes without it.
        """
        ip = self.ip
        if ip is None:
            return None
        return InetAddress(normalize_ip(ipaddress.ip_address(str(ip).partition("%")[0])), self.port)

    def __str__(self) -> str:
        return format_endpoint(self.host, self.port)


def parse_target(text: str) -> Target:
    """``127.0.0.1:3525``, ``[::1]:3525`` or ``mx.example:25``; raises ProbeUsageError."""
    host, port_text = _split_host_port(text, "HOST:PORT")
    port = _port(port_text, "HOST:PORT", text, allow_zero=False)
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ProbeUsageError(f"HOST:PORT {text!r}: {host!r} is not an IPv6 address") from None
    elif not _HOST_NAME.fullmatch(host):
        raise ProbeUsageError(f"HOST:PORT {text!r}: {host!r} is neither an address nor a name")
    return Target(host, port)


def parse_inet_address(text: str, what: str = "address") -> InetAddress:
    """An ``IP:PORT`` or ``[IPv6]:PORT`` for a header; raises ProbeUsageError."""
    host, port_text = _split_host_port(text, what)
    port = _port(port_text, what, text, allow_zero=True)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ProbeUsageError(f"{what} {text!r}: {host!r} is not an IP address") from None
    if text.startswith("[") != (ip.version == 6):
        raise ProbeUsageError(f"{what} {text!r}: only IPv6 addresses go in brackets")
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ProbeUsageError(f"{what} {text!r}: a PROXY header cannot carry a zone id")
    return InetAddress(ip, port)


def _check_timeout(_instance: object, _attribute: object, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ProbeUsageError(f"--timeout must be a number of seconds above 0, got {value!r}")


@attrs.frozen
class ProbeOptions:
    """One probe: the listener, the header to send and what it carries.

    ``client`` and ``server`` are the header's addresses: None means the default client
    (:data:`DEFAULT_CLIENT`) and the address the probe actually connected to. The TLV
    options need a v2 header (``V2`` or ``LOCAL``); the SSL details need ``ssl``.
    Inconsistent options raise :class:`ProbeUsageError`.
    """

    protocol: Protocol
    target: Target
    mode: HeaderMode = HeaderMode.V2
    client: InetAddress | None = None
    server: InetAddress | None = None
    # The SSL TLV: the client reached the proxy over TLS (CLIENT_SSL, verify 0).
    ssl: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    cn: str | None = None
    # Sets CERT_CONN: the client presented a certificate, which (verify 0) was verified.
    cert_verified: bool = False
    authority: str | None = None
    alpn: str | None = None
    unique_id: str | None = None
    crc32c: bool = False
    timeout: float = attrs.field(default=DEFAULT_TIMEOUT, validator=_check_timeout)

    def __attrs_post_init__(self) -> None:
        if not self.mode.claims_client:
            pairs = (("--client", self.client), ("--server", self.server))
            given = [option for option, value in pairs if value is not None]
            if given:
                sent = (
                    "a LOCAL header carries"
                    if self.mode is HeaderMode.LOCAL
                    else "without a header the probe sends"
                )
                raise ProbeUsageError(f"{' and '.join(given)}: {sent} no addresses")
        v2_only = [
            option
            for option, value in (
                ("--ssl", self.ssl),
                ("--authority", self.authority is not None),
                ("--alpn", self.alpn is not None),
                ("--unique-id", self.unique_id is not None),
                ("--crc32c", self.crc32c),
            )
            if value
        ]
        if v2_only and self.mode in (HeaderMode.V1, HeaderMode.NONE):
            sent = "a v1 header has no TLVs" if self.mode is HeaderMode.V1 else "no header is sent"
            raise ProbeUsageError(f"{', '.join(v2_only)}: {sent}; use --v2 or --local")
        ssl_only = [
            option
            for option, value in (
                ("--tls-version", self.tls_version is not None),
                ("--cipher", self.cipher is not None),
                ("--cn", self.cn is not None),
                ("--cert-verified", self.cert_verified),
            )
            if value
        ]
        if ssl_only and not self.ssl:
            raise ProbeUsageError(f"{', '.join(ssl_only)}: these describe the SSL TLV; add --ssl")
        if self.unique_id is not None and len(self.unique_id.encode()) > _UNIQUE_ID_MAX:
            raise ProbeUsageError(
                f"--unique-id is {len(self.unique_id.encode())} bytes; the spec allows "
                f"{_UNIQUE_ID_MAX} and a listener rejects more"
            )
        if self.alpn is not None and not self.alpn.isascii():
            raise ProbeUsageError(f"--alpn {self.alpn!r}: a protocol id is ASCII, such as h2")

    @property
    def claimed_client(self) -> InetAddress | None:
        """The client the header names; None for LOCAL and no header."""
        if not self.mode.claims_client:
            return None
        return DEFAULT_CLIENT if self.client is None else self.client


def _v1_mixed(client: InetAddress, server: InetAddress) -> bytes:
    """A v1 TCP6 line for addresses of two families, the IPv4 one v4-mapped and dotted.

    ``encode_v1`` takes one family; HAProxy writes a mixed pair this way.
    """

    def text(ip: IPAddress) -> str:
        return f"::ffff:{ip}" if ip.version == 4 else str(ip)

    line = f"PROXY TCP6 {text(client.ip)} {text(server.ip)} {client.port} {server.port}\r\n"
    return line.encode("ascii")


def build_header(options: ProbeOptions, server: InetAddress) -> bytes:
    """The header the probe sends (``b""`` for none); ``server`` is the default destination.

    Addresses of different families are written as HAProxy writes them: IPv6, with the
    IPv4 one v4-mapped (``::ffff:203.0.113.7``); a receiver turns it back into IPv4.
    Raises ProbeUsageError when the values do not fit in a header.
    """
    try:
        return _build_header(options, server)
    except ValueError as error:
        raise ProbeUsageError(f"the header cannot be built: {error}") from None


def _build_header(options: ProbeOptions, server: InetAddress) -> bytes:
    if options.mode is HeaderMode.NONE:
        return b""
    client = options.claimed_client
    destination = options.server or server
    if options.mode is HeaderMode.V1:
        assert client is not None
        if client.ip.version != destination.ip.version:
            return _v1_mixed(client, destination)
        return encode_v1(client, destination)
    tlvs: list[TLV] = []
    if options.alpn is not None:
        tlvs.append(TLV(TLVType.ALPN, options.alpn.encode("ascii")))
    if options.authority is not None:
        tlvs.append(TLV(TLVType.AUTHORITY, options.authority.encode()))
    if options.unique_id is not None:
        tlvs.append(TLV(TLVType.UNIQUE_ID, options.unique_id.encode()))
    ssl = None
    if options.ssl:
        flags = ClientFlags.SSL | (ClientFlags.CERT_CONN if options.cert_verified else 0)
        ssl = SSLInfo(
            client=ClientFlags(flags),
            verify=0,
            version=options.tls_version or DEFAULT_TLS_VERSION,
            cn=options.cn,
            cipher=options.cipher,
        )
    if options.mode is HeaderMode.LOCAL:
        return encode_v2(Command.LOCAL, tlvs=tlvs, ssl=ssl, crc32c=options.crc32c)
    assert client is not None
    mixed = client.ip.version != destination.ip.version
    return encode_v2(
        Command.PROXY,
        client,
        destination,
        tlvs=tlvs,
        ssl=ssl,
        crc32c=options.crc32c,
        family=Family.INET6 if mixed else None,
    )


# --- the result --------------------------------------------------------------------------


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
        whoami = json_module.loads(body)
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


_EXCHANGES = {Protocol.SMTP: _smtp, Protocol.IMAP: _imap, Protocol.HTTP: _http}


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


def _same_ip(seen: str, claimed: IPAddress) -> bool:
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
            stream = await trio.open_tcp_stream(target.host, target.port)
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
        matched=None if claimed is None or seen is None else _same_ip(seen, claimed.ip),
    )


# --- explaining and showing the result ---------------------------------------------------


def _host_of(endpoint: str | None) -> str:
    if endpoint is None:
        return "the probe's address"
    host = endpoint.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


def _log_hint(result: ProbeResult) -> str:
    peer = f" with peer={result.local}" if result.local else ""
    return f"The server's log names the reason (on mailedge: the gate's proxy.* event{peer})."


def _explain_closed(result: ProbeResult) -> list[str]:
    options = result.options
    me = _host_of(result.local)
    if options.mode is HeaderMode.NONE:
        return [
            f"No header was sent. A listener that trusts this address ({me}) as a proxy "
            'requires a PROXY header (proxyHeaderMode = "required") and closes a direct '
            'connection; probe it with --v2, or set proxyHeaderMode = "optional" on it.',
            _log_hint(result),
        ]
    if result.replies and options.protocol.server_first:
        lines = [
            "The server greeted the probe before reading the header, as a listener does for "
            "a peer it does not trust as a proxy, and closed the connection once it read the "
            f"header. Likely: this address ({me}) is not in the listener's trusted networks, "
            "or PROXY is off on that listener (overrideProxyTrustedNetworks = []).",
        ]
    else:
        lines = [
            "The server closed the connection without replying. Likely the gate rejected the "
            f"header: this address ({me}) is not a trusted proxy on that listener, PROXY is "
            "off on that listener (overrideProxyTrustedNetworks = []), or the header is "
            "malformed or longer than the listener accepts (proxyMaxHeaderLength).",
        ]
    return [*lines, _log_hint(result)]


def _explain_timeout(result: ProbeResult) -> list[str]:
    options = result.options
    if result.local is None:  # the connection itself timed out
        return ["Is the address right, and does a firewall drop the connection?"]
    if result.replies or not options.protocol.server_first:
        return ["The server is slow or stuck; its log may say why."]
    if options.mode is HeaderMode.NONE:
        return [
            f"The listener seems to trust this address ({_host_of(result.local)}) as a "
            "proxy: it waits for a PROXY header before greeting. Probe it with --v2, or set "
            'proxyHeaderMode = "optional" on it to serve trusted peers that connect directly.',
        ]
    return [
        f"After the header, an {options.protocol.upper()} server greets at once. This one is "
        "waiting: for more of the header (does it expect another version?), or because it "
        "is not an SMTP or IMAP listener (an HTTP server waits for the client to speak).",
        _log_hint(result),
    ]


def _why_unseen(result: ProbeResult) -> str:
    protocol = result.options.protocol
    if protocol is Protocol.IMAP:
        return "IMAP has no command that shows it"
    if protocol is Protocol.SMTP:
        return "its EHLO reply has no [address]"
    return "the /whoami JSON has no client_ip"


def explain(result: ProbeResult) -> list[str]:
    """What the result means, in sentences: the verdict first, then the likely causes."""
    options = result.options
    lines = [result.detail] if result.detail else []
    if result.outcome is Outcome.CONNECT_FAILED:
        return [*lines, f"Is the server running, with a listener on {options.target}?"]
    if result.outcome is Outcome.CLOSED:
        return [*lines, *_explain_closed(result)]
    if result.outcome is Outcome.TIMEOUT:
        return [*lines, *_explain_timeout(result)]
    if result.outcome in (Outcome.BAD_REPLY, Outcome.REFUSED):
        if result.outcome is Outcome.BAD_REPLY:
            lines.append(f"Is {options.target} an {options.protocol.upper()} listener?")
        if options.mode is not HeaderMode.NONE and result.local is not None:
            lines.append(
                "A server that does not expect a PROXY header reads it as "
                f"{options.protocol.upper()} and answers it with an error, which then arrives "
                "where the probe expected its reply; compare with --no-header."
            )
        return lines
    claimed = options.claimed_client
    seen = result.client_seen
    me = _host_of(result.local)
    if claimed is not None and seen is None:
        return [
            f"The server does not report the client's address ({_why_unseen(result)}), so "
            f"the header's claim ({claimed.ip}) cannot be checked here. The server's log "
            f"names the client of the connection from peer={result.local} (mailedge: the "
            "gate's proxy.accepted event, logged at DEBUG)."
        ]
    if claimed is not None and result.matched:
        return [f"MATCH: the server sees the client the header claimed, {claimed.ip}."]
    if claimed is not None:
        lines = [f"MISMATCH: the header claimed {claimed.ip}, but the server sees {seen}."]
        own = result.local is not None and seen is not None
        if own and _same_ip(str(seen), ipaddress.ip_address(me)):
            lines.append("That is the probe's own address: the header was not used.")
        return [
            *lines,
            f"Likely causes: the listener does not trust this address ({me}) as a proxy, so "
            "it did not use the header; PROXY is off on that listener "
            "(overrideProxyTrustedNetworks = []); or the server reads the header but reports "
            "the connection's own address. " + _log_hint(result),
        ]
    if options.mode is HeaderMode.LOCAL:
        source = (result.whoami or {}).get("address_source")
        sees = f"; it sees {seen}" if seen is not None else ""
        shown = f" (address_source {source})" if source is not None else ""
        return [
            "A LOCAL header names no client: the server uses the connection's own "
            f"addresses{sees}{shown}."
        ]
    if seen is None:
        return ["No header was sent, so there is no claim to check."]
    return [
        f"No header was sent, so there is no claim to check: the server sees {seen}, and "
        f"the probe's own address is {me}."
    ]


def _describe_header(data: bytes) -> str:
    """One line about the header, from mailedge's own parser: what the server will read."""
    try:
        parsed = parse_header(data)
    except ProxyProtocolError as error:  # build_header writes valid ones; just in case
        return f"not a valid header: {error.message}"
    if parsed is None:
        return "an incomplete header"
    header, _ = parsed
    if header.version == 1:
        return f"v1: {escape_bytes(data, limit=None)}"
    text = f"v2 {header.command.name} {header.family.name}"
    if isinstance(header.source, InetAddress) and isinstance(header.destination, InetAddress):
        source, destination = header.source, header.destination
        text += f" {format_endpoint(source.ip, source.port)} -> "
        text += format_endpoint(destination.ip, destination.port)
    names: list[str] = []
    for tlv in header.tlvs:
        try:
            names.append(TLVType(tlv.type).name)
        except ValueError:  # the probe writes only named types; just in case
            names.append(f"0x{tlv.type:02x}")
    if names:
        text += f", TLVs: {', '.join(names)}"
    return text


def _header_to_json(result: ProbeResult) -> JSONObject:
    data = result.header
    decoded: JSONObject | None = None
    try:
        parsed = parse_header(data) if data else None
    except ProxyProtocolError:
        parsed = None
    if parsed is not None:
        decoded = header_to_json(parsed[0])
    return {
        "mode": str(result.options.mode),
        "length": len(data),
        "hex": data.hex(),
        "text": escape_bytes(data, limit=None) if result.options.mode is HeaderMode.V1 else None,
        "decoded": decoded,
    }


def result_to_json(result: ProbeResult) -> JSONObject:
    """The result as plain JSON values, for ``--json``."""
    options = result.options
    return {
        "protocol": str(options.protocol),
        "target": str(options.target),
        "local": result.local,
        "header": _header_to_json(result),
        "claimed_client": address_to_json(options.claimed_client),
        "outcome": str(result.outcome),
        "closed_early": result.closed_early,
        "detail": result.detail,
        "transcript": [{"direction": d, "line": line} for d, line in result.transcript],
        "http_status": result.http_status,
        "whoami": result.whoami,
        "client_seen": result.client_seen,
        "matched": result.matched,
        "explanation": explain(result),
        "exit_code": result.exit_code,
    }


def format_result(result: ProbeResult, json: bool = False) -> str:
    """The result as the text ``mailedge probe`` prints, or as indented JSON."""
    if json:
        return json_module.dumps(result_to_json(result), indent=2)
    options = result.options
    out = [f"probe {options.protocol} {options.target}"]
    if result.local is not None:
        out[0] += f" from {result.local}"
    if result.header:
        out.append(f"header sent ({len(result.header)} bytes): {_describe_header(result.header)}")
        hex_text = result.header.hex()
        step = 2 * _HEX_LINE
        out.extend(f"  {hex_text[i : i + step]}" for i in range(0, len(hex_text), step))
    elif options.mode is HeaderMode.NONE:
        out.append("header sent: none (--no-header)")
    for direction, line in result.transcript:
        out.append(f"{'>' if direction == 'sent' else '<'} {line}")
    if result.whoami is not None:
        out.append("whoami:")
        out.append(json_module.dumps(result.whoami, indent=2))
    if result.client_seen is not None:
        out.append(f"server sees client: {result.client_seen}")
    out.extend(explain(result))
    return "\n".join(out)


# --- the subcommand ----------------------------------------------------------------------


def _target_type(text: str) -> Target:
    try:
        return parse_target(text)
    except ProbeUsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _address_type(option: str) -> Callable[[str], InetAddress]:
    def parse(text: str) -> InetAddress:
        try:
            return parse_inet_address(text, option)
        except ProbeUsageError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _timeout_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


_EPILOG = """\
examples:
  mailedge probe smtp 127.0.0.1:3525 --client 203.0.113.7:40000
  mailedge probe http [::1]:3080 --ssl --authority mail.example.com
  mailedge probe imap 127.0.0.1:3143 --v1

exit status: 0 when the exchange completed (and, for smtp and http, the server sees the
client the header claimed); 1 on a mismatch, or when the connection was refused, closed
or timed out; 2 for invalid options. See docs/probe.md.
"""


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``probe`` subcommand's arguments."""
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "protocol",
        choices=[str(protocol) for protocol in Protocol],
        metavar="PROTOCOL",
        help="what the listener speaks: smtp, imap or http",
    )
    parser.add_argument(
        "target",
        type=_target_type,
        metavar="HOST:PORT",
        help="the listener, such as 127.0.0.1:3525 or [::1]:3525",
    )
    header = parser.add_argument_group("the header").add_mutually_exclusive_group()
    for flag, mode, text in (
        ("--v1", HeaderMode.V1, "send a v1 (text) header"),
        ("--v2", HeaderMode.V2, "send a v2 (binary) header; the default"),
        ("--local", HeaderMode.LOCAL, "send a v2 LOCAL header, as a proxy's health check does"),
        ("--no-header", HeaderMode.NONE, "send no header: connect as a direct client"),
    ):
        header.add_argument(flag, dest="mode", action="store_const", const=mode, help=text)
    parser.set_defaults(mode=HeaderMode.V2)
    addresses = parser.add_argument_group("the header's addresses (v1 and v2)")
    addresses.add_argument(
        "--client",
        type=_address_type("--client"),
        metavar="IP:PORT",
        help=f"the client the header claims (default {DEFAULT_CLIENT.ip}:{DEFAULT_CLIENT.port})",
    )
    addresses.add_argument(
        "--server",
        type=_address_type("--server"),
        metavar="IP:PORT",
        help="the server address the header names (default: the address connected to)",
    )
    tlvs = parser.add_argument_group("TLVs (v2 and --local only)")
    tlvs.add_argument(
        "--ssl",
        action="store_true",
        help="add an SSL TLV: the client reached the proxy over TLS (CLIENT_SSL, verify 0)",
    )
    tlvs.add_argument(
        "--tls-version",
        metavar="VERSION",
        help=f"with --ssl: the TLS version (default {DEFAULT_TLS_VERSION})",
    )
    tlvs.add_argument("--cipher", metavar="NAME", help="with --ssl: the cipher")
    tlvs.add_argument("--cn", metavar="NAME", help="with --ssl: the client certificate's CN")
    tlvs.add_argument(
        "--cert-verified",
        action="store_true",
        help="with --ssl: the client presented a certificate and it verified (CERT_CONN)",
    )
    tlvs.add_argument("--authority", metavar="NAME", help="an AUTHORITY TLV (the SNI name)")
    tlvs.add_argument("--alpn", metavar="PROTO", help="an ALPN TLV, such as h2")
    tlvs.add_argument("--unique-id", metavar="TEXT", help="a UNIQUE_ID TLV (at most 128 bytes)")
    tlvs.add_argument("--crc32c", action="store_true", help="add a CRC32C checksum TLV")
    parser.add_argument(
        "--timeout",
        type=_timeout_type,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"bound on the connection and on each wait for a reply (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def options_from_args(args: argparse.Namespace) -> ProbeOptions:
    """The parsed arguments as ProbeOptions; raises ProbeUsageError when they conflict."""
    return ProbeOptions(
        protocol=Protocol(args.protocol),
        target=args.target,
        mode=args.mode,
        client=args.client,
        server=args.server,
        ssl=args.ssl,
        tls_version=args.tls_version,
        cipher=args.cipher,
        cn=args.cn,
        cert_verified=args.cert_verified,
        authority=args.authority,
        alpn=args.alpn,
        unique_id=args.unique_id,
        crc32c=args.crc32c,
        timeout=args.timeout,
    )


def probe_command(args: argparse.Namespace) -> int:
    """Run ``probe``: 0 when the exchange completed and matched, 1 when not, 2 for bad options."""
    try:
        options = options_from_args(args)
        result = trio.run(probe, options)
    except ProbeUsageError as error:
        print(f"mailedge probe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mailedge probe: interrupted", file=sys.stderr)
        return 130
    print(format_result(result, json=args.json))
    return result.exit_code
