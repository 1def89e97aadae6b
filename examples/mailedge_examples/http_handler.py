"""An example HTTP handler: who the gate says you are, a health check, and gate metrics.

Routes (GET and HEAD, except where noted):

* ``/whoami``: the connection context as JSON, exactly as the gate established it;
* ``/healthz``: ``ok``;
* ``/metrics``: the gate's decision counters in the Prometheus text format;
* ``/admin/bans``: the auto-ban list as JSON, and ``POST /admin/bans/lift?ip=ADDRESS`` to lift
  one;
* ``/admin/``: the operator's console (with a :class:`~mailedge_examples.console.Console`):
  its page, ``/admin/api/state`` (listeners and trusted networks), ``/admin/api/decisions``
  (the recent gate decisions), ``/admin/events`` (the recent decisions, then each new one,
  as server-sent events that a reconnecting client resumes from ``Last-Event-ID``) and
  ``POST /admin/api/trusted`` (edit the trusted networks; see ``docs/console.md``).

The admin routes answer only direct connections from a loopback address (not proxied,
whatever a proxy's header says), with a loopback ``Host`` (parsed strictly as
``uri-host[:port]``), or a request that carries the console's admin token. A request a browser
sends (it has an ``Origin``, a ``Referer`` or a ``Cookie``) must come from the console's own
origin, and a browser's ``POST`` must carry the page's CSRF token too, so no other web page can
drive them; anything else gets 403.

HTTP/1.1 is spoken with h11 (sans-IO) over the trio stream the server layer hands over, with
keep-alive and a bounded request head. ``X-Forwarded-For`` and its relatives are never read:
the client's address is what the PROXY gate established, from a trusted peer's header or the
socket itself, and a header any client can type proves nothing.
"""

from __future__ import annotations

import email.utils
import hmac
import http
import ipaddress
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence

import attrs
import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Metric, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.registry import Collector

from mailedge.connlog import ConnectionLogger
from mailedge.context import ConnectionContext, context_to_json
from mailedge.decisions import Decision, DecisionRing
from mailedge.hooks.autoban import AutoBan
from mailedge.shutdown import ShuttingDown, awaiting_command, draining
from mailedge_examples.console import (
    STATIC,
    Console,
    ConsoleCollector,
    EditRefused,
    static_file,
)

__all__ = [
    "DEFAULT_MAX_REQUEST_SIZE",
    "CounterSource",
    "GateDecisionsCollector",
    "HTTPHandler",
]

logger = logging.getLogger("mailedge.examples.http")

# No route takes a body and a request head is a few hundred bytes; 16 KiB (h11's default)
# still fits a browser's cookies, and caps what an unfinished request can make us buffer.
# h11 checks it between reads, so a head that completes within one read may run a read over.
DEFAULT_MAX_REQUEST_SIZE = 16 * 1024

_RECEIVE_SIZE = 4096
_ALLOWED_METHODS = (b"GET", b"HEAD")

_ADMIN_PREFIX = b"/admin/"
# The cookie /admin/?token= sets, so the page's own requests (and its event stream, which
# cannot set headers) carry the admin token.
_TOKEN_COOKIE = "mailedge_admin"
# The header a browser's POST carries the page's CSRF token in.
_CSRF_HEADER = b"x-csrf-token"
# Host names a loopback admin request may carry (a DNS-rebinding page would send its own name);
# [::1] is compared as an address, so [0:0::1] is it too.
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1"})
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")
# RFC 9110 7.2: Host = uri-host [ ":" port ], with RFC 3986's uri-host = IP-literal /
# IPv4address / reg-name and port = *DIGIT. IPv4address is a reg-name too, so one group
# takes both. Nothing else may follow the host: not "localhost:evil.com", not
# "localhost:80@evil.com". The port's digits are capped at 5 to bound the number.
_HOST = re.compile(
    r"(?:\[(?P<literal>[0-9A-Za-z:.]+)\]"
    r"|(?P<name>(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*))"
    r"(?::(?P<port>[0-9]{0,5}))?"
)

