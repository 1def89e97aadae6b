"""A :class:`~mailedge.hooks.store.RateStore` in Redis, shared by processes and hosts.

Install with ``pip install mailedge[redis]`` (the coredis client; docs/scale-out.md says why).

- **One atomic step per call.** Each call is one Lua script (:mod:`._redis_scripts`), loaded
  once and run by SHA; coredis reloads it by itself after ``SCRIPT FLUSH`` or a restart. GCRA
  and hit windows read the server's ``TIME``.
- **Keys.** ``keyPrefix`` + the caller's key, with the part that names the client (an address
  or an IPv6 network) in a Cluster hash tag: ``mailedge:rl:conn:smtp:{198.51.100.7}``. One
  client's keys share one slot. Every key has a time to live.
- **Bans without a round trip.** Keys under a mirrored prefix (``ban:``, ``ab:ban:``) are read
  from a local :class:`BanView`. Writes to them publish the change from inside the script;
  every store subscribes, and re-reads the whole mirrored set after every (re)connect and every
  ``resync_period``, so a lost message is repaired within that period.
- **Failure policy.** No call waits more than ``timeout`` on Redis, and the client never
  retries. A :class:`CircuitBreaker` stops calling Redis after consecutive errors and probes it
  every ``probe_interval``. Meanwhile ``onFailure`` answers: ``local`` (a per-process
  :class:`~mailedge.hooks.store.MemoryStore`), ``open`` (allow) or ``closed`` (refuse). Bans
  this process knows are enforced under every policy; mirrored writes made during an outage
  are replayed to Redis when it is back.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs
import trio

from mailedge.hooks import _redis_scripts as scripts
from mailedge.hooks.leases import LeaseTable, spare_cap
from mailedge.hooks.redis_batch import Batcher, Op, Reply
from mailedge.hooks.redis_client import open_client
from mailedge.hooks.store import Entry, GCRAResult, MemoryStore, RateStore
from mailedge.store_settings import (
    StoreBackend,
    StoreFailurePolicy,
    StoreSettings,
    StoreTopology,
    parse_store_url,
)

__all__ = [
    "DEFAULT_MIRRORED_PREFIXES",
    "BanView",
    "CircuitBreaker",
    "RedisStore",
    "open_store",
    "redis_key",
]

logger = logging.getLogger("mailedge.hooks.redis")

# The callers' ban keys (AutoBan's "ab:ban:", and the plain "ban:" form): read on every
# connection, written rarely, so they are served from the local view.
DEFAULT_MIRRORED_PREFIXES = ("ban:", "ab:ban:")
# Five errors in a row is no blip (one lost packet, one slow reply) but an outage; each costs
# at most `timeout`, so the breaker opens within a quarter second at the 50 ms default.
DEFAULT_BREAKER_THRESHOLD = 5
# While the breaker is open one call in this many seconds tries Redis: recovery is noticed
# within 2 s, and a dead Redis costs one timeout per 2 s, not one per connection.
DEFAULT_PROBE_INTERVAL = 2.0
# The background re-read of the view (SCAN and one read per ban) may take this long; it never
# holds up a connection, and a few thousand bans read well within it.
RESYNC_TIMEOUT = 10.0
# `scan` of an unmirrored prefix is an admin listing, never on a connection's path: it may
# take up to this long (or `timeout`, if longer) before the failure policy answers.
SCAN_TIMEOUT = 1.0
# A deleted ban is remembered this long past the next re-read, so that an older "set" message
# arriving late cannot bring it back.
TOMBSTONE_SECONDS = 60.0
# Mirrored writes made while Redis was unreachable, replayed when it is back; beyond this many
# the oldest are dropped (each stays in the local view until it expires).
MAX_JOURNAL = 10_000
# Keys read per batch of concurrent requests when re-reading the view.
_RESYNC_BATCH = 100
# What an address or a network is written with (besides the colons between segments).
_ADDRESS_CHARS = frozenset("0123456789abcdef./")
# What a client part (an address or a network, IPv6 included) can hold at all.
_CLIENT_CHARS = _ADDRESS_CHARS | frozenset(":ABCDEF")
# The pub/sub channel under the key prefix.
_CHANNEL = "mirror"
# A connection slot (maxConnectionsPerIp) is a member of its client's sorted set, scored by
# when it expires; its process renews it every CONNECTION_HEARTBEAT seconds. A process that
# dies (SIGKILL, a crash, a lost host) stops renewing, so its slots are free within the lease.
# 5 s: "a few seconds" after a crash, and five missed heartbeats before a live slot lapses.
CONNECTION_LEASE = 5.0
CONNECTION_HEARTBEAT = 1.0


def _is_client(text: str) -> bool:
    """Whether ``text`` is an address or a network in the form callers write them.

    ``inet_pton`` rather than :mod:`ipaddress`: a key for a client never seen before is
    split on every decision, and parsing with exceptions cost more than the rest of it.
    """
    # Most candidates ("conn:smtp:...") hold a letter no address has.
    if not _CLIENT_CHARS.issuperset(text):
        return False
    address, slash, length = text.partition("/")
    family, bits = (socket.AF_INET6, 128) if ":" in address else (socket.AF_INET, 32)
    if slash and not (length.isdigit() and len(length) <= 3 and int(length) <= bits):
        return False
    try:
        socket.inet_pton(family, address)
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=65_536)
def _client_start(key: str) -> int:
    """Where the client's part of ``key`` starts (after a ``:``), or -1 if it names none.

    Callers' keys end with the client: ``rl:conn:smtp:198.51.100.7``,
    ``ab:ban:2001:db8:1:2::/64``. The client part is the leftmost suffix, after a colon, that
    is an address or a network, so an IPv6 client's own colons do not split it.
    """
    start = key.find(":") + 1
    while start > 0:
        if _is_client(key[start:]):
            return start
        start = key.find(":", start) + 1
    return -1


def redis_key(prefix: str, key: str) -> str:
    """The Redis key for the caller's ``key``: the client part in a hash tag, if there is one."""
    start = _client_start(key)
    if start < 0:
        return prefix + key
    return f"{prefix}{key[:start]}{{{key[start:]}}}"


