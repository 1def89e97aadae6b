"""The ProxyGate: the one place that decides whose PROXY header to believe.

Every accepted connection, on every listener, passes :meth:`ProxyGate.admit` in its own
task. The gate resolves the listener's effective trusted networks (the listener's
``override_proxy_trusted_networks`` if set, else the server-wide
``proxy_trusted_networks``), then:

- from a trusted peer, reads exactly one PROXY header before anything is sent, under the
  listener's header timeout, and builds the context from it;
- from an untrusted peer, admits the connection at once, with no added delay, and rejects it
  the moment its first bytes turn out to be a PROXY header, which is never honoured.

``docs/gate.md`` has the full decision table.
"""

from __future__ import annotations

import ipaddress
import itertools
import warnings

import attrs
import trio

from mailedge.context import AddressSource, ConnectionContext, TLSTerminator
from mailedge.diagnosis import diagnose
from mailedge.events import (
    EventCounters,
    EventName,
    EventSink,
    GateEvent,
    GateReason,
    LogLimiter,
    escape_bytes,
    event_level,
    logger,
)
from mailedge.networks import normalize_ip
from mailedge.proxy import (
    Command,
    IncompleteHeaderError,
    InetAddress,
    IPAddress,
    NotProxyHeaderError,
    ProxyHeader,
    ProxyProtocolError,
    Sniff,
    parse_header,
    sniff,
)
from mailedge.settings import HeaderMode, NetworkListener, Settings
from mailedge.streams import PrefixedStream

__all__ = ["ProxyGate", "UntrustedHeaderError", "ProxyRejected"]

Endpoint = tuple[IPAddress | str, int]

# How much one receive may take while looking for a header. The parser rejects a v1 line
# at 107 bytes and a v2 header at the listener's cap, so the buffer never exceeds the cap
# plus one receive; whatever follows the header is handed on untouched.
RECEIVE_SIZE = 4096

# Parsed peer and local addresses, by their text: behind a proxy the same few addresses
# come back on every connection. Emptied when full, so direct clients cannot grow it.
IP_CACHE_SIZE = 4096


class ProxyRejected(Exception):
    """The gate refused a connection. The event has been logged and counted already.

    The caller closes the connection (``aclose_forcefully``); nothing is sent to the peer.
    """

    def __init__(self, event: GateEvent) -> None:
        super().__init__(event.message)
        self.event = event

    @property
    def reason(self) -> GateReason:
        return self.event.reason


class UntrustedHeaderError(trio.BrokenResourceError):
    """Raised from ``receive_some`` when an untrusted peer's first bytes are a PROXY header.

    It is a ``BrokenResourceError`` so that a protocol handler treats it like any broken
    connection; the event has been logged and counted when it is raised.
    """

    def __init__(self, event: GateEvent) -> None:
        super().__init__(event.message)
        self.event = event


@attrs.frozen
class _Connection:
    """What the gate knows about a connection before it has read anything."""

    listener: NetworkListener
    connection_id: int
    peer_ip: IPAddress
    peer_port: int
    local_ip: IPAddress
    local_port: int
    started: float


