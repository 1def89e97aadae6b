"""The gate's events: one structured record per decision, logged and counted.

Every event names the peer, the listener and the reason, so an operator reading one line
knows which connection it was, which listener took it, and what to change.
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Callable, Iterator

import attrs

from mailedge.networks import format_endpoint
from mailedge.proxy import IPAddress

__all__ = [
    "EventCounters",
    "EventName",
    "GateEvent",
    "GateReason",
    "LogLimiter",
    "escape_bytes",
    "event_level",
    "logger",
]

logger = logging.getLogger("mailedge.gate")


# How much of a connection's first bytes an event quotes: enough to recognise a protocol
# or a broken header, not enough to copy a client's mail into the logs.
FIRST_BYTES_QUOTED = 48


class EventName(enum.StrEnum):
    """The stable event names; dashboards and alerts match on these."""

    # A trusted peer's valid PROXY header: the client is the header's source.
    ACCEPTED = "proxy.accepted"
    # A trusted peer's LOCAL header (a health check): served, never warned about.
    LOCAL = "proxy.local"
    # Served without a header: an untrusted peer, or a trusted one in optional mode.
    DIRECT = "proxy.direct"
    # A trusted peer sent something that is not a valid header, or closed mid-header.
    REJECTED = "proxy.rejected"
    # A peer outside the trusted networks sent a PROXY header. Never honoured.
    UNTRUSTED_HEADER = "proxy.untrusted_header"
    # A trusted peer sent no complete header within the header timeout.
    TIMEOUT = "proxy.timeout"


class GateReason(enum.StrEnum):
    """The stable reasons an event gives; with the event name, what a counter is keyed on.

    A rejection for a malformed header carries the codec error's own ``reason`` (a test
    checks that each one is listed here).
    """

    # Accepted: a header with a client address.
    HEADER = "header"
    # Accepted: a header without usable addresses (v1 UNKNOWN, v2 UNSPEC or AF_UNIX).
    ADDRESS_UNKNOWN = "address_unknown"
    # Accepted: a LOCAL header, the proxy's own health check.
    LOCAL = "local"
    # Served directly: the peer is not a trusted proxy.
    UNTRUSTED = "untrusted"
    # Served directly: a trusted peer sent no header (optional mode).
    NO_HEADER = "no_header"
    # Refused: an untrusted peer's first bytes were a PROXY header.
    UNTRUSTED_HEADER = "untrusted_header"
    # Refused: no complete header within the header timeout.
    TIMEOUT = "timeout"
    # Refused: the peer closed before sending a byte (a TCP health check).
    CLOSED = "closed"
    # Refused: the peer reset the connection mid-header.
    RESET = "reset"
    # The codec's reasons (mailedge.proxy.errors), in its hierarchy's order.
    INVALID_HEADER = "invalid_header"
    NOT_PROXY_HEADER = "not_proxy_header"
    TRUNCATED = "truncated"
    TOO_LONG = "too_long"
    V1_SYNTAX = "v1_syntax"
    BAD_ADDRESS = "bad_address"
    BAD_PORT = "bad_port"
    BAD_VERSION = "bad_version"
    BAD_COMMAND = "bad_command"
    BAD_FAMILY = "bad_family"
    FAMILY_NOT_ALLOWED = "family_not_allowed"
    SHORT_ADDRESS_BLOCK = "short_address_block"
    BAD_TLV = "bad_tlv"
    BAD_SSL_TLV = "bad_ssl_tlv"
    CRC_MISMATCH = "crc_mismatch"


# Decisions that mean something is wrong; the rest are routine.
_LEVELS = {
    EventName.ACCEPTED: logging.DEBUG,
    EventName.LOCAL: logging.DEBUG,
    EventName.DIRECT: logging.DEBUG,
    EventName.REJECTED: logging.WARNING,
    EventName.UNTRUSTED_HEADER: logging.WARNING,
    EventName.TIMEOUT: logging.WARNING,
}


# A storm of one kind of event (thousands of stalled connections timing out together) would
# cost the server more in log lines than in connections, and flood the disk. Per listener,
# event and reason, this many lines are logged in each window; the rest are only counted.
LOG_BURST = 20
# Seconds per window: short enough that a new problem shows within seconds of the storm.
LOG_WINDOW = 10.0


def event_level(name: EventName, reason: str) -> int:
    """The level an event is logged at."""
    # A connect-and-close is what a TCP health check does; it is not worth a warning.
    if reason == GateReason.CLOSED:
        return logging.INFO
    return _LEVELS[name]


def _escape_table() -> dict[int, str]:
    table = {byte: f"\\x{byte:02x}" for byte in range(256) if not 0x20 <= byte < 0x7F}
    table.update({0x5C: "\\\\", 0x0D: "\\r", 0x0A: "\\n", 0x09: "\\t"})
    return table


# Byte (read as Latin-1) -> its escape; printable ASCII other than backslash stays itself.
_ESCAPES = _escape_table()


def escape_bytes(
    data: bytes | bytearray | memoryview, limit: int | None = FIRST_BYTES_QUOTED
) -> str:
    """Printable ASCII as itself; backslash, CR, LF and TAB escaped; other bytes ``\\xNN``.

    Cut at ``limit`` bytes (``None``: all of them), with ``...`` to show the cut.
    """
    head = bytes(data if limit is None else data[:limit])
    text = head.decode("latin-1").translate(_ESCAPES)
    return text + "..." if limit is not None and len(data) > limit else text


def _endpoint(ip: IPAddress | None, port: int | None) -> str | None:
    return None if ip is None or port is None else format_endpoint(ip, port)


@attrs.frozen(kw_only=True)
class GateEvent:
    """One gate decision about one connection."""

    name: EventName
    listener: str
    connection_id: int
    peer_ip: IPAddress
    peer_port: int
    # The stable machine-readable reason: "header", "local", a codec reason such as
    # "v1_syntax", or a gate reason such as "timeout" or "untrusted_header".
    reason: GateReason = attrs.field(converter=GateReason)
    # The human diagnosis: what happened and what to change.
    message: str
    # Seconds from the start of the gate's work on this connection to the decision.
    elapsed: float
    client_ip: IPAddress | None = None
    client_port: int | None = None
    # The first bytes the peer sent, escaped and truncated; only for rejections.
    first_bytes: str | None = None

    @property
    def peer(self) -> str:
        return _endpoint(self.peer_ip, self.peer_port) or ""

    @property
    def client(self) -> str | None:
        return _endpoint(self.client_ip, self.client_port)

    @property
    def level(self) -> int:
        return event_level(self.name, self.reason)

    def fields(self) -> dict[str, object]:
        """The event as flat fields, for structured log handlers (``extra``)."""
        return {
            "event": str(self.name),
            "listener": self.listener,
            "connection_id": self.connection_id,
            "peer": self.peer,
            "client": self.client,
            "reason": self.reason,
            "elapsed": round(self.elapsed, 6),
            "first_bytes": self.first_bytes,
        }

    def log(self) -> None:
        if not logger.isEnabledFor(self.level):
            return
        self.write_log()

    def write_log(self) -> None:
        """Log the event's line, unconditionally (``log`` checks the level first)."""
        text = f"{self.name} listener={self.listener} peer={self.peer}"
        if self.client is not None:
            text += f" client={self.client}"
        text += f" reason={self.reason}: {self.message}"
        if self.first_bytes is not None:
            text += f" (first bytes: '{self.first_bytes}')"
        logger.log(self.level, "%s", text, extra={"mailedge": self.fields()})


