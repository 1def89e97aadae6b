"""The recent gate decisions: a bounded ring, live subscribers, and capped per-peer counts.

:class:`DecisionRing` is a gate ``on_event`` sink. It keeps the last decisions, numbered in
order (what an operator's console lists, and resumes from), hands each new one to every
subscriber's bounded queue (a console's live stream), and counts untrusted PROXY headers by
peer under a label cap (what a dashboard graphs). It keeps the gate's events as they are and
builds the JSON-ready :class:`Decision` only when someone reads one.

Wiring a sink makes every decision an event: the gate builds routine ones (``proxy.direct``,
``proxy.accepted``) only when someone listens. ``docs/console.md`` has what that costs.
"""

from __future__ import annotations

import collections
import itertools
import secrets
import time
from collections.abc import Callable, Iterator

import attrs
import trio

from mailedge.events import EventName, EventSink, GateEvent

__all__ = [
    "DEFAULT_PEER_LABELS",
    "DEFAULT_RING_SIZE",
    "DEFAULT_SUBSCRIBER_QUEUE",
    "OTHER_PEERS",
    "Decision",
    "DecisionRing",
    "Kept",
    "PeerCounts",
    "Subscription",
    "fan_out",
]

# What an operator scrolls through on the console: a few minutes of a busy listener's
# decisions, about 250 KB of values, and a page that still renders at once.
DEFAULT_RING_SIZE = 500
# Decisions one live subscriber may fall behind by before the oldest are dropped for it: a
# slow browser must not make the server hold an unbounded backlog.
DEFAULT_SUBSCRIBER_QUEUE = 256
# Peers that get a label of their own in the untrusted-header counts. Each label is a time
# series in Prometheus; a spoofing scan from many addresses must not make thousands.
DEFAULT_PEER_LABELS = 20
# The label every later peer is counted under.
OTHER_PEERS = "other"


@attrs.frozen(kw_only=True)
class Decision:
    """One gate decision as the console shows it: plain values, ready for JSON."""

    # Wall-clock seconds since the epoch, when the ring saw the event.
    time: float
    listener: str
    connection_id: int
    event: str
    reason: str
    peer: str
    client: str | None
    # The gate's diagnosis: what happened and what to change.
    message: str
    first_bytes: str | None

    @classmethod
    def from_event(cls, event: GateEvent, now: float) -> Decision:
        return cls(
            time=now,
            listener=event.listener,
            connection_id=event.connection_id,
            event=str(event.name),
            reason=str(event.reason),
            peer=event.peer,
            client=event.client,
            message=event.message,
            first_bytes=event.first_bytes,
        )

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)


@attrs.define(repr=False)
class PeerCounts:
    """Untrusted PROXY headers by (listener, peer address), with at most ``labels`` peers.

    The first ``labels`` peers seen keep their own label for the life of the process (a
    counter's series must not change name); every later one is counted as ``other``.
    """

    labels: int = DEFAULT_PEER_LABELS
    _counts: collections.Counter[tuple[str, str]] = attrs.field(factory=collections.Counter)
    _peers: set[str] = attrs.field(factory=set)

    def __repr__(self) -> str:
        return f"<PeerCounts peers={len(self._peers)}/{self.labels}>"

    def add(self, listener: str, peer: str) -> None:
        if peer not in self._peers:
            if len(self._peers) >= self.labels:
                peer = OTHER_PEERS
            else:
                self._peers.add(peer)
        self._counts[listener, peer] += 1

    def __iter__(self) -> Iterator[tuple[tuple[str, str], int]]:
        return iter(sorted(self._counts.items()))


# One kept decision as the ring stores it: (sequence number, wall-clock time, the event).
# The JSON-ready Decision is built only when someone reads it: recording stays a tuple and an
# append, the cost a connection pays for the console (docs/console.md, "What it costs").
Kept = tuple[int, float, GateEvent]


@attrs.define(eq=False, repr=False)
class Subscription:
    """One subscriber's queue of new decisions; ``dropped`` counts those it fell behind on."""

    _receive: trio.MemoryReceiveChannel[Kept]
    _send: trio.MemorySendChannel[Kept]
    dropped: int = 0

    def __repr__(self) -> str:
        return f"<Subscription dropped={self.dropped}>"

    def offer(self, kept: Kept) -> None:
        try:
            self._send.send_nowait(kept)
        except trio.WouldBlock:
            self.dropped += 1

    async def receive(self) -> Decision:
        return (await self.receive_numbered())[1]

    async def receive_numbered(self) -> tuple[int, Decision]:
        """The next new decision with its sequence number (see :meth:`DecisionRing.after`)."""
        seq, now, event = await self._receive.receive()
        return seq, Decision.from_event(event, now)

    def close(self) -> None:
        self._send.close()
        self._receive.close()