@attrs.define(repr=False)
class ProxyGate:
    """Admits connections for every listener, by the current settings.

    ``reload`` swaps in new settings atomically: connections that start the gate afterwards
    use them, and connections already past it keep the context they were given.
    """

    _settings: Settings
    _on_event: EventSink | None = attrs.field(default=None, kw_only=True)
    counters: EventCounters = attrs.field(factory=EventCounters, init=False)
    # Keeps a storm of one kind of event (a slowloris wave) from becoming a storm of lines.
    log_limiter: LogLimiter = attrs.field(factory=LogLimiter, kw_only=True)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _ips: dict[str, IPAddress] = attrs.field(factory=dict, init=False)

    def __repr__(self) -> str:
        return f"<ProxyGate listeners={len(self._settings.listeners)} {self.counters!r}>"

    @property
    def settings(self) -> Settings:
        return self._settings

    def reload(self, settings: Settings) -> None:
        """Use ``settings`` for every connection that reaches the gate from now on."""
        self._settings = settings

    async def admit(
        self,
        stream: trio.abc.Stream,
        *,
        listener: str,
        peer: Endpoint,
        local: Endpoint,
        deadline: trio.CancelScope | None = None,
    ) -> tuple[trio.abc.Stream, ConnectionContext]:
        """Run one accepted connection through the gate.

        Returns the stream the protocol should use (it serves any bytes read past the
        header first) and the connection's context. Raises :class:`ProxyRejected` when
        the connection must be closed; nothing has been sent to the peer then.

        The header is read under the listener's ``proxy_header_timeout``. By default the
        gate opens a cancel scope of its own for it, and a timeout is a ``ProxyRejected``.
        A caller that runs the whole connection under one cancel scope (the server does,
        to save a scope per connection) can pass it as ``deadline``: the gate then sets that
        scope's deadline for the header, and a timeout cancels the caller's scope instead,
        with the event logged and counted as usual. After a successful return the deadline
        is still the header's; the caller moves it on.
        """
        # Read the settings once: a reload mid-connection must not mix two configurations.
        settings = self._settings
        conf = settings.listener(listener)
        conn = _Connection(
            listener=conf,
            connection_id=next(self._ids),
            peer_ip=self._ip(peer[0]),
            peer_port=peer[1],
            local_ip=self._ip(local[0]),
            local_port=local[1],
            started=trio.current_time(),
        )
        trusted = conf.effective_proxy_trusted_networks(settings.system)
        if conn.peer_ip not in trusted:
            return self._admit_untrusted(stream, conn)
        # Everything read while looking for the header; quoted if the wait times out.
        buffer = bytearray()
        timeout_at = conn.started + conf.proxy_header_timeout
        if deadline is not None:
            deadline.deadline = timeout_at
            try:
                return await self._admit_trusted(stream, conn, buffer)
            except trio.Cancelled:
                # The caller's scope ends the connection; when the header's deadline was the
                # cause, the decision is logged and counted like any other.
                if deadline.cancel_called and trio.current_time() >= timeout_at:
                    self._reject_timeout(conn, buffer)
                raise
        # A bare scope, as trio.fail_after would make, minus its context-manager layers.
        with trio.CancelScope(deadline=timeout_at):
            return await self._admit_trusted(stream, conn, buffer)
        raise self._reject_timeout(conn, buffer)

    def _ip(self, address: IPAddress | str) -> IPAddress:
        if not isinstance(address, str):
            return normalize_ip(address)
        ip = self._ips.get(address)
        if ip is None:
            if len(self._ips) >= IP_CACHE_SIZE:
                self._ips.clear()
            ip = self._ips[address] = normalize_ip(ipaddress.ip_address(address))
        return ip

    # -- untrusted peers ------------------------------------------------------------------

    def _admit_untrusted(
        self, stream: trio.abc.Stream, conn: _Connection
    ) -> tuple[trio.abc.Stream, ConnectionContext]:
        # Served as is, at once: a server-first protocol greets without waiting. The first
        # bytes the client sends are checked for a PROXY header when they arrive.
        context = self._direct_context(conn)
        self._note(
            conn,
            EventName.DIRECT,
            GateReason.UNTRUSTED,
            "not a trusted proxy; served directly",
            client=(conn.peer_ip, conn.peer_port),
        )
        return _UntrustedGuardStream(stream, self, conn), context

    def _reject_untrusted_header(self, conn: _Connection, data: bytes | bytearray) -> GateEvent:
        return self._emit(
            conn,
            EventName.UNTRUSTED_HEADER,
            GateReason.UNTRUSTED_HEADER,
            _untrusted_advice(conn),
            first_bytes=data,
        )

    # -- trusted peers --------------------------------------------------------------------

    async def _admit_trusted(
        self, stream: trio.abc.Stream, conn: _Connection, buffer: bytearray
    ) -> tuple[trio.abc.Stream, ConnectionContext]:
        try:
            return await self._read_header(stream, conn, buffer)
        except trio.BrokenResourceError as exc:
            # A reset (RST) mid-header is a decision like any other: one event, counted.
            cause = exc.__cause__ or exc
            raise self._reject(
                conn,
                GateReason.RESET,
                f"the peer reset the connection after {len(buffer)} bytes: {cause}",
                buffer,
            ) from None

    async def _read_header(
        self, stream: trio.abc.Stream, conn: _Connection, buffer: bytearray
    ) -> tuple[trio.abc.Stream, ConnectionContext]:
        conf = conn.listener
        if conf.proxy_header_mode is HeaderMode.OPTIONAL and not (
            await self._optional_header_follows(stream, conn, buffer)
        ):
            context = self._direct_context(conn)
            self._note(
                conn,
                EventName.DIRECT,
                GateReason.NO_HEADER,
                "a trusted peer sent no PROXY header; served directly (optional mode)",
                client=(conn.peer_ip, conn.peer_port),
            )
            return PrefixedStream(stream, bytes(buffer)), context
        while True:
            try:
                result = parse_header(
                    buffer,
                    max_v2_length=conf.proxy_max_header_length,
                    allow_v1_mixed_family=conf.proxy_allow_v1_mixed_family,
                )
                if result is not None:
                    break
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data and buffer:
                    # The sans-IO parser cannot know that nothing more will come; we can.
                    raise IncompleteHeaderError(
                        f"the peer closed the connection after {len(buffer)} bytes of an "
                        "incomplete header"
                    )
            except NotProxyHeaderError:
                raise self._reject(
                    conn, GateReason.NOT_PROXY_HEADER, diagnose(buffer), buffer
                ) from None
            except ProxyProtocolError as exc:
                message = exc.message + _SETTING_HINTS.get(exc.reason, "")
                raise self._reject(conn, GateReason(exc.reason), message, buffer) from None
            if not data:
                raise self._reject_closed(conn)
            buffer += data
        header, consumed = result
        context = self._header_context(conn, header)
        if context.address_source is AddressSource.PROXY_LOCAL:
            self._note(conn, EventName.LOCAL, GateReason.LOCAL, "LOCAL header (proxy health check)")
        else:
            self._note(
                conn,
                EventName.ACCEPTED,
                GateReason.HEADER if context.client_known else GateReason.ADDRESS_UNKNOWN,
                f"PROXY v{header.version} header"
                + ("" if context.client_known else " without a client address"),
                client=(context.client_ip, context.client_port),
            )
        if consumed == len(buffer):
            return stream, context  # nothing read past the header: no wrapper needed
        return PrefixedStream(stream, bytes(buffer[consumed:])), context

    async def _optional_header_follows(
        self, stream: trio.abc.Stream, conn: _Connection, buffer: bytearray
    ) -> bool:
        """Optional mode: read until the first bytes tell whether a header is coming.

        For a server-first protocol the client may be waiting for our greeting, so silence
        for ``proxy_optional_wait`` means "no header". Client-first protocols always send.
        """
        conf = conn.listener
        if conf.protocol.server_first:
            with trio.move_on_after(conf.proxy_optional_wait):
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    raise self._reject_closed(conn)
                buffer += data
            if not buffer:
                return False
        while (kind := sniff(buffer)) is Sniff.NEED_MORE:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                if not buffer:
                    raise self._reject_closed(conn)
                return False
            buffer += data
        return kind is not Sniff.NOT_PROXY

    # -- contexts -------------------------------------------------------------------------

    @staticmethod
    def _direct_context(conn: _Connection) -> ConnectionContext:
        return ConnectionContext(
            connection_id=conn.connection_id,
            listener=conn.listener.name,
            protocol=conn.listener.protocol,
            client_ip=conn.peer_ip,
            client_port=conn.peer_port,
            server_ip=conn.local_ip,
            server_port=conn.local_port,
            peer_ip=conn.peer_ip,
            peer_port=conn.peer_port,
            local_ip=conn.local_ip,
            local_port=conn.local_port,
            proxied=False,
            address_source=AddressSource.SOCKET,
        )

    @staticmethod
    def _header_context(conn: _Connection, header: ProxyHeader) -> ConnectionContext:
        src, dst = header.source, header.destination
        if (
            header.command is Command.PROXY
            and isinstance(src, InetAddress)
            and isinstance(dst, InetAddress)
        ):
            source = AddressSource.HEADER
            client_ip, client_port, server_ip, server_port = src.ip, src.port, dst.ip, dst.port
        else:
            # LOCAL (the proxy's own health check) carries no client at all; v1 UNKNOWN and
            # v2 UNSPEC (or AF_UNIX, when allowed) carry a client we cannot name. Either way
            # the socket's endpoints stand in, and the context says so.
            source = (
                AddressSource.PROXY_LOCAL
                if header.command is Command.LOCAL
                else AddressSource.UNKNOWN
            )
            client_ip, client_port = conn.peer_ip, conn.peer_port
            server_ip, server_port = conn.local_ip, conn.local_port

        ssl = header.ssl
        tls = (ssl is not None and ssl.client_ssl) or (
            header.version == 1 and conn.listener.proxy_v1_implies_tls
        )
        alpn = header.alpn
        details = ssl if (tls and ssl is not None) else None
        return ConnectionContext(
            connection_id=conn.connection_id,
            listener=conn.listener.name,
            protocol=conn.listener.protocol,
            client_ip=client_ip,
            client_port=client_port,
            server_ip=server_ip,
            server_port=server_port,
            peer_ip=conn.peer_ip,
            peer_port=conn.peer_port,
            local_ip=conn.local_ip,
            local_port=conn.local_port,
            proxied=True,
            address_source=source,
            tls=tls,
            tls_terminated_by=TLSTerminator.PROXY if tls else None,
            tls_version=details.version if details else None,
            tls_cipher=details.cipher if details else None,
            sni=header.authority,
            alpn=None if alpn is None else alpn.decode("ascii", "backslashreplace"),
            client_cert_cn=details.cn if details else None,
            client_cert_verified=bool(details and details.verified),
            header=header,
        )

    # -- events ---------------------------------------------------------------------------

    def _emit(
        self,
        conn: _Connection,
        name: EventName,
        reason: GateReason,
        message: str,
        *,
        client: tuple[IPAddress, int] | None = None,
        first_bytes: bytes | bytearray | None = None,
    ) -> GateEvent:
        now = trio.current_time()
        event = GateEvent(
            name=name,
            listener=conn.listener.name,
            connection_id=conn.connection_id,
            peer_ip=conn.peer_ip,
            peer_port=conn.peer_port,
            reason=reason,
            message=message,
            elapsed=now - conn.started,
            client_ip=client[0] if client else None,
            client_port=client[1] if client else None,
            first_bytes=None if first_bytes is None else escape_bytes(first_bytes),
        )
        self.counters.add(event)
        self.log_limiter.log(event, now)
        if self._on_event is not None:
            self._on_event(event)
        return event

    def _note(
        self,
        conn: _Connection,
        name: EventName,
        reason: GateReason,
        message: str,
        *,
        client: tuple[IPAddress, int] | None = None,
    ) -> None:
        """A routine decision: counted always, built into an event only if someone looks."""
        if self._on_event is None and not logger.isEnabledFor(event_level(name, reason)):
            self.counters.count(conn.listener.name, name, reason)
        else:
            self._emit(conn, name, reason, message, client=client)

    def _reject(
        self, conn: _Connection, reason: GateReason, message: str, data: bytes | bytearray
    ) -> ProxyRejected:
        return ProxyRejected(
            self._emit(conn, EventName.REJECTED, reason, message, first_bytes=data or None)
        )

    def _reject_closed(self, conn: _Connection) -> ProxyRejected:
        """The peer closed before sending a byte (mid-header is the codec's "truncated")."""
        return self._reject(
            conn,
            GateReason.CLOSED,
            "the peer closed the connection before sending anything: a TCP health check "
            "without a PROXY header? (HAProxy: add check-send-proxy when checks use "
            "'check port' or 'addr')",
            b"",
        )

    def _reject_timeout(self, conn: _Connection, data: bytearray) -> ProxyRejected:
        conf = conn.listener
        within = f"within {conf.proxy_header_timeout:g} s"
        if data:
            message = (
                f"only {len(data)} bytes of a PROXY header arrived {within}: "
                "the proxy stalled, or a client is dribbling a header"
            )
        else:
            message = (
                f"nothing arrived {within}. Is the proxy configured to send a PROXY header "
                "(HAProxy: send-proxy or send-proxy-v2 on the server line; nginx: "
                "proxy_protocol on)? A client connecting directly from a trusted address "
                "waits for a greeting that is never sent before the header"
            )
            if conf.protocol.server_first and conf.proxy_header_mode is HeaderMode.REQUIRED:
                message += '; proxyHeaderMode = "optional" serves such clients'
        return ProxyRejected(
            self._emit(
                conn, EventName.TIMEOUT, GateReason.TIMEOUT, message, first_bytes=data or None
            )
        )


