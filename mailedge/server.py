"""The server layer: one nursery task per listener, every connection through the gate.

Written in the style of ``trio.serve_listeners``: ``serve`` binds every listener, reports
the bound addresses through ``task_status.started``, and runs until cancelled or shut down.
Each accepted connection gets its own task, in which the slow work happens: the PROXY
header under its timeout, the connection limits and the ``on_connect`` hook, the TLS
handshake under its own timeout, then the protocol handler. The accept loop only accepts.

Every session with a known client is listed in :class:`OpenSessions`, by that client, so a
policy can end a client's sessions on every listener at once (a ban does, through
``Hooks.on_start``): the handler's next read raises :class:`SessionEnded`, and it says goodbye.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import ipaddress
import logging
import math
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from functools import partial

import attrs
import trio

from mailedge.config import ConfigError, listener_changes, load_document, rebind_problem
from mailedge.context import ConnectionContext, TLSTerminator
from mailedge.gate import ProxyGate, ProxyRejected
from mailedge.limits import ConnectionLimits, SharedCounts, shared_key
from mailedge.names import ENHANCED_STATUS
from mailedge.networks import format_endpoint
from mailedge.policy import Action, BaseHooks, Hooks, Verdict
from mailedge.sessions import LiveSession, OpenSessions
from mailedge.settings import ListenerProtocol, NetworkListener, Settings
from mailedge.shutdown import DRAIN, Drain
from mailedge.spread import turn_of
from mailedge.streams import IdleTimeoutStream, SessionEnded
from mailedge.tls import starttls

__all__ = [
    "BindError",
    "Handler",
    "Refusal",
    "Server",
    "refusal",
    "serve",
]

logger = logging.getLogger("mailedge.server")

Handler = Callable[[trio.abc.Stream, ConnectionContext], Awaitable[None]]
Endpoint = tuple[str, int]

# After SIGTERM, sessions get this long to finish (an SMTP DATA in flight, say) before they
# are cancelled; long enough for a large message on a slow link, short enough for a deploy.
DEFAULT_DRAIN_TIMEOUT = 30.0

# Connections still in the kernel's queue when we fall behind; 128 is Linux's historic
# somaxconn and plenty for a mail server's bursts.
LISTEN_BACKLOG = 128

# accept() errors that concern only the connection being accepted (it was aborted, or its
# route vanished, before we took it): Linux's accept(2) says to treat them like EAGAIN.
_ACCEPT_SKIP = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "EPERM",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)
# Out of descriptors or kernel memory: the listener is fine, it must wait for sessions to end.
_ACCEPT_CAPACITY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# The pause after such a failure: retrying at once would spin; 100 ms lets sessions close
# while the kernel's backlog holds the new arrivals.
ACCEPT_PAUSE = 0.1

# A refusal is one short line; a peer that will not take it within a second gets closed.
REFUSAL_SEND_TIMEOUT = 1.0

# The log limiter's event name for the server's refusals (its keys are listener, event, reason).
REFUSED_EVENT = "connect.refused"

# The on_connect hook is a store lookup or two; 10 s covers a slow shared store and bounds a
# hung one, which would otherwise hold a connection slot with nothing said to the client.
ON_CONNECT_TIMEOUT = 10.0

# What the client is told when on_connect fails (raises or times out). Like a Postfix policy
# service that fails, it is a temporary refusal: mail is retried, and nothing is let in that a
# working hook might have refused.
HOOK_FAILURE_REASON = "Service temporarily unavailable, try again later"
HOOK_FAILURE_STATUS = "4.3.0"

# A refusal's text goes into a reply line; a hook's reason must not be able to end the line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def refusal(
    protocol: ListenerProtocol,
    text: str,
    *,
    action: Action = Action.TEMPFAIL,
    status: str | None = None,
) -> bytes:
    """The protocol's way of saying "not now" (TEMPFAIL) or "no" (REJECT) before closing.

    SMTP: ``421 4.7.0`` or ``554 5.7.1`` (``status`` replaces the enhanced code when its class
    matches); IMAP: ``* BYE`` either way; HTTP: ``503`` with ``Retry-After`` or ``403``.
    """
    if action is Action.ACCEPT:
        raise ValueError("an accepting verdict is not a refusal")
    reject = action is Action.REJECT
    text = _CONTROL.sub(" ", text).strip() or ("Refused" if reject else "Try again later")
    if protocol is ListenerProtocol.SMTP:
        code, default = ("554", "5.7.1") if reject else ("421", "4.7.0")
        valid = status is not None and ENHANCED_STATUS.fullmatch(status) and status[0] == code[0]
        return f"{code} {status if valid else default} {text}\r\n".encode()
    if protocol is ListenerProtocol.IMAP:
        return f"* BYE {text}\r\n".encode()
    body = f"{text}\n".encode()
    head = (
        b"HTTP/1.1 403 Forbidden\r\n"
        if reject
        else b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n"
    )
    return (
        head + b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class Refusal(enum.StrEnum):
    """Why the server refused a connection after accepting it; ``Server.refused`` counts them."""

    # The listener had maxConnections open.
    LISTENER_FULL = "listener_full"
    # The client had maxConnectionsPerIp open on the listener.
    CLIENT_FULL = "client_full"
    # An on_connect hook refused (a ban, a rate limit) or failed.
    ON_CONNECT = "on_connect"


class BindError(OSError):
    """A listener could not bind one of its addresses.

    ``listener`` is the listener's name, ``address`` the ``host:port`` it asked for, and
    ``error`` the operating system's error (its ``errno`` is this exception's too).
    """

    def __init__(self, listener: str, address: str, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error))
        self.listener = listener
        self.address = address
        self.error = error

    def __str__(self) -> str:
        return f"listener {self.listener!r} cannot bind {self.address}: {self.strerror}"


Handlers = Mapping[ListenerProtocol, Handler] | Mapping[str, Handler]


def _handlers(handlers: Handlers) -> dict[ListenerProtocol, Handler]:
    """Handlers keyed by protocol, written as the enum or as its text ("smtp")."""
    return {ListenerProtocol(protocol): handler for protocol, handler in handlers.items()}


def _endpoint(sockaddr: object) -> Endpoint:
    assert isinstance(sockaddr, tuple)
    return str(sockaddr[0]), int(sockaddr[1])


@attrs.define(repr=False)
class Server:
    """A running set of listeners sharing one gate. ``serve`` makes one and runs it."""

    settings: Settings
    handlers: dict[ListenerProtocol, Handler] = attrs.field(converter=_handlers)
    ssl_context: ssl.SSLContext | None = None
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    gate: ProxyGate = attrs.field()
    limits: ConnectionLimits = attrs.field(factory=ConnectionLimits)
    # Policy: on_connect runs here, after the gate and the limits; the handlers run the rest.
    hooks: Hooks = attrs.field(factory=BaseHooks)
    # Listening sockets bound elsewhere (a parent process, see mailedge.workers), by listener
    # name; a listener named here is served on them instead of binding its addresses.
    sockets: Mapping[str, Sequence[socket.socket]] = attrs.field(factory=dict)
    # Per-IP connection counts shared with other processes (a RedisStore); the local count
    # is kept as well, and decides alone when the shared one is unavailable.
    shared_counts: SharedCounts | None = None
    # Bound addresses by listener name, filled in once every listener is bound.
    addresses: dict[str, list[Endpoint]] = attrs.field(factory=dict, init=False)
    # The open sessions by client, which the hooks get through on_start to end them.
    sessions: OpenSessions = attrs.field(init=False)
    # Connections refused after accept, by (listener, Refusal), every one counted; their log
    # lines go through the gate's log limiter, so a client reconnecting in a loop cannot
    # flood the log.
    refused: collections.Counter[tuple[str, str]] = attrs.field(
        factory=collections.Counter, init=False
    )
    _accepting: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _drain: Drain = attrs.field(factory=Drain, init=False)
    _sessions: trio.Nursery | None = attrs.field(default=None, init=False)
    _stopped: trio.Event = attrs.field(factory=trio.Event, init=False)

    @gate.default
    def _default_gate(self) -> ProxyGate:
        return ProxyGate(self.settings)

    @sessions.default
    def _open_sessions(self) -> OpenSessions:
        return OpenSessions(nat64_prefixes=lambda: self.gate.settings.system.nat64_prefixes)

    def __attrs_post_init__(self) -> None:
        for conf in self.settings.listeners:
            if conf.protocol not in self.handlers:
                raise ValueError(f"listener {conf.name!r}: no handler for {conf.protocol}")
            if conf.tls and self.ssl_context is None:
                raise ValueError(f"listener {conf.name!r} has tls = true but no ssl_context")

    def __repr__(self) -> str:
        return f"<Server listeners={list(self.addresses)} {self.limits!r}>"

    def reload(self, settings: Settings) -> None:
        """Apply new settings to new connections. Listeners are not rebound."""
        problem = rebind_problem(self.settings, settings)
        if problem is not None:
            raise ValueError(
                f"a reload cannot add, remove or rebind listeners ({problem}); restart instead"
            )
        for change in listener_changes(self.settings, settings):
            logger.info("reload: %s", change)
        self.settings = settings
        self.gate.reload(settings)

    def reload_from(
        self, path: str | os.PathLike[str], *, extra_sections: Collection[str] = ()
    ) -> bool:
        """Reload from a config file; an invalid file keeps the old settings and logs why.

        ``extra_sections`` names the application's own tables in the file (see
        :func:`mailedge.config.load_document`); they are allowed, and not applied here.
        """
        try:
            self.reload(load_document(path, extra_sections=extra_sections).settings)
        except (ConfigError, ValueError, OSError) as exc:
            logger.error(  # noqa: TRY400 - the message is the whole story; no traceback
                "reload of %s failed, keeping the running settings: %s", path, exc
            )
            return False
        logger.info("reloaded settings from %s", path)
        return True

    @property
    def stopping(self) -> bool:
        """True once :meth:`shutdown` (or a cancellation) has stopped the accepting."""
        return self._accepting.cancel_called

    def shutdown(self) -> None:
        """Stop accepting; idle sessions are told goodbye, the others get ``drain_timeout``."""
        self._accepting.cancel()

    def close_now(self) -> None:
        """Cancel every open session at once: the second Ctrl-C of a shutdown."""
        self._accepting.cancel()
        if self._sessions is not None:
            count = len(self._sessions.child_tasks)
            logger.warning("closing %d open session(s) now, without waiting", count)
            self._sessions.cancel_scope.cancel()

    async def wait_stopped(self) -> None:
        """Return once :meth:`run` has ended, every session closed."""
        await self._stopped.wait()

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            self._stopped.set()

    async def _bind(self) -> list[tuple[NetworkListener, list[trio.SocketListener]]]:
        """Every listener's sockets, or a :class:`BindError` with none left open."""
        bound: list[tuple[NetworkListener, list[trio.SocketListener]]] = []
        try:
            for conf in self.settings.listeners:
                sockets: list[trio.SocketListener] = []
                bound.append((conf, sockets))
                if conf.name in self.sockets:
                    sockets += [
                        trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                        for sock in self.sockets[conf.name]
                    ]
                    self.addresses[conf.name] = [_endpoint(s.socket.getsockname()) for s in sockets]
                    continue
                for bind in conf.bind:
                    try:
                        sockets += await trio.open_tcp_listeners(
                            bind.port, host=str(bind.host), backlog=LISTEN_BACKLOG
                        )
                    except OSError as exc:
                        address = format_endpoint(str(bind.host), bind.port)
                        raise BindError(conf.name, address, exc) from exc
                self.addresses[conf.name] = [_endpoint(s.socket.getsockname()) for s in sockets]
        except BaseException:
            for _, sockets in bound:
                for listener in sockets:
                    await trio.aclose_forcefully(listener)
            raise
        return bound

    async def _run(self, task_status: trio.TaskStatus[Server]) -> None:
        bound = await self._bind()
        DRAIN.set(self._drain)
        self.hooks.on_start(self.sessions)
        async with trio.open_nursery() as sessions:
            self._sessions = sessions
            with self._accepting:
                async with trio.open_nursery() as accepting:
                    for conf, sockets in bound:
                        accepting.start_soon(self._accept_loop, conf.name, sockets, sessions)
                    for name, endpoints in self.addresses.items():
                        logger.info("listener %s on %s", name, ", ".join(map(_show, endpoints)))
                    task_status.started(self)
            # Accepting has stopped (shutdown, or our caller's cancellation): drain.
            self._begin_drain(len(sessions.child_tasks))
            sessions.cancel_scope.deadline = min(
                sessions.cancel_scope.deadline, trio.current_time() + self.drain_timeout
            )
        logger.info("stopped")

    def _begin_drain(self, open_sessions: int) -> None:
        """End the idle sessions' waits, and say how long the others have."""
        self._drain.stopping = True
        idle = len(self._drain.idle)
        for scope in self._drain.idle:
            scope.cancel()
        busy = open_sessions - idle
        if idle:
            logger.info("ending %d idle session(s) with the protocol's goodbye", idle)
        if busy > 0:
            until = time.strftime("%H:%M:%S", time.localtime(time.time() + self.drain_timeout))
            logger.info(
                "draining %d session(s) until %s (%g s); a second signal closes them now",
                busy,
                until,
                self.drain_timeout,
            )

    async def _accept_loop(
        self, name: str, sockets: list[trio.SocketListener], sessions: trio.Nursery
    ) -> None:
        given = self.sockets.get(name, ())
        async with trio.open_nursery() as nursery:
            for index, listener in enumerate(sockets):
                # A socket shared with other worker processes: they take turns (mailedge.spread).
                turn = turn_of(given[index]) if given else None
                accept = (
                    partial(turn.accept, given[index])
                    if turn is not None
                    else listener.socket.accept
                )
                nursery.start_soon(self._accept, name, listener, sessions, accept)

    async def _accept(
        self,
        name: str,
        listener: trio.SocketListener,
        sessions: trio.Nursery,
        accept: Callable[[], Awaitable[tuple[trio.socket.SocketType, object]]],
    ) -> None:
        """Accept and hand over, as ``trio.serve_listeners`` does, and nothing more.

        Written out rather than delegated so that each connection is closed once, by its own
        task, and its peer address comes with ``accept()`` instead of a ``getpeername`` call.
        """
        bound = listener.socket.getsockname()
        # A listener on one address always answers from it; only a wildcard must ask.
        local = None if ipaddress.ip_address(bound[0]).is_unspecified else _endpoint(bound)
        async with listener:
            while True:
                try:
                    sock, peer = await accept()
                except OSError as exc:
                    if exc.errno in _ACCEPT_SKIP:
                        continue
                    if exc.errno not in _ACCEPT_CAPACITY:
                        raise
                    logger.error(  # noqa: TRY400 - the errno says it all; no traceback
                        "listener %s: accept failed (%s); pausing %g s for connections to end",
                        name,
                        os.strerror(exc.errno),
                        ACCEPT_PAUSE,
                    )
                    await trio.sleep(ACCEPT_PAUSE)
                    continue
                sessions.start_soon(self._connection, name, trio.SocketStream(sock), peer, local)

    async def _connection(
        self, name: str, stream: trio.SocketStream, sockaddr: object, local: Endpoint | None
    ) -> None:
        try:
            peer = _endpoint(sockaddr)
            conf = self.gate.settings.listener(name)
            if not self.limits.take_listener_slot(name, conf.max_connections):
                self._log_refusal(
                    name,
                    Refusal.LISTENER_FULL,
                    "listener %s: %d connections open, refusing %s",
                    name,
                    conf.max_connections,
                    _show(peer),
                )
                await _refuse(stream, conf.protocol, "Too many connections, try again later")
                return
            try:
                if local is None:
                    local = _endpoint(stream.socket.getsockname())
                await self._session(conf, stream, peer, local)
            finally:
                self.limits.release_listener_slot(name)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # A reset during the gate or a refusal, or before we could ask who the peer was.
            logger.info("listener %s: connection lost before its session: %s", name, exc)
        except Exception:
            # Whatever one connection does, the listener keeps serving the others.
            logger.exception("listener %s: connection failed", name)
        finally:
            # The forceful close, done directly: for a SocketStream, aclose_forcefully is
            # this same socket.close() wrapped in a cancelled scope and a checkpoint, which
            # a task about to end has no use for and which cost 200 us per connection here.
            stream.socket.close()

    async def _session(
        self, conf: NetworkListener, tcp: trio.SocketStream, peer: Endpoint, local: Endpoint
    ) -> None:
        # One cancel scope carries the connection's deadlines: the gate sets the header's on
        # it, and the handler's stream keeps the idle one on it. Each scope saved this way
        # is about 20 us of every connection's CPU on a small machine.
        context: ConnectionContext | None = None
        with trio.CancelScope() as deadline:
            try:
                stream, context = await self.gate.admit(
                    tcp, listener=conf.name, peer=peer, local=local, deadline=deadline
                )
            except ProxyRejected:
                return  # the gate has logged and counted it
            deadline.deadline = math.inf  # the hook and the handshake have their own
            client = context.client_ip
            # Read once, so that a reload between take and release cannot change the key.
            nat64 = self.gate.settings.system.nat64_prefixes
            held = self.limits.take_client_slot(
                conf.name, client, conf.max_connections_per_ip, nat64
            )
            shared: str | None = None
            if held and self.shared_counts is not None and context.client_known:
                # The local count is never above the shared one: only a free local slot asks.
                key = shared_key(conf.name, client, nat64)
                answer = await self.shared_counts.take_connection(key, conf.max_connections_per_ip)
                if answer is False:
                    self.limits.release_client_slot(conf.name, client, nat64)
                    held = False
                elif answer is not None:
                    shared = answer
            # A LOCAL or UNKNOWN header names no client; the proxy's own checks are not limited.
            if not held and context.client_known:
                self._log_refusal(
                    conf.name,
                    Refusal.CLIENT_FULL,
                    "listener %s: %d connections open from %s, refusing %r",
                    conf.name,
                    conf.max_connections_per_ip,
                    client,
                    context,
                )
                await _refuse(stream, conf.protocol, "Too many connections from your address")
                return
            live: LiveSession | None = None
            if context.client_known:
                live = LiveSession(deadline)
                self.sessions.add(client, live)
            try:
                await self._serve(conf, stream, context, deadline, live)
            finally:
                if held:
                    self.limits.release_client_slot(conf.name, client, nat64)
                if shared is not None:
                    assert self.shared_counts is not None
                    self.shared_counts.release_connection(
                        shared_key(conf.name, client, nat64), shared
                    )
                if live is not None:
                    self.sessions.discard(client, live)
        # Cancelled by its own deadline: a header the gate has reported, a peer that stopped
        # reading what the handler sent, or a session ended that did not finish in time.
        if deadline.cancelled_caught and context is not None:
            if live is not None and live.ended is not None:
                logger.info("%r: ended (%s), cancelled after the grace", context, live.ended)
            else:
                logger.info("%r: timed out (the peer stopped reading)", context)

    async def _serve(
        self,
        conf: NetworkListener,
        stream: trio.abc.Stream,
        context: ConnectionContext,
        session: trio.CancelScope,
        live: LiveSession | None,
    ) -> None:
        # Hooks that keep BaseHooks' on_connect accept everyone: skip the call and its timeout.
        if type(self.hooks).on_connect is not BaseHooks.on_connect:
            verdict = await self._on_connect(context)
            if not verdict.accepted:
                self._log_refusal(
                    conf.name,
                    Refusal.ON_CONNECT,
                    "listener %s: on_connect refused %r: %s %s",
                    conf.name,
                    context,
                    verdict.action.value,
                    verdict.reason,
                )
                await _refuse(
                    stream,
                    conf.protocol,
                    verdict.reason,
                    action=verdict.action,
                    status=verdict.status,
                )
                return
        if conf.tls:
            assert self.ssl_context is not None
            try:
                with trio.fail_after(conf.tls_handshake_timeout):
                    stream, context = await starttls(stream, context, self.ssl_context)
            except (trio.TooSlowError, trio.BrokenResourceError) as exc:
                # Behind a proxy, a failed handshake is usually a configuration mismatch.
                level = logging.WARNING if context.proxied else logging.INFO
                logger.log(level, "%r: %s", context, _handshake_failure(exc, context, conf))
                return
        if live is not None and live.ended is not None:
            # Ended before its handler ran: the server still speaks the protocol here.
            logger.info("%r: ended before its handler: %s", context, live.ended)
            await _refuse(stream, conf.protocol, live.ended)
            return
        handler_stream = IdleTimeoutStream(stream, conf.idle_timeout, session)
        if live is not None:
            live.stream = handler_stream
        try:
            await self.handlers[conf.protocol](handler_stream, context)
        except SessionEnded as exc:
            # The handler did not catch it: the connection is closed without a goodbye.
            logger.info("%r: ended: %s", context, exc.reason)
        except trio.TooSlowError:
            logger.info("%r: timed out", context)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.info("%r: connection lost: %s", context, exc)
        except Exception:
            # One session's bug must not take the listener down with it.
            logger.exception("%r: handler failed", context)

    def _log_refusal(self, listener: str, kind: Refusal, message: str, *args: object) -> None:
        """Count a refusal, and log its WARNING unless its kind is flooding the log."""
        self.refused[listener, kind] += 1
        if logger.isEnabledFor(logging.WARNING):
            self.gate.log_limiter.admit(
                (listener, REFUSED_EVENT, kind),
                logging.WARNING,
                trio.current_time(),
                lambda: logger.warning(message, *args),
                logger,
            )

    async def _on_connect(self, context: ConnectionContext) -> Verdict:
        try:
            with trio.fail_after(ON_CONNECT_TIMEOUT):
                return await self.hooks.on_connect(context)
        except trio.TooSlowError:
            # A timeout's traceback says nothing the message does not.
            logger.error(  # noqa: TRY400
                "%r: on_connect took over %g s; refusing", context, ON_CONNECT_TIMEOUT
            )
        except Exception:
            # trio.Cancelled is a BaseException and passes; a hook's bug refuses one client.
            logger.exception("%r: on_connect failed; refusing", context)
        return Verdict.tempfail(HOOK_FAILURE_REASON, status=HOOK_FAILURE_STATUS)


