"""Where rate-limit and ban state lives: a small async store interface and an in-process store.

Policy code (:mod:`mailedge.hooks.ratelimit`, :mod:`mailedge.hooks.autoban`) never reads,
modifies and writes state itself. Each decision is one call to the store, so that a shared
store (Redis, say) can make it atomic on its side, and several mailedge processes behind one
load balancer see one limit and one ban list:

- :meth:`RateStore.gcra` is the whole rate-limit decision (like redis-cell's ``CL.THROTTLE``);
- :meth:`RateStore.hit` records one event in a sliding window and returns how many it holds;
- :meth:`RateStore.get`, :meth:`RateStore.set`, :meth:`RateStore.delete` and
  :meth:`RateStore.scan` keep small text records (bans) with a time to live.

Times are the store's own: callers pass durations (a TTL, a window), never absolute times, so
processes with different clocks can share one store, which uses its own (Redis: ``TIME``
inside the script). :class:`MemoryStore` reads an injected clock, ``trio.current_time`` by
default, so tests run on trio's ``autojump_clock``.

``docs/hooks.md`` shows how a Redis store would implement each call.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Protocol as TypingProtocol

import attrs
import trio

__all__ = ["DEFAULT_MAX_KEYS", "Entry", "GCRAResult", "MemoryStore", "RateStore"]

# Each tracked key costs a few hundred bytes (a dict slot, a heap slot, the record), so
# 100,000 keys stay in the tens of megabytes, yet cover far more distinct clients than one
# mail server sees within a rate-limit period or a ban.
DEFAULT_MAX_KEYS = 100_000

# Float rounding slack for GCRA's comparison: a client exactly on schedule must never be
# refused because (count - 1) * T and the sum of T's differ in the last bit. A nanosecond is
# far below any clock's useful resolution.
_EPSILON = 1e-9

# Stale heap entries (from updated or deleted keys) are dropped by rebuilding the heap once
# they outnumber the live ones; the floor keeps a small store from rebuilding constantly.
_HEAP_SLACK = 1024


@attrs.frozen
class GCRAResult:
    """One rate-limit decision."""

    allowed: bool
    # When refused: seconds until the same request would be allowed; 0 when allowed.
    retry_after: float = 0.0


@attrs.frozen
class Entry:
    """A text record and how long it has left, as :meth:`RateStore.get` returns it."""

    key: str
    value: str
    # Seconds until the record expires, by the store's clock.
    ttl: float


class RateStore(TypingProtocol):
    """The state store behind rate limits and bans. Every method is one atomic operation.

    Keys are short strings chosen by the callers ("rl:conn:smtp:198.51.100.7"); the three
    kinds of record (GCRA times, hit logs, text) never share a key. Every record expires, and
    a store may forget any record early when it must (memory bounds); policy code treats a
    forgotten record as a fresh one.
    """

    async def gcra(self, key: str, emission_interval: float, burst_tolerance: float) -> GCRAResult:
        """Take one event from ``key``'s GCRA limit, atomically.

        Allowed when the key's theoretical arrival time (TAT) is at most
        ``now + burst_tolerance``; the TAT then becomes ``max(TAT, now) + emission_interval``.
        A refused event changes nothing. The record expires at its TAT, when it is back to
        the rested state.
        """
        ...

    async def hit(self, key: str, window: float, limit: int) -> int:
        """Record one event now; return how many of ``key``'s events are within ``window``.

        At most the newest ``limit`` events are kept (the caller only needs to know whether
        the count reached ``limit``), and the record expires ``window`` after its newest event.
        """
        ...

    async def get(self, key: str) -> Entry | None:
        """The text record at ``key``, or None when there is none (or it expired)."""
        ...

    async def set(self, key: str, value: str, ttl: float) -> None:
        """Store ``value`` at ``key`` for ``ttl`` seconds, replacing whatever was there."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``'s record of any kind; True when there was one."""
        ...

    async def scan(self, prefix: str) -> list[Entry]:
        """Every live text record whose key starts with ``prefix``, in no particular order."""
        ...


# What one key holds: a GCRA TAT, a hit log (newest last), or a text record.
_Value = float | tuple[float, ...] | str


@attrs.define(slots=True)
class _Record:
    value: _Value
    expires_at: float
    # Matches the heap entry that is current for this record; older heap entries are stale.
    version: int


def _default_clock() -> float:
    return trio.current_time()