# What the counters look like: ((listener, event name, reason), count), as
# ``iter(gate.counters)`` yields them. Pass ``lambda: gate.counters``.
CounterSource = Callable[[], Iterable[tuple[tuple[str, str, str], int]]]

Headers = Sequence[tuple[str, str]]


# eq=False keeps identity hashing: the registry keys its collectors by the object.
@attrs.define(eq=False)
class GateDecisionsCollector(Collector):
    """Exposes gate decision counts as ``mailedge_gate_decisions_total``, read at scrape time."""

    source: CounterSource | None

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            "mailedge_gate_decisions",
            "PROXY gate decisions, by listener, event name and reason.",
            labels=["listener", "event", "reason"],
        )

    def describe(self) -> Iterable[Metric]:
        # Lets the registry learn the metric's name without reading the counters.
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        if self.source is not None:
            for (listener, event, reason), count in self.source():
                family.add_metric([listener, event, reason], count)
        return [family]


@attrs.define
class HTTPHandler:
    """A connection handler serving ``/whoami``, ``/healthz``, ``/metrics`` and the ban admin.

    ``counters_source`` returns the gate's counters at each scrape; without it ``/metrics``
    shows the metric with no samples. The Prometheus registry is the handler's own, never
    the process-wide default one. ``autoban`` is what ``/admin/bans`` lists and lifts; without
    it those routes answer 404 (after the same access check).
    """

    counters_source: CounterSource | None = None
    server_name: str = "mailedge-example"
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE
    autoban: AutoBan | None = None
    # The operator's console under /admin/, and the metrics it knows about; None: no console.
    console: Console | None = None
    registry: CollectorRegistry = attrs.field(init=False, repr=False)
    _console_metrics: ConsoleCollector | None = attrs.field(default=None, init=False, repr=False)
    # What /metrics serves when not this process's own registry: with worker processes, the
    # whole server's (prometheus-client's multiprocess collector; examples/mailserver.py).
    exposed: CollectorRegistry | None = attrs.field(default=None, kw_only=True, repr=False)

    def __attrs_post_init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(GateDecisionsCollector(self.counters_source))
        if self.console is not None:
            self._console_metrics = ConsoleCollector(self.console)
            self.registry.register(self._console_metrics)

    async def metrics(self) -> bytes:
        """The Prometheus text, with the ban count read (it may await a store) just before."""
        if self._console_metrics is not None and self.autoban is not None:
            self._console_metrics.bans = len(await self.autoban.bans())
        return generate_latest(self.exposed or self.registry)

    async def __call__(self, stream: trio.abc.Stream, context: ConnectionContext) -> None:
        connection = _Connection(self, stream, context)
        try:
            await connection.serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            connection.log.debug("client went away")


@attrs.frozen
class _Reply:
    status: int
    content_type: str
    body: bytes
    headers: Headers = ()
    # Close the connection after this reply.
    close: bool = False


# The page's headers: no framing by other sites, and nothing loaded from anywhere else.
_PAGE_HEADERS: Headers = (
    ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
)


@attrs.frozen
class _EventStream:
    """The route's answer for ``/admin/events``: a stream, not one reply."""

    console: Console
    # The request's Last-Event-ID: the id of the last decision a reconnecting client got.
    last_event_id: str | None = None


# An event's id: "<ring epoch>-<sequence number>" (mailedge.decisions.DecisionRing).
_EVENT_ID = re.compile(r"(?P<epoch>[0-9a-f]+)-(?P<seq>[0-9]{1,18})")


def _resume_from(ring: DecisionRing, last_event_id: str | None) -> int | None:
    """The sequence number a client that last got ``last_event_id`` resumes after; None when
    it got nothing from this ring (no id, or one from another process or an earlier run)."""
    match = _EVENT_ID.fullmatch(last_event_id or "")
    if match is None or match["epoch"] != ring.epoch:
        return None
    return min(int(match["seq"]), ring.last)


def _event_frame(ring: DecisionRing, seq: int, decision: Decision, kind: str | None) -> bytes:
    line = json.dumps(decision.to_json(), separators=(",", ":"))
    event = f"event: {kind}\n" if kind else ""
    return f"id: {ring.epoch}-{seq}\n{event}data: {line}\n\n".encode()