def _handshake_failure(exc: Exception, context: ConnectionContext, conf: NetworkListener) -> str:
    """Why an implicit-TLS handshake failed, in the operator's terms."""
    if context.tls_terminated_by is TLSTerminator.PROXY:
        return (
            "the TLS handshake failed, and the proxy's header says it already terminated the "
            "client's TLS: send the proxy's decrypted traffic to a listener without tls, or "
            "have the proxy re-encrypt (HAProxy: ssl on the server line)"
        )
    if isinstance(exc, trio.TooSlowError):
        return (
            f"no TLS handshake within {conf.tls_handshake_timeout:g} s on an implicit-TLS "
            "listener: the client sent nothing or plaintext (a proxy terminating TLS and "
            "forwarding plaintext, or a client that expects STARTTLS)"
        )
    return f"the TLS handshake failed: {exc.__cause__ or exc}"


def _show(endpoint: Endpoint) -> str:
    return format_endpoint(*endpoint)


async def _refuse(
    stream: trio.abc.Stream,
    protocol: ListenerProtocol,
    text: str,
    *,
    action: Action = Action.TEMPFAIL,
    status: str | None = None,
) -> None:
    # A client that is not reading must not hold the refusal up: best effort, briefly.
    with (
        trio.move_on_after(REFUSAL_SEND_TIMEOUT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(refusal(protocol, text, action=action, status=status))


async def serve(
    settings: Settings,
    handlers: Handlers,
    *,
    ssl_context: ssl.SSLContext | None = None,
    gate: ProxyGate | None = None,
    hooks: Hooks | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    sockets: Mapping[str, Sequence[socket.socket]] | None = None,
    shared_counts: SharedCounts | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every listener in ``settings`` until cancelled or ``Server.shutdown``.

    ``handlers`` maps each protocol (``"smtp"`` or ``ListenerProtocol.SMTP``) to an async
    ``(stream, context)`` callable. ``hooks``
    (for instance a :class:`~mailedge.policy.HookChain`) gets ``on_connect`` for every
    connection the gate admits; a refusal is sent in the protocol's words and the connection
    closed. With ``nursery.start(serve, ...)`` the caller gets the running :class:`Server`,
    whose ``addresses`` hold the bound endpoints (so tests can bind port 0).

    ``sockets`` maps listener names to listening sockets bound elsewhere (by a parent
    process: :mod:`mailedge.workers`), served instead of binding those listeners' addresses.
    ``shared_counts`` (a :class:`~mailedge.hooks.redis.RedisStore`) counts each client's open
    connections across processes for ``maxConnectionsPerIp``.
    """
    server = Server(
        settings=settings,
        handlers=handlers,
        ssl_context=ssl_context,
        drain_timeout=drain_timeout,
        gate=gate if gate is not None else ProxyGate(settings),
        hooks=hooks if hooks is not None else BaseHooks(),
        sockets=sockets if sockets is not None else {},
        shared_counts=shared_counts,
    )
    await server.run(task_status=task_status)


async def handle_signals(
    server: Server,
    config_path: str | os.PathLike[str] | None,
    *,
    extra_sections: Collection[str] = (),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """SIGHUP reloads ``config_path``; SIGTERM and SIGINT shut the server down gracefully.

    A second SIGTERM or SIGINT closes the sessions still draining at once. Returns when the
    server has stopped. With ``nursery.start``, it returns once the signals are caught, so
    that "ready" is printed only when a signal can no longer kill the process.
    """
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async with trio.open_nursery() as nursery:

            async def until_stopped() -> None:
                await server.wait_stopped()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_stopped)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if config_path is None:
                        logger.warning("SIGHUP ignored: running on the embedded default settings")
                    else:
                        server.reload_from(config_path, extra_sections=extra_sections)
                elif not server.stopping:
                    logger.info("%s: no new connections; draining open sessions", name)
                    server.shutdown()
                else:
                    logger.warning("%s again: not waiting for the drain", name)
                    server.close_now()