@attrs.define(repr=False)
class MemoryStore:
    """A :class:`RateStore` in this process's memory, bounded in size.

    Bounds: a record is dropped as soon as it expires (every operation first sweeps the
    expired ones, in expiry order), and at most ``max_keys`` records are held. When a new key
    would exceed that, the record that would expire soonest is evicted: it is the one whose
    loss changes the fewest future decisions, since it was about to be forgotten anyway. A ban
    therefore outlives a flood of fresh keys unless it is near its own end (this is Redis's
    ``volatile-ttl`` policy). Every operation is O(log n) amortised, except ``scan`` (O(n)).

    Operations never await anything, so each is atomic among trio tasks.
    """

    max_keys: int = attrs.field(default=DEFAULT_MAX_KEYS, validator=attrs.validators.gt(0))
    clock: Callable[[], float] = attrs.field(default=_default_clock, kw_only=True)
    _records: dict[str, _Record] = attrs.field(factory=dict, init=False)
    # (expires_at, version, key); a heap entry whose version differs from the record's is stale.
    _heap: list[tuple[float, int, str]] = attrs.field(factory=list, init=False)
    _versions: itertools.count[int] = attrs.field(factory=itertools.count, init=False)
    # How many records were evicted to stay within max_keys (not counting expiry).
    evictions: int = attrs.field(default=0, init=False)

    def __repr__(self) -> str:
        return f"<MemoryStore keys={len(self._records)}/{self.max_keys}>"

    def __len__(self) -> int:
        """How many records are held (expired ones may linger until the next operation)."""
        return len(self._records)

    # -- RateStore ----------------------------------------------------------------------------

    async def gcra(self, key: str, emission_interval: float, burst_tolerance: float) -> GCRAResult:
        now = self._now()
        record = self._records.get(key)
        tat = record.value if record is not None and isinstance(record.value, float) else now
        tat = max(tat, now)
        if tat - now > burst_tolerance + _EPSILON:
            return GCRAResult(False, tat - burst_tolerance - now)
        new_tat = tat + emission_interval
        self._put(key, new_tat, new_tat)
        return GCRAResult(True)

    async def hit(self, key: str, window: float, limit: int) -> int:
        now = self._now()
        record = self._records.get(key)
        hits: tuple[float, ...] = ()
        if record is not None and isinstance(record.value, tuple):
            hits = tuple(t for t in record.value if t > now - window)
        hits = (*hits, now)[-max(limit, 1) :]
        self._put(key, hits, now + window)
        return len(hits)

    async def get(self, key: str) -> Entry | None:
        now = self._now()
        record = self._records.get(key)
        if record is None or not isinstance(record.value, str):
            return None
        return Entry(key, record.value, record.expires_at - now)

    async def set(self, key: str, value: str, ttl: float) -> None:
        now = self._now()
        self._put(key, value, now + ttl)

    async def delete(self, key: str) -> bool:
        self._now()
        # The heap entry goes stale and is dropped when it surfaces or at the next rebuild.
        return self._records.pop(key, None) is not None

    async def scan(self, prefix: str) -> list[Entry]:
        now = self._now()
        return [
            Entry(key, record.value, record.expires_at - now)
            for key, record in self._records.items()
            if key.startswith(prefix) and isinstance(record.value, str)
        ]

    # -- bookkeeping --------------------------------------------------------------------------

    def _now(self) -> float:
        """The clock's time, after dropping every record that has expired by it."""
        now = self.clock()
        heap, records = self._heap, self._records
        while heap and heap[0][0] <= now:
            _, version, key = heapq.heappop(heap)
            record = records.get(key)
            if record is not None and record.version == version:
                del records[key]
        return now

    def _put(self, key: str, value: _Value, expires_at: float) -> None:
        record = self._records.get(key)
        if record is None:
            while len(self._records) >= self.max_keys:
                self._evict_one()
        version = next(self._versions)
        if record is None:
            self._records[key] = _Record(value, expires_at, version)
        else:
            record.value, record.expires_at, record.version = value, expires_at, version
        heapq.heappush(self._heap, (expires_at, version, key))
        if len(self._heap) > 2 * len(self._records) + _HEAP_SLACK:
            self._heap = [(r.expires_at, r.version, k) for k, r in self._records.items()]
            heapq.heapify(self._heap)

    def _evict_one(self) -> None:
        """Drop the live record that expires soonest."""
        while True:
            _, version, key = heapq.heappop(self._heap)
            record = self._records.get(key)
            if record is not None and record.version == version:
                del self._records[key]
                self.evictions += 1
                return