class _UntrustedGuardStream(PrefixedStream):
    """Passes an untrusted connection through, but never lets a PROXY header reach it.

    The check runs on the first ``receive_some``, so nothing waits for it: a server-first
    protocol sends its greeting at once, and the client's first bytes are inspected when
    the protocol reads them.
    """

    def __init__(self, transport_stream: trio.abc.Stream, gate: ProxyGate, conn: _Connection):
        super().__init__(transport_stream)
        self._guard: tuple[ProxyGate, _Connection] | None = (gate, conn)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._guard is not None:
            gate, conn = self._guard
            first = bytearray()
            # At most 12 bytes decide it; sniff never asks for more than the v2 signature.
            while (kind := sniff(first)) is Sniff.NEED_MORE:
                data = await self.transport_stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                first += data
            if kind is Sniff.V1 or kind is Sniff.V2:
                raise UntrustedHeaderError(gate._reject_untrusted_header(conn, first))
            self._guard = None
            self._prefix = memoryview(bytes(first))
            if not first:
                return b""
        return await super().receive_some(max_bytes)


# -- diagnosis ------------------------------------------------------------------------------

# The codec names its own parameters; an operator needs the listener setting behind them.
_SETTING_HINTS = {
    "too_long": " (the listener's limit is proxyMaxHeaderLength)",
    "family_not_allowed": " (nginx's mixed-family v1 line needs proxyAllowV1MixedFamily = true)",
}