@attrs.define(repr=False)
class DecisionRing:
    """The last ``size`` gate decisions, their subscribers, and the untrusted peers' counts.

    Pass :meth:`record` (or a :func:`fan_out` including it) as the gate's ``on_event``. Every
    decision gets the next sequence number (1, 2, ...): a reader that remembers the last one
    it saw asks :meth:`after` for exactly the ones it has not, so none is missed or doubled.
    ``epoch`` names this ring among others (another process, a restart): a number is
    meaningful only with its ring's epoch.
    """

    size: int = attrs.field(default=DEFAULT_RING_SIZE, validator=attrs.validators.gt(0))
    wall_clock: Callable[[], float] = attrs.field(default=time.time, kw_only=True)
    untrusted_peers: PeerCounts = attrs.field(factory=PeerCounts, kw_only=True)
    epoch: str = attrs.field(factory=lambda: secrets.token_hex(4), kw_only=True)
    _ring: collections.deque[Kept] = attrs.field(init=False)
    _subscribers: list[Subscription] = attrs.field(factory=list, init=False)
    # The sequence number of the newest decision; 0 before the first.
    last: int = attrs.field(default=0, init=False)

    @_ring.default
    def _make_ring(self) -> collections.deque[Kept]:
        return collections.deque(maxlen=self.size)

    def __repr__(self) -> str:
        return f"<DecisionRing {len(self._ring)}/{self.size} subscribers={len(self._subscribers)}>"

    def record(self, event: GateEvent) -> None:
        """The gate's ``on_event`` sink: keep the decision and pass it to every subscriber."""
        self.last += 1
        kept = (self.last, self.wall_clock(), event)
        self._ring.append(kept)
        if event.name is EventName.UNTRUSTED_HEADER:
            self.untrusted_peers.add(event.listener, str(event.peer_ip))
        for subscription in self._subscribers:
            subscription.offer(kept)

    def recent(self) -> list[Decision]:
        """The kept decisions, newest first."""
        return [Decision.from_event(event, now) for _, now, event in reversed(self._ring)]

    def after(self, seq: int) -> tuple[list[tuple[int, Decision]], int]:
        """The kept decisions numbered after ``seq``, oldest first, and how many of those
        the ring no longer holds (they fell out of it)."""
        first = self.last - len(self._ring) + 1
        lost = max(0, first - seq - 1)
        start = max(0, seq - first + 1)
        kept = itertools.islice(self._ring, start, None)
        return [(n, Decision.from_event(event, now)) for n, now, event in kept], lost

    def counts(self) -> collections.Counter[tuple[str, str]]:
        """The kept decisions by (listener, event name)."""
        return collections.Counter((event.listener, str(event.name)) for _, _, event in self._ring)

    def subscribe(self, queue: int = DEFAULT_SUBSCRIBER_QUEUE) -> _Subscribed:
        """``with ring.subscribe() as subscription:`` new decisions, until the block ends."""
        return _Subscribed(self, queue)

    def _add(self, queue: int) -> Subscription:
        send, receive = trio.open_memory_channel[Kept](queue)
        subscription = Subscription(receive, send)
        self._subscribers.append(subscription)
        return subscription

    def _remove(self, subscription: Subscription) -> None:
        self._subscribers.remove(subscription)
        subscription.close()


@attrs.define
class _Subscribed:
    ring: DecisionRing
    queue: int
    _subscription: Subscription | None = None

    def __enter__(self) -> Subscription:
        self._subscription = self.ring._add(self.queue)
        return self._subscription

    def __exit__(self, *exc_info: object) -> None:
        assert self._subscription is not None
        self.ring._remove(self._subscription)


def fan_out(*sinks: EventSink) -> EventSink:
    """One ``on_event`` sink that calls each of ``sinks`` in order."""

    def sink(event: GateEvent) -> None:
        for each in sinks:
            each(event)

    return sink