def hash_tag(name: str) -> str:
    """What picks a Redis key's Cluster slot: its hash tag's content, or the whole key."""
    start = name.find("{")
    if start >= 0:
        end = name.find("}", start + 1)
        if end > start + 1:
            return name[start + 1 : end]
    return name


def _caller_key(prefix: str, name: str) -> str:
    """Undo :func:`redis_key`."""
    key = name[len(prefix) :]
    if key.endswith("}") and "{" in key:
        brace = key.rfind("{")
        key = key[:brace] + key[brace + 1 : -1]
    return key


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _scan_pattern(key_prefix: str, prefix: str) -> str:
    """A SCAN pattern that matches every Redis key for a caller's key starting with ``prefix``.

    When ``prefix`` ends where a client's part would begin (``"ab:ban:"``), the pattern is
    exact. When it reaches into one (``"ab:ban:198.51"``), that part sits in a hash tag in
    Redis, so the pattern covers the whole key prefix and the caller filters.
    """
    if prefix:
        # Exact when the prefix ends with a segment no address can hold ("ban:", "smtp:").
        last = prefix[:-1].rpartition(":")[2] if prefix.endswith(":") else ""
        if not last or not set(last.lower()) - _ADDRESS_CHARS:
            return _glob_escape(key_prefix) + "*"
    return _glob_escape(key_prefix + prefix) + "*"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _wall_version() -> int:
    """A version for a write made without Redis: this host's clock, in microseconds."""
    return time.time_ns() // 1000


# -- the local ban view -----------------------------------------------------------------------


@attrs.define(slots=True)
class _ViewEntry:
    # None: a tombstone (deleted), kept so that an older write cannot bring the key back.
    value: str | None
    expires_at: float
    version: int