def _text(status: int, text: str, *, headers: Headers = (), close: bool = False) -> _Reply:
    return _Reply(status, "text/plain; charset=utf-8", text.encode(), headers, close)


def _json(status: int, value: object) -> _Reply:
    return _Reply(status, "application/json", (json.dumps(value, indent=2) + "\n").encode())


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _cookie(request: h11.Request, name: str) -> str | None:
    for key, value in request.headers:
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key_text, _, text = part.strip().partition("=")
                if key_text == name:
                    return text
    return None


def _has_token(request: h11.Request, console: Console | None) -> bool:
    """True when the request carries the console's admin token (header or cookie)."""
    if console is None or not console.admin_token:
        return False
    expected = console.admin_token.encode()
    authorization = _header(request, b"authorization") or ""
    scheme, _, given = authorization.partition(" ")
    candidates = [given] if scheme.lower() == "bearer" else []
    cookie = _cookie(request, _TOKEN_COOKIE)
    if cookie is not None:
        candidates.append(urllib.parse.unquote(cookie))
    path, _, query = request.target.partition(b"?")
    if path == b"/admin/" and request.method in _ALLOWED_METHODS:
        # The page's link: /admin/?token=... (it answers with the cookie).
        candidates += urllib.parse.parse_qs(query.decode("latin-1")).get("token", [])
    return any(hmac.compare_digest(expected, c.encode()) for c in candidates)


def _same_origin(value: str, host: str, tls: bool) -> bool:
    """True when ``value`` (an Origin, or a Referer URL) is this server's own origin."""
    url = urllib.parse.urlsplit(value)
    scheme = "https" if tls else "http"
    return url.scheme == scheme and url.netloc.lower() == host.lower()


def _admin_refusal(
    context: ConnectionContext, request: h11.Request, console: Console | None = None
) -> str | None:
    """Why this request may not use the admin routes, or None when it may."""
    hosts = [value for key, value in request.headers if key == b"host"]
    if len(hosts) != 1:
        # RFC 9112 3.2: a request with no Host, or more than one, is a client error.
        return f"{len(hosts)} Host headers"
    host = hosts[0].decode("latin-1")
    if not _has_token(request, console):
        if context.proxied or not context.client_known:
            # A proxy's header names some client; it is not proof of being on this host.
            return "proxied"
        if not context.client_ip.is_loopback:
            return "not loopback"
        if not _is_loopback_host(host):
            return f"Host {host!r} is not a loopback name"
    origin = _header(request, b"origin")
    referer = _header(request, b"referer")
    browser = origin is not None or referer is not None or _header(request, b"cookie") is not None
    if not browser:
        # curl and scripts: no web page can make a request without these headers.
        return None
    if console is None:
        return "a browser's request, and there is no console"
    claimed = origin if origin is not None else referer
    if claimed is None or not _same_origin(claimed, host, context.tls):
        # A cross-site page, or a browser that hid where the request came from.
        return f"origin {claimed!r} is not this console's"
    if request.method not in _ALLOWED_METHODS:
        token = _header(request, _CSRF_HEADER) or ""
        if not hmac.compare_digest(token.encode(), console.csrf_token.encode()):
            return "no valid CSRF token"
    return None


def _is_loopback_host(host: str) -> bool:
    """True when ``host`` is exactly ``uri-host[:port]`` (RFC 9110) naming a loopback host.

    ``localhost`` (any case), ``127.0.0.1`` or ``[::1]``, with an optional port from 0 to
    65535. An empty port (``localhost:``) is accepted: RFC 3986's grammar allows it and it
    names the same host. Anything the grammar does not allow is refused, whatever it starts
    with.
    """
    match = _HOST.fullmatch(host)
    if match is None:
        return False
    port = match["port"]
    if port and int(port) > 0xFFFF:
        return False
    literal = match["literal"]
    if literal is not None:
        try:
            return ipaddress.IPv6Address(literal) == _LOOPBACK_V6
        except ValueError:  # IPvFuture, or not an address at all
            return False
    return match["name"].lower() in _LOOPBACK_NAMES


