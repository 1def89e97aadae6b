"""An example HTTP handler: who the gate says you are, a health check, and gate metrics.

Routes (GET and HEAD, except where noted):

* ``/whoami``: the connection context as JSON, exactly as the gate established it;
* ``/healthz``: ``ok``;
* ``/metrics``: the gate's decision counters in the Prometheus text format;
* ``/admin/bans``: the auto-ban list as JSON, and ``POST /admin/bans/lift?ip=ADDRESS`` to lift
  one. The admin routes answer only direct connections from a loopback address (not proxied,
  whatever a proxy's header says), with a loopback ``Host`` (parsed strictly as
  ``uri-host[:port]``) and no ``Origin`` (so a web page cannot drive them from a browser);
  anything else gets 403.

HTTP/1.1 is spoken with h11 (sans-IO) over the trio stream the server layer hands over, with
keep-alive and a bounded request head. ``X-Forwarded-For`` and its relatives are never read:
the client's address is what the PROXY gate established, from a trusted peer's header or the
socket itself, and a header any client can type proves nothing.
"""

from __future__ import annotations

import email.utils
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
from mailedge.hooks.autoban import AutoBan
from mailedge.server import awaiting_command, draining

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
    registry: CollectorRegistry = attrs.field(init=False, repr=False)
    # What /metrics serves when not this process's own registry: with worker processes, the
    # whole server's (prometheus-client's multiprocess collector; examples/mailserver.py).
    exposed: CollectorRegistry | None = attrs.field(default=None, kw_only=True, repr=False)

    def __attrs_post_init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(GateDecisionsCollector(self.counters_source))

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


def _text(status: int, text: str, *, headers: Headers = (), close: bool = False) -> _Reply:
    return _Reply(status, "text/plain; charset=utf-8", text.encode(), headers, close)


def _json(status: int, value: object) -> _Reply:
    return _Reply(status, "application/json", (json.dumps(value, indent=2) + "\n").encode())


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _admin_refusal(context: ConnectionContext, request: h11.Request) -> str | None:
    """Why this request may not use the admin routes, or None when it may."""
    if context.proxied or not context.client_known:
        # A proxy's header names some client; it is not proof of being on this host.
        return "proxied"
    if not context.client_ip.is_loopback:
        return "not loopback"
    if _header(request, b"origin") is not None:
        # Browsers send Origin with cross-site POSTs; curl and scripts do not.
        return "has an Origin header"
    hosts = [value for key, value in request.headers if key == b"host"]
    if len(hosts) != 1:
        # RFC 9112 3.2: a request with no Host, or more than one, is a client error.
        return f"{len(hosts)} Host headers"
    host = hosts[0].decode("latin-1")
    if not _is_loopback_host(host):
        return f"Host {host!r} is not a loopback name"
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
        reply = await self.route(request)
        if self.machine.they_are_waiting_for_100_continue:
            # We never want a body; refuse it by answering now and closing.
            reply = attrs.evolve(reply, close=True)
        elif not await self.drain_body():
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

    async def drain_body(self) -> bool:
        """Read and drop the request body; False if it exceeds ``max_request_size``."""
        size = 0
        while True:
            event = await self.next_event()
            if isinstance(event, h11.EndOfMessage):
                return True
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.handler.max_request_size:
                    return False

    async def route(self, request: h11.Request) -> _Reply:
        if request.target.startswith(_ADMIN_PREFIX):
            return await self.admin(request)
        if request.method not in _ALLOWED_METHODS:
            return _text(405, "method not allowed\n", headers=[("Allow", "GET, HEAD")])
        path = request.target.partition(b"?")[0]
        if path == b"/whoami":
            # Deliberately built from the context alone: request headers such as
            # X-Forwarded-For are client-controlled and never consulted.
            body = json.dumps(context_to_json(self.context), indent=2) + "\n"
            return _Reply(200, "application/json", body.encode())
        if path == b"/healthz":
            return _text(200, "ok")
        if path == b"/metrics":
            registry = self.handler.exposed or self.handler.registry
            return _Reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
        return _text(404, "not found\n")

    async def admin(self, request: h11.Request) -> _Reply:
        """The ban admin routes: loopback, direct connections only."""
        refusal = _admin_refusal(self.context, request)
        if refusal is not None:
            self.log.warning("admin request refused: %s", refusal)
            return _text(403, "forbidden\n")
        path, _, query = request.target.partition(b"?")
        autoban = self.handler.autoban
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