def _untrusted_advice(conn: _Connection) -> str:
    """Why a header from this peer was refused, and exactly what to add if it is the proxy."""
    peer = str(conn.peer_ip)
    name = conn.listener.name
    override = conn.listener.override_proxy_trusted_networks
    head = f"a PROXY header arrived from {peer}, which is not trusted on listener {name!r}"
    if override is not None and not override:
        return (
            f"{head}: the PROXY protocol is off on this listener "
            "(overrideProxyTrustedNetworks = []). If this peer is your proxy, list "
            f"'{peer}' in the listener's overrideProxyTrustedNetworks; the header was not honoured"
        )
    if override is not None:
        return (
            f"{head}. If this peer is your proxy, add '{peer}' to the listener's "
            "overrideProxyTrustedNetworks (it replaces proxyTrustedNetworks on this listener); "
            "the header was not honoured"
        )
    return (
        f"{head}. If this peer is your proxy, add '{peer}' to proxyTrustedNetworks in "
        "SystemSettings (or to the listener's overrideProxyTrustedNetworks); "
        "the header was not honoured"
    )


def __getattr__(name: str) -> type[UntrustedHeaderError]:
    """``ProxyHeaderRejected``, the old name of :class:`UntrustedHeaderError`, for one release."""
    if name == "ProxyHeaderRejected":
        warnings.warn(
            "mailedge.gate.ProxyHeaderRejected is now UntrustedHeaderError",
            DeprecationWarning,
            stacklevel=2,
        )
        return UntrustedHeaderError
    raise AttributeError(f"module 'mailedge.gate' has no attribute {name!r}")