@attrs.define(repr=False)
class LogLimiter:
    """Logs at most ``burst`` events per listener, event and reason in each ``window``.

    DEBUG events are never held back: whoever turns DEBUG on wants every line. When a kind
    of event starts being held back, one line says so; the first line of the next window
    says how many were not logged. The counters and the event sink still see every event.
    """

    burst: int = LOG_BURST
    window: float = LOG_WINDOW
    # (listener, event, reason) -> [window start, events in it, events not logged in it]
    _windows: dict[tuple[str, str, str], list[float]] = attrs.field(factory=dict, init=False)

    def __repr__(self) -> str:
        return f"<LogLimiter {self.burst} per {self.window:g}s>"

    def log(self, event: GateEvent, now: float) -> None:
        """Log ``event`` at its level, unless its kind has had its share of this window."""
        level = event.level
        if not logger.isEnabledFor(level):
            return
        if level <= logging.DEBUG:
            event.write_log()
            return
        self.admit((event.listener, event.name.value, event.reason), level, now, event.write_log)

    def admit(
        self,
        key: tuple[str, str, str],
        level: int,
        now: float,
        write: Callable[[], None],
        log: logging.Logger = logger,
    ) -> bool:
        """Call ``write`` to log one line of kind ``key`` (listener, event, reason) at ``now``,
        unless its kind has had its share of this window; True when it was written.

        What :meth:`log` does, for lines that are not gate events (the server's refusals).
        The notes about held-back lines go to the logger ``log``, at ``level``.
        """
        state = self._windows.get(key)
        if state is None or now - state[0] >= self.window:
            if state is not None and state[2]:
                _log_about(
                    log,
                    key,
                    level,
                    "%d more such events in %g s were counted, not logged",
                    state[2],
                    self.window,
                )
            state = self._windows[key] = [now, 0, 0]
        state[1] += 1
        if state[1] > self.burst:
            state[2] += 1
            return False
        write()
        if state[1] == self.burst:
            _log_about(
                log,
                key,
                level,
                "%d such events within %g s; further ones are counted, not logged, until "
                "the window ends",
                self.burst,
                self.window,
            )
        return True


def _log_about(
    log: logging.Logger, key: tuple[str, str, str], level: int, text: str, *args: object
) -> None:
    """A line about a kind of event (its name, listener and reason), not about one event."""
    listener, name, reason = key
    log.log(level, "%s listener=%s reason=%s: " + text, name, listener, reason, *args)


@attrs.define(repr=False)
class EventCounters:
    """Counts of gate decisions by listener, event name and reason, for metrics."""

    _counts: collections.Counter[tuple[str, str, str]] = attrs.field(factory=collections.Counter)

    def __repr__(self) -> str:
        return f"<EventCounters total={self._counts.total()}>"

    def add(self, event: GateEvent) -> None:
        self.count(event.listener, event.name, event.reason)

    def count(self, listener: str, name: EventName, reason: str) -> None:
        """Count one event without building it (the gate's routine, unlogged decisions)."""
        self._counts[listener, name.value, reason] += 1

    def get(self, listener: str, name: EventName | str, reason: str | None = None) -> int:
        """The count for one listener and event, for one reason or summed over all."""
        if reason is not None:
            return self._counts[listener, str(name), reason]
        return sum(n for (lst, ev, _), n in self._counts.items() if (lst, ev) == (listener, name))

    def __iter__(self) -> Iterator[tuple[tuple[str, str, str], int]]:
        return iter(sorted(self._counts.items()))


EventSink = Callable[[GateEvent], None]