@attrs.define(repr=False)
class BanView:
    """This process's copy of the mirrored keys, kept current by pub/sub and full re-reads.

    ``clock`` is trio's by default. :meth:`wait_for` lets a caller (a test) wait for a change
    without polling.
    """

    clock: Callable[[], float] = attrs.field(default=trio.current_time, kw_only=True)
    _entries: dict[str, _ViewEntry] = attrs.field(factory=dict, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    # How many full re-reads replaced the view.
    resyncs: int = attrs.field(default=0, init=False)

    def __repr__(self) -> str:
        return f"<BanView entries={len(self._entries)} resyncs={self.resyncs}>"

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None or entry.value is None:
            return None
        ttl = entry.expires_at - self.clock()
        if ttl <= 0:
            return None
        return Entry(key, entry.value, ttl)

    def scan(self, prefix: str) -> list[Entry]:
        now = self.clock()
        return [
            Entry(key, entry.value, entry.expires_at - now)
            for key, entry in self._entries.items()
            if key.startswith(prefix) and entry.value is not None and entry.expires_at > now
        ]

    def apply(self, key: str, value: str | None, ttl: float, version: int) -> None:
        """One write (``value`` None: a delete), unless the view holds a newer one."""
        old = self._entries.get(key)
        if old is not None and old.version > version:
            return
        if value is None:
            ttl = TOMBSTONE_SECONDS
        self._entries[key] = _ViewEntry(value, self.clock() + ttl, version)
        self._notify()

    def replace(self, snapshot: dict[str, tuple[str, float, int]], since: int) -> None:
        """A full re-read that started at server version ``since`` replaces the view.

        Writes the view saw after ``since`` may be missing from the snapshot (or newer than
        what it read), so they are kept when newer.
        """
        now = self.clock()
        entries = {
            key: _ViewEntry(value, now + ttl, version)
            for key, (value, ttl, version) in snapshot.items()
        }
        for key, old in self._entries.items():
            if old.version > since and old.expires_at > now:
                new = entries.get(key)
                if new is None or new.version < old.version:
                    entries[key] = old
        self._entries = entries
        self.resyncs += 1
        self._notify()

    def sweep(self) -> None:
        now = self.clock()
        self._entries = {k: e for k, e in self._entries.items() if e.expires_at > now}

    async def wait_for(self, predicate: Callable[[BanView], bool]) -> None:
        """Return once ``predicate(self)`` holds; it is checked after every change."""
        while not predicate(self):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


# -- the circuit breaker ----------------------------------------------------------------------


@attrs.define(repr=False)
class CircuitBreaker:
    """Closed: every call goes to Redis. Open: one probe per ``probe_interval``, the rest not.

    Opens after ``threshold`` consecutive errors; closes on the first success. Each transition
    is logged once (WARNING opened, INFO closed) and counted in ``opened`` and ``closed``.
    """

    threshold: int = DEFAULT_BREAKER_THRESHOLD
    probe_interval: float = DEFAULT_PROBE_INTERVAL
    clock: Callable[[], float] = attrs.field(default=trio.current_time, kw_only=True)
    is_open: bool = attrs.field(default=False, init=False)
    consecutive_errors: int = attrs.field(default=0, init=False)
    opened: int = attrs.field(default=0, init=False)
    closed: int = attrs.field(default=0, init=False)
    _next_probe: float = attrs.field(default=0.0, init=False)

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<CircuitBreaker {state} errors={self.consecutive_errors}>"

    def allow(self) -> bool:
        """Whether this call may try Redis (when open: whether it is the next probe)."""
        if not self.is_open:
            return True
        now = self.clock()
        if now < self._next_probe:
            return False
        self._next_probe = now + self.probe_interval
        return True

    def success(self) -> bool:
        """Record a success; True when it closed the breaker."""
        self.consecutive_errors = 0
        if not self.is_open:
            return False
        self.is_open = False
        self.closed += 1
        logger.info("redis store: Redis answers again; circuit breaker closed")
        return True

    def failure(self, error: BaseException) -> None:
        self.consecutive_errors += 1
        if self.is_open:
            self._next_probe = self.clock() + self.probe_interval
            return
        if self.consecutive_errors >= self.threshold:
            self.is_open = True
            self.opened += 1
            self._next_probe = self.clock() + self.probe_interval
            logger.warning(
                "redis store: %d errors in a row (last: %s); circuit breaker open, "
                "probing every %g s",
                self.consecutive_errors,
                _describe(error),
                self.probe_interval,
            )


def _describe(error: BaseException) -> str:
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    return f"{type(error).__name__}: {error}"


# -- the store ---------------------------------------------------------------------------------


@attrs.define(repr=False)
class RedisStore:
    """A :class:`~mailedge.hooks.store.RateStore` on Redis (or Valkey), for many processes.

    Create it with :meth:`from_settings` or directly, then run it: ``async with store:`` (or
    ``await nursery.start(store.run)``) connects, subscribes and keeps the ban view current.
    Calls made before it runs, or while Redis is unreachable, are answered by ``on_failure``.

    Counters for metrics: ``calls`` (round trips on the connection path and the admin's,
    batches included), ``errors`` (calls that failed or timed out), ``fallbacks`` (calls
    answered without Redis), ``messages`` (pub/sub changes applied), ``replayed`` (outage writes
    sent once Redis was back); the breaker's ``opened``/``closed``; the view's ``resyncs``.
    """

    url: str
    key_prefix: str = "mailedge:"
    timeout: float = 0.05
    on_failure: StoreFailurePolicy = StoreFailurePolicy.LOCAL
    resync_period: float = 30.0
    mirrored_prefixes: tuple[str, ...] = DEFAULT_MIRRORED_PREFIXES
    breaker: CircuitBreaker = attrs.field(factory=CircuitBreaker)
    view: BanView = attrs.field(factory=BanView)
    fallback: MemoryStore = attrs.field(factory=MemoryStore)
    # The lease of a shared connection slot and how often this process renews its own.
    connection_lease: float = CONNECTION_LEASE
    connection_heartbeat: float = CONNECTION_HEARTBEAT
    calls: int = attrs.field(default=0, init=False)
    errors: int = attrs.field(default=0, init=False)
    fallbacks: int = attrs.field(default=0, init=False)
    messages: int = attrs.field(default=0, init=False)
    replayed: int = attrs.field(default=0, init=False)
    _client: Any = attrs.field(default=None, init=False)
    _scripts: dict[str, Any] = attrs.field(factory=dict, init=False)
    _journal: dict[str, tuple[str | None, float]] = attrs.field(factory=dict, init=False)
    _resync_now: trio.Event = attrs.field(factory=trio.Event, init=False)
    _cancel: trio.CancelScope | None = attrs.field(default=None, init=False)
    _nursery_manager: Any = attrs.field(default=None, init=False)
    # Shared connection slots this process holds, by caller's key: their members.
    _slots: dict[str, set[str]] = attrs.field(factory=dict, init=False)
    # Slots kept after their connection closed, for the client's next one: (member, until),
    # and how many to keep per key (mailedge.hooks.leases.spare_cap of its limit).
    _spares: dict[str, list[tuple[str, float]]] = attrs.field(factory=dict, init=False)
    _spare_caps: dict[str, int] = attrs.field(factory=dict, init=False)
    # Slots that may be held for nobody (a call failed), to remove until their lease lapses.
    _orphans: dict[tuple[str, str], float] = attrs.field(factory=dict, init=False)
    _member_prefix: str = attrs.field(
        factory=lambda: f"{os.getpid()}.{uuid.uuid4().hex[:12]}.", init=False
    )
    _member_numbers: Iterator[int] = attrs.field(factory=itertools.count, init=False)
    # Rate-limit tokens granted ahead and spent here (mailedge.hooks.leases).
    leases: LeaseTable = attrs.field(factory=LeaseTable)
    _batcher: Batcher = attrs.field(init=False)

    @_batcher.default
    def _make_batcher(self) -> Batcher:
        return Batcher(self._batch_call)

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> RedisStore:
        return cls(
            url=settings.url,
            key_prefix=settings.key_prefix,
            timeout=settings.timeout,
            on_failure=settings.on_failure,
            resync_period=settings.resync_period,
        )

    def __repr__(self) -> str:
        state = "open" if self.breaker.is_open else "closed"
        return f"<RedisStore {self.key_prefix!r} breaker={state} view={len(self.view._entries)}>"

    @property
    def channel(self) -> str:
        return self.key_prefix + _CHANNEL

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> RedisStore:
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        await nursery.start(self.run)
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        if self._cancel is not None:
            self._cancel.cancel()
        manager, self._nursery_manager = self._nursery_manager, None
        return bool(await manager.__aexit__(*exc))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and keep the ban view current until cancelled. Never fails on Redis errors."""
        # No retries in the client (one server, Sentinel or Cluster: redis_client.py): a
        # retried call would wait past `timeout`; the failure policy is the retry.
        with trio.CancelScope() as self._cancel:
            async with open_client(
                self.url,
                connect_timeout=max(self.timeout, 1.0),
                retry_interval=self.breaker.probe_interval,
            ) as client:
                self._client = client
                if parse_store_url(self.url).topology is StoreTopology.CLUSTER:
                    # One script may touch the keys of one slot only: batch per client.
                    self._batcher.group = hash_tag
                self._scripts = {
                    name: client.register_script(getattr(scripts, name))
                    for name in ("BATCH", "HIT", "GET", "SET", "DELETE", "TIME")
                }
                try:
                    async with trio.open_nursery() as nursery:
                        first = trio.Event()
                        nursery.start_soon(self._subscriber, first)
                        nursery.start_soon(self._batcher.run)
                        nursery.start_soon(self._keeper)
                        # Started once the first subscription and re-read are done, or
                        # failed: a store that starts during an outage serves by its policy.
                        with trio.move_on_after(max(self.timeout, 1.0)):
                            await first.wait()
                        task_status.started()
                finally:
                    self._client = None

    async def _subscriber(self, first: trio.Event) -> None:
        """Subscribe, re-read the view, apply messages; on any error wait and start again."""
        import anyio  # coredis's own dependency, so only with the redis extra

        while True:
            try:
                try:
                    async with self._client.pubsub(
                        channels=[self.channel], ignore_subscribe_messages=True, retry_policy=None
                    ) as pubsub:
                        await self._replay()
                        await self._resync()
                        first.set()
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._periodic_resync)
                            async for message in pubsub:
                                self._on_message(_text(message["data"]))
                except* anyio.ClosedResourceError:
                    # coredis 6.9's pubsub, when cancelled, unsubscribes on a connection it
                    # has already closed; the cancellation itself still propagates.
                    logger.debug("redis store: subscriber connection already closed")
            except Exception as error:
                logger.debug("redis store: subscriber stopped: %s", _describe(error))
            first.set()
            # A dead server costs one attempt per probe interval, like the breaker's probes.
            with trio.move_on_after(self.breaker.probe_interval):
                await self._resync_now.wait()

    async def _periodic_resync(self) -> None:
        while True:
            with trio.move_on_after(self.resync_period):
                await self._resync_now.wait()
            self._resync_now = trio.Event()
            await self._replay()
            await self._resync()

    def _on_message(self, data: str) -> None:
        parts = data.split("\t", 4)
        if len(parts) != 5:
            return
        kind, version, ttl_ms, key, value = parts
        self.messages += 1
        if kind == "s":
            self.view.apply(key, value, int(ttl_ms) / 1000, int(version))
        elif kind == "d":
            self.view.apply(key, None, 0.0, int(version))

    async def _resync(self) -> None:
        """Re-read every mirrored key (SCAN, then one read each) and replace the view."""
        with trio.fail_after(RESYNC_TIMEOUT):
            since = int(await self._scripts["TIME"]())
            names: list[str] = []
            for prefix in self.mirrored_prefixes:
                match = _scan_pattern(self.key_prefix, prefix)
                async for name in self._client.scan_iter(match=match, count=1000):
                    if _caller_key(self.key_prefix, name).startswith(prefix):
                        names.append(name)
            snapshot: dict[str, tuple[str, float, int]] = {}

            async def read(name: str) -> None:
                reply = await self._scripts["GET"](keys=[name])
                if reply:
                    value, pttl, version = reply
                    if int(pttl) > 0:
                        key = _caller_key(self.key_prefix, name)
                        snapshot[key] = (_text(value), int(pttl) / 1000, int(version))

            for start in range(0, len(names), _RESYNC_BATCH):
                async with trio.open_nursery() as nursery:
                    for name in names[start : start + _RESYNC_BATCH]:
                        nursery.start_soon(read, name)
        self.view.replace(snapshot, since)
        logger.debug("redis store: view re-read: %d entries", len(snapshot))

    async def _replay(self) -> None:
        """Send the mirrored writes made during an outage, oldest first."""
        while self._journal:
            key = next(iter(self._journal))
            value, expires_at = self._journal[key]
            remaining = expires_at - trio.current_time()
            with trio.fail_after(RESYNC_TIMEOUT):
                if value is None:
                    await self._scripts["DELETE"](
                        keys=[redis_key(self.key_prefix, key)], args=[self.channel, key]
                    )
                elif remaining > 0:
                    await self._scripts["SET"](
                        keys=[redis_key(self.key_prefix, key)],
                        args=[value, math.ceil(remaining * 1000), self.channel, key],
                    )
            self._journal.pop(key, None)
            self.replayed += 1

    # -- calls -----------------------------------------------------------------------------------

    def _mirrored(self, key: str) -> bool:
        return key.startswith(self.mirrored_prefixes)

    async def _call(
        self,
        call: Callable[[], Coroutine[Any, Any, Any]],
        bound: float | None = None,
        *,
        fallbacks: int = 1,
    ) -> tuple[bool, Any]:
        """``call`` on Redis under the timeout and the breaker: (True, reply) or (False, None).

        ``fallbacks`` is how many answers the failure policy gives if it fails (a batch's
        callers count their own).
        """
        if self._client is None or not self.breaker.allow():
            self.fallbacks += fallbacks
            return False, None
        self.calls += 1
        try:
            with trio.fail_after(bound or self.timeout):
                reply = await call()
        except Exception as error:
            self.errors += 1
            self.fallbacks += fallbacks
            self.breaker.failure(error)
            return False, None
        if self.breaker.success():
            # Back from an outage: replay its writes and re-read the view now.
            self._resync_now.set()
        return True, reply

    async def _batch_call(self, keys: list[str], args: list[str | int]) -> tuple[bool, Any]:
        script = self._scripts.get("BATCH")
        return await self._call(
            lambda: script(keys=keys, args=args),  # type: ignore[misc]
            fallbacks=0,
        )

    async def _submit(self, op: Op) -> Reply | None:
        """One decision through the batcher, within ``timeout``; None if Redis did not answer."""
        if self._client is None:
            reply = None
        else:
            reply = await self._batcher.submit(op, self.timeout)
        if reply is None:
            self.fallbacks += 1
        return reply

    async def gcra(self, key: str, emission_interval: float, burst_tolerance: float) -> GCRAResult:
        now = trio.current_time()
        if self.leases.spend(key, emission_interval, burst_tolerance, now):
            return GCRAResult(True)
        name = redis_key(self.key_prefix, key)
        interval_us = round(emission_interval * 1e6)
        tolerance_us = round(burst_tolerance * 1e6)

        def settle(reply: Reply) -> None:
            # Granted: the bucket is full again in reply[1] µs. Refused: reply[1] µs until
            # one more fits, and the whole burst after that.
            granted, micros = reply
            rested_in = micros / 1e6 if granted else micros / 1e6 + burst_tolerance
            self.leases.settled(key, trio.current_time(), rested_in)

        def unknown() -> None:
            # No reply: assume the bucket is as far from full as it can be.
            self.leases.settled(key, trio.current_time(), burst_tolerance + emission_interval)

        if (
            self._client is not None
            and not self.breaker.is_open
            and self.leases.credit(key, emission_interval, burst_tolerance, now)
        ):
            # A bucket this process knows no use of: allowed now, recorded on the way.
            self._batcher.background(
                Op(name, "g", interval_us, tolerance_us, 1, then=settle, lost=unknown)
            )
            return GCRAResult(True)
        want, unused = self.leases.want(key, emission_interval, burst_tolerance, now)
        if unused:
            self._batcher.background(Op(name, "r", interval_us, unused))

        def hand_back(reply: Reply) -> None:
            # Granted to a caller that left: give the tokens back to the other processes.
            if reply[0] > 0:
                self._batcher.background(Op(name, "r", interval_us, reply[0]))

        reply = await self._submit(
            Op(
                name,
                "g",
                interval_us,
                tolerance_us,
                want,
                undo=hand_back,
                then=settle,
                lost=unknown,
            )
        )
        if reply is not None:
            granted, retry_us = reply
            if granted > 0:
                self.leases.granted(key, emission_interval, burst_tolerance, now, granted)
                return GCRAResult(True)
            return GCRAResult(False, retry_us / 1e6)
        if self.on_failure is StoreFailurePolicy.LOCAL:
            return await self.fallback.gcra(key, emission_interval, burst_tolerance)
        if self.on_failure is StoreFailurePolicy.OPEN:
            return GCRAResult(True)
        return GCRAResult(False, self.breaker.probe_interval)

    async def hit(self, key: str, window: float, limit: int) -> int:
        script = self._scripts.get("HIT")
        ok, reply = await self._call(
            lambda: script(  # type: ignore[misc]
                keys=[redis_key(self.key_prefix, key)], args=[round(window * 1e6), limit]
            )
        )
        if ok:
            return int(reply)
        if self.on_failure is StoreFailurePolicy.LOCAL:
            return await self.fallback.hit(key, window, limit)
        # open and closed: the failure is not counted (closed refuses at gcra, not here).
        return 0

    async def get(self, key: str) -> Entry | None:
        if self._mirrored(key):
            return self.view.get(key)
        script = self._scripts.get("GET")
        ok, reply = await self._call(
            lambda: script(keys=[redis_key(self.key_prefix, key)])  # type: ignore[misc]
        )
        if ok:
            if not reply or int(reply[1]) <= 0:
                return None
            return Entry(key, _text(reply[0]), int(reply[1]) / 1000)
        if self.on_failure is StoreFailurePolicy.LOCAL:
            return await self.fallback.get(key)
        return None

    async def set(self, key: str, value: str, ttl: float) -> None:
        if ttl <= 0:
            await self.delete(key)
            return
        mirrored = self._mirrored(key)
        if mirrored and "\t" in key:
            raise ValueError(f"a mirrored key cannot hold a tab: {key!r}")
        script = self._scripts.get("SET")
        ok, reply = await self._call(
            lambda: script(  # type: ignore[misc]
                keys=[redis_key(self.key_prefix, key)],
                args=[value, math.ceil(ttl * 1000), self.channel if mirrored else "", key],
            )
        )
        if ok:
            if mirrored:
                self.view.apply(key, value, ttl, int(reply))
            return
        if mirrored:
            self.view.apply(key, value, ttl, _wall_version())
            self._journal_write(key, value, ttl)
        if self.on_failure is StoreFailurePolicy.LOCAL:
            await self.fallback.set(key, value, ttl)

    async def delete(self, key: str) -> bool:
        mirrored = self._mirrored(key)
        existed = mirrored and self.view.get(key) is not None
        script = self._scripts.get("DELETE")
        ok, reply = await self._call(
            lambda: script(  # type: ignore[misc]
                keys=[redis_key(self.key_prefix, key)],
                args=[self.channel if mirrored else "", key],
            )
        )
        if ok:
            deleted, version = reply
            if mirrored:
                self.view.apply(key, None, 0.0, int(version))
            return bool(deleted) or existed
        if mirrored:
            self.view.apply(key, None, 0.0, _wall_version())
            self._journal_write(key, None, TOMBSTONE_SECONDS)
        local = await self.fallback.delete(key)
        return local or existed

    async def scan(self, prefix: str) -> list[Entry]:
        if self._mirrored(prefix):
            return self.view.scan(prefix)
        ok, reply = await self._call(
            lambda: self._scan(prefix), bound=max(self.timeout, SCAN_TIMEOUT)
        )
        if ok:
            return list(reply)
        if self.on_failure is StoreFailurePolicy.LOCAL:
            return await self.fallback.scan(prefix)
        return []

    async def _scan(self, prefix: str) -> list[Entry]:
        match = _scan_pattern(self.key_prefix, prefix)
        entries = []
        async for name in self._client.scan_iter(match=match, count=1000):
            key = _caller_key(self.key_prefix, name)
            if not key.startswith(prefix):
                continue
            reply = await self._scripts["GET"](keys=[name])
            if reply and int(reply[1]) > 0:
                entries.append(Entry(key, _text(reply[0]), int(reply[1]) / 1000))
        return entries

    # -- shared connection counts (mailedge.limits.SharedCounts) ---------------------------------

    async def take_connection(self, key: str, limit: int) -> str | Literal[False] | None:
        """A slot under ``key`` if fewer than ``limit`` are held by every process together.

        The member's token when taken, False at the limit, None when Redis did not answer
        within ``timeout`` (under every ``onFailure`` the server's local count then decides:
        it is never looser than one process's share, and never refuses for an outage).

        A slot this process kept after its connection closed (a spare) is reused with no
        round trip.
        """
        spares = self._spares.get(key)
        now = trio.current_time()
        while spares:
            member, kept_until = spares.pop()
            if now < kept_until:
                self._slots.setdefault(key, set()).add(member)
                return member
            self._give_back(redis_key(self.key_prefix, key), member, now + self.connection_lease)
        member = f"{self._member_prefix}{next(self._member_numbers)}"
        name = redis_key(self.key_prefix, key)
        lease_ms = math.ceil(self.connection_lease * 1000)

        def give_back() -> None:
            self._give_back(name, member, trio.current_time() + self.connection_lease)

        # Taken for a connection that was cancelled or gave up waiting, or perhaps taken by a
        # call that failed: free it now, not when its lease runs out.
        reply = await self._submit(
            Op(
                name,
                "t",
                limit,
                member,
                lease_ms,
                undo=lambda reply: give_back() if reply[0] else None,
                lost=give_back,
            )
        )
        if reply is None:
            return None
        if not reply[0]:
            return False
        self._slots.setdefault(key, set()).add(member)
        self._spare_caps[key] = spare_cap(limit)
        return member

    def _give_back(self, name: str, member: str, lapses_at: float) -> None:
        """Remove a slot; if that call fails too, the keeper tries again until it lapses."""

        def retry() -> None:
            self._orphans[name, member] = lapses_at

        self._batcher.background(Op(name, "x", "", member, lost=retry))

    def release_connection(self, key: str, token: str) -> None:
        """Keep the slot as a spare for the client's next connection, or remove it in the
        background (it expires anyway)."""
        members = self._slots.get(key)
        if members is not None:
            members.discard(token)
            if not members:
                del self._slots[key]
        now = trio.current_time()
        spares = self._spares.setdefault(key, [])
        if len(spares) < self._spare_caps.get(key, 0):
            spares.append((token, now + self.leases.seconds))
            return
        if not spares:
            del self._spares[key]
        self._give_back(redis_key(self.key_prefix, key), token, now + self.connection_lease)

    @property
    def connection_slots(self) -> int:
        """How many shared connection slots this process holds for open connections."""
        return sum(map(len, self._slots.values()))

    @property
    def spare_slots(self) -> int:
        """How many slots this process keeps for clients' next connections."""
        return sum(map(len, self._spares.values()))

    async def _keeper(self) -> None:
        """Every heartbeat: renew the slots held, retry removing orphaned ones, and hand back
        expired leases' tokens."""
        while True:
            await trio.sleep(self.connection_heartbeat)
            lease_ms = math.ceil(self.connection_lease * 1000)
            now = trio.current_time()
            for key, spares in list(self._spares.items()):
                name = redis_key(self.key_prefix, key)
                kept = [(member, until) for member, until in spares if now < until]
                for member, _ in set(spares) - set(kept):
                    self._give_back(name, member, now + self.connection_lease)
                if kept:
                    self._spares[key] = kept
                else:
                    del self._spares[key]
                    self._spare_caps.pop(key, None)
                for member, _ in kept:
                    self._batcher.background(Op(name, "n", lease_ms, member))
            for key, members in self._slots.items():
                name = redis_key(self.key_prefix, key)
                for member in members:
                    self._batcher.background(Op(name, "n", lease_ms, member))
            orphans, self._orphans = self._orphans, {}
            for (name, member), lapses_at in orphans.items():
                if now < lapses_at:
                    self._give_back(name, member, lapses_at)
            for key, interval, unused in self.leases.sweep(now):
                name = redis_key(self.key_prefix, key)
                self._batcher.background(Op(name, "r", round(interval * 1e6), unused))

    def _journal_write(self, key: str, value: str | None, ttl: float) -> None:
        self._journal.pop(key, None)
        self._journal[key] = (value, trio.current_time() + ttl)
        while len(self._journal) > MAX_JOURNAL:
            del self._journal[next(iter(self._journal))]

    # -- read-only counters for metrics (the batcher's are private) -----------------------------

    @property
    def batches(self) -> int:
        """Round trips the batcher made: calls of the ``BATCH`` script, decisions and
        background operations together."""
        return self._batcher.batches

    @property
    def operations(self) -> int:
        """Operations sent in those round trips."""
        return self._batcher.sent

    @property
    def dropped_operations(self) -> int:
        """Background operations dropped because the batcher's queue was full (Redis away)."""
        return self._batcher.dropped


@asynccontextmanager
async def open_store(settings: StoreSettings) -> AsyncIterator[RateStore]:
    """The store ``settings`` name, running for the duration of the ``async with``."""
    if settings.backend is StoreBackend.MEMORY:
        yield MemoryStore()
        return
    async with RedisStore.from_settings(settings) as store:
        yield store