@attrs.define
class _Connection:
    """One HTTP connection: h11's state machine driven over the stream."""

    handler: HTTPHandler
    stream: trio.abc.Stream
    context: ConnectionContext
    machine: h11.Connection = attrs.field(init=False)
    log: ConnectionLogger = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.log = ConnectionLogger(logger, self.context)
        self.machine = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.handler.max_request_size
        )

    async def serve(self) -> None:
        while True:
            try:
                keep_alive = await self.one_request()
            except h11.RemoteProtocolError as exc:
                await self.reject(exc)
                return
            if not keep_alive:
                return

    async def next_event(self) -> h11.Event:
        while True:
            event = self.machine.next_event()
            if event is h11.NEED_DATA:
                # b"" at end of stream tells h11 the client closed.
                data = await self.stream.receive_some(_RECEIVE_SIZE)
                self.machine.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Event):
                return event
            # PAUSED: only possible if we read while a response is still owed.
            raise RuntimeError(f"h11 paused in states {self.machine.states}")

    async def one_request(self) -> bool:
        """Read a request, answer it; True when the connection can take another."""
        try:
            # Between requests the connection is idle: shutdown closes it (ShuttingDown).
            with awaiting_command():
                event = await self.next_event()
        except trio.TooSlowError:
            # The server's idle timeout. Between requests that is just keep-alive running out;
            # in the middle of one it is the server's to report.
            if self.machine.their_state is h11.IDLE and not self.machine.trailing_data[0]:
                self.log.debug("idle connection closed")
                return False
            raise
        if isinstance(event, h11.ConnectionClosed):
            return False
        # A client in h11's IDLE state can only start a request or close.
        assert isinstance(event, h11.Request), event
        request = event
        body: bytes | None = b""
        if not self.machine.they_are_waiting_for_100_continue:
            body = await self.read_body()
        reply = await self.route(request, body or b"")
        if isinstance(reply, _EventStream):
            await self.stream_events(reply)
            return False
        if self.machine.they_are_waiting_for_100_continue:
            # We never want a body; refuse it by answering now and closing.
            reply = attrs.evolve(reply, close=True)
        elif body is None:
            reply = _text(413, "request body too large\n", close=True)
        await self.respond(reply, head=request.method == b"HEAD")
        self.log.debug(
            "%s %s -> %d",
            request.method.decode("ascii", "replace"),
            request.target.decode("ascii", "replace"),
            reply.status,
        )
        if self.machine.our_state is h11.DONE and self.machine.their_state is h11.DONE:
            self.machine.start_next_cycle()
            return True
        return False

    async def read_body(self) -> bytes | None:
        """The request body; None (the rest unread) if it exceeds ``max_request_size``."""
        body = bytearray()
        while True:
            event = await self.next_event()
            if isinstance(event, h11.EndOfMessage):
                return bytes(body)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.handler.max_request_size:
                    return None

    async def route(self, request: h11.Request, body: bytes = b"") -> _Reply | _EventStream:
        if request.target.startswith(_ADMIN_PREFIX) or request.target == b"/admin":
            return await self.admin(request, body)
        if request.method not in _ALLOWED_METHODS:
            return _text(405, "method not allowed\n", headers=[("Allow", "GET, HEAD")])
        path = request.target.partition(b"?")[0]
        if path == b"/whoami":
            # Deliberately built from the context alone: request headers such as
            # X-Forwarded-For are client-controlled and never consulted.
            text = json.dumps(context_to_json(self.context), indent=2) + "\n"
            return _Reply(200, "application/json", text.encode())
        if path == b"/healthz":
            return _text(200, "ok")
        if path == b"/metrics":
            return _Reply(200, CONTENT_TYPE_LATEST, await self.handler.metrics())
        return _text(404, "not found\n")

    async def admin(self, request: h11.Request, body: bytes = b"") -> _Reply | _EventStream:
        """The admin routes: loopback, direct connections only, or the admin token."""
        console = self.handler.console
        refusal = _admin_refusal(self.context, request, console)
        if refusal is not None:
            self.log.warning("admin request refused: %s", refusal)
            return _text(403, "forbidden\n")
        path, _, query = request.target.partition(b"?")
        autoban = self.handler.autoban
        if console is not None and not path.startswith(b"/admin/bans"):
            return await self.console(console, request, path, query, body)
        if path == b"/admin/bans":
            if request.method not in _ALLOWED_METHODS:
                return _text(405, "method not allowed\n", headers=[("Allow", "GET, HEAD")])
            if autoban is None:
                return _text(404, "auto-ban is not configured\n")
            return _json(200, [ban.to_json() for ban in await autoban.bans()])
        if path == b"/admin/bans/lift":
            if request.method != b"POST":
                return _text(405, "method not allowed\n", headers=[("Allow", "POST")])
            if autoban is None:
                return _text(404, "auto-ban is not configured\n")
            values = urllib.parse.parse_qs(query.decode("latin-1")).get("ip", [])
            if len(values) != 1:
                return _text(400, "give exactly one ip=ADDRESS or ip=NETWORK\n")
            try:
                lifted = await autoban.lift(values[0])
            except ValueError as exc:
                return _text(400, f"{exc}\n")
            self.log.warning("admin: lift %r -> %s", values[0], lifted)
            return _json(200 if lifted else 404, {"ip": values[0], "lifted": lifted})
        return _text(404, "not found\n")

    async def console(
        self, console: Console, request: h11.Request, path: bytes, query: bytes, body: bytes
    ) -> _Reply | _EventStream:
        """The console's page, its JSON, its event stream and its one edit."""
        if path == b"/admin/api/trusted":
            if request.method != b"POST":
                return _text(405, "method not allowed\n", headers=[("Allow", "POST")])
            return self.edit_trusted(console, body)
        if request.method not in _ALLOWED_METHODS:
            return _text(405, "method not allowed\n", headers=[("Allow", "GET, HEAD")])
        if path in (b"/admin", b"/admin/"):
            return self.page(console, query)
        name = path.removeprefix(_ADMIN_PREFIX).decode("latin-1")
        if name in STATIC and name != "index.html":
            return _Reply(200, STATIC[name], static_file(name), headers=_PAGE_HEADERS)
        if path == b"/admin/api/state":
            return _json(200, console.state())
        if path == b"/admin/api/decisions":
            return _json(200, [d.to_json() for d in console.decisions.recent()])
        if path == b"/admin/events":
            return _EventStream(console, _header(request, b"last-event-id"))
        return _text(404, "not found\n")

    def page(self, console: Console, query: bytes) -> _Reply:
        """The page, with this process's CSRF token in it; ``?token=`` sets the admin cookie."""
        html = static_file("index.html").replace(
            b"{{csrf_token}}", console.csrf_token.encode("ascii")
        )
        headers = list(_PAGE_HEADERS)
        given = urllib.parse.parse_qs(query.decode("latin-1")).get("token", [])
        if (
            given
            and console.admin_token
            and hmac.compare_digest(given[0].encode(), console.admin_token.encode())
        ):
            cookie = urllib.parse.quote(given[0], safe="")
            headers.append(
                (
                    "Set-Cookie",
                    f"{_TOKEN_COOKIE}={cookie}; Path=/admin; HttpOnly; SameSite=Strict",
                )
            )
        return _Reply(200, STATIC["index.html"], html, headers=headers)

    def edit_trusted(self, console: Console, body: bytes) -> _Reply:
        """``{"listener": null | NAME, "networks": [...] | null}``: edit, write, reload."""
        try:
            value = json.loads(body)
            listener, networks = value["listener"], value["networks"]
        except (ValueError, KeyError, TypeError):
            value = listener = networks = None
        if (
            not isinstance(value, dict)
            or (listener is not None and not isinstance(listener, str))
            or (
                networks is not None
                and not (isinstance(networks, list) and all(isinstance(n, str) for n in networks))
            )
        ):
            return _json(
                400,
                {
                    "ok": False,
                    "message": 'expected {"listener": null or a name, "networks": [...] or null}',
                },
            )
        try:
            message = console.edit(listener, networks)
        except EditRefused as exc:
            self.log.warning("console: trusted networks not changed: %s", exc)
            return _json(409, {"ok": False, "message": str(exc)})
        self.log.warning("console: %s", message)
        return _json(200, {"ok": True, "message": message})

    async def stream_events(self, events: _EventStream) -> None:
        """The recent decisions, then each new one, as server-sent events, until the client
        goes or the server stops.

        Each event's ``id`` is the ring's epoch and the decision's number. A new client gets
        the whole ring first, as ``backlog`` events (oldest first); a client that reconnects
        with ``Last-Event-ID`` gets only what came after it. Subscribing and reading the
        ring happen with no checkpoint between, so no decision falls in a gap between the
        two, and none is sent twice.
        """
        headers = [
            ("Server", self.handler.server_name),
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-store"),
        ]
        console = events.console
        ring = console.decisions
        with ring.subscribe() as subscription:
            resumed = _resume_from(ring, events.last_event_id)
            backlog, lost = ring.after(resumed or 0)
            await self.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))
            # Tell the page the stream is up (it can show it, and a test can wait for it).
            await self.send(h11.Data(data=b": connected\n\n"))
            last = resumed or 0
            dropped = 0
            try:
                if resumed is not None and lost:
                    await self._lost(lost)
                kind = None if resumed is not None else "backlog"
                for seq, decision in backlog:
                    await self.send(h11.Data(data=_event_frame(ring, seq, decision, kind)))
                    last = seq
                while True:
                    received = None
                    # Waiting for a decision is idle: shutdown ends the stream at once.
                    with awaiting_command(), trio.move_on_after(console.heartbeat):
                        received = await subscription.receive_numbered()
                    if received is None:
                        await self.send(h11.Data(data=b": heartbeat\n\n"))
                        continue
                    seq, decision = received
                    if seq <= last:
                        continue  # already sent, from the backlog or the ring
                    if seq == last + 1 and subscription.dropped == dropped:
                        await self.send(h11.Data(data=_event_frame(ring, seq, decision, None)))
                        last = seq
                        continue
                    # This client fell behind and its queue dropped the newest: take them from
                    # the ring while it still holds them, rather than wait for one more.
                    dropped = subscription.dropped
                    missed, lost = ring.after(last)
                    if lost:
                        await self._lost(lost)
                    for seq, decision in missed:
                        await self.send(h11.Data(data=_event_frame(ring, seq, decision, None)))
                        last = seq
            except ShuttingDown:
                await self.send(h11.EndOfMessage())

    async def _lost(self, count: int) -> None:
        """Say (as a comment) that ``count`` decisions left the ring before this client got
        them."""
        self.log.info(
            "event stream: %d decisions fell out of the ring before they were sent", count
        )
        await self.send(h11.Data(data=f": {count} decisions were missed\n\n".encode()))

    async def respond(self, reply: _Reply, *, head: bool = False) -> None:
        headers = [
            ("Server", self.handler.server_name),
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            ("Cache-Control", "no-store"),
            *reply.headers,
        ]
        if reply.close or draining():
            # Shutting down: this response is the connection's last.
            headers.append(("Connection", "close"))
        reason = http.HTTPStatus(reply.status).phrase
        await self.send(h11.Response(status_code=reply.status, headers=headers, reason=reason))
        if reply.body and not head:
            await self.send(h11.Data(data=reply.body))
        await self.send(h11.EndOfMessage())

    async def reject(self, error: h11.RemoteProtocolError) -> None:
        """Answer a malformed request with h11's suggested status, if a reply is still possible."""
        self.log.info("malformed request: %s", error)
        if self.machine.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = error.error_status_hint
        await self.respond(_text(status, f"{http.HTTPStatus(status).phrase.lower()}\n", close=True))

    async def send(self, event: h11.Event) -> None:
        data = self.machine.send(event)
        if data:
            await self.stream.send_all(data)
