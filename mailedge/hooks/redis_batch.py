"""Concurrent store decisions share one round trip: the batcher behind ``RedisStore``.

One Redis call costs a Python process about as much CPU as a whole connection (most of it in
the client library and the task switches around the reply), and connections arrive together
when the server is busy. So decisions are not sent one by one: each is queued as an
:class:`Op`, and one task sends everything queued as one call of the ``BATCH`` script
(:mod:`._redis_scripts`), then everything that queued meanwhile, and so on. One decision alone
goes out at once, so an idle server waits for nothing; a busy one pays one round trip for
many decisions.

A caller waits at most its timeout for its reply. If it stops waiting (timed out, or
cancelled) before its operation was sent, the operation is dropped; if after, the operation's
``undo`` runs when the reply comes (a slot taken for nobody is given back, tokens granted to
nobody are handed back), so a cancelled caller never leaves state behind. When the call fails
after it may have reached Redis, ``lost`` runs (a slot that may have been taken is given
back anyway; giving back one that was not is harmless).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

__all__ = ["MAX_BATCH", "MAX_QUEUE", "Batcher", "Op", "Reply"]

logger = logging.getLogger("mailedge.hooks.redis")

# Decisions per call: a few hundred keep one script run well under a millisecond of Redis
# time (other clients wait while a script runs), and more than a busy server has in flight.
MAX_BATCH = 256
# Background operations (slot releases, renewals, hand-backs) waiting while Redis is away;
# beyond this many the newest are dropped: each expires on Redis by itself anyway.
MAX_QUEUE = 10_000

# Background operations wait this long for a decision to ride along with (a connection's
# slot release goes out with the next connection's decision); alone, they go after it. Short,
# because another process may be waiting for the slot a release frees.
BACKGROUND_DELAY = 0.02

# Two integers per operation, as the BATCH script returns them.
Reply = tuple[int, int]


@attrs.define(repr=False, eq=False, slots=True)
class Op:
    """One operation of the ``BATCH`` script on one key (see ``_redis_scripts.BATCH``)."""

    key: str
    code: str
    a: str | int = ""
    b: str | int = ""
    c: str | int = ""
    # Run with the reply when nobody waits for it any more (the caller timed out or left).
    undo: Callable[[Reply], None] | None = None
    # Run when the call failed after it may have reached Redis (or was never made): the
    # outcome is unknown.
    lost: Callable[[], None] | None = None
    # Run with the reply, whoever waits for it.
    then: Callable[[Reply], None] | None = None
    reply: Reply | None = None
    done: trio.Event | None = None
    abandoned: bool = False

    def __repr__(self) -> str:
        return f"<Op {self.code} {self.key}>"


# The store's guarded call: (True, reply) or (False, None), never raising, within its timeout.
Call = Callable[[list[str], list[str | int]], Awaitable[tuple[bool, Any]]]


@attrs.define(repr=False)
class Batcher:
    """Sends queued :class:`Op` s through ``call``, as many per round trip as are waiting.

    ``group`` (for a Redis Cluster) names the part of a key that picks its slot: operations of
    different groups go in separate, concurrent calls, since one script may only touch keys of
    one slot. Counters: ``batches`` (calls made) and ``sent`` (operations in them).
    """

    call: Call
    max_batch: int = MAX_BATCH
    max_queue: int = MAX_QUEUE
    background_delay: float = BACKGROUND_DELAY
    group: Callable[[str], str] | None = None
    batches: int = attrs.field(default=0, init=False)
    sent: int = attrs.field(default=0, init=False)
    dropped: int = attrs.field(default=0, init=False)
    _queue: list[Op] = attrs.field(factory=list, init=False)
    # Set when anything is queued, and when a decision someone waits for is.
    _queued: trio.Event = attrs.field(factory=trio.Event, init=False)
    _urgent: trio.Event = attrs.field(factory=trio.Event, init=False)

    def __repr__(self) -> str:
        return f"<Batcher queued={len(self._queue)} batches={self.batches} sent={self.sent}>"

    def background(self, op: Op) -> None:
        """Queue an operation nobody waits for (it may be dropped if Redis stays away)."""
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            if op.lost is not None:
                op.lost()
            return
        self._queue.append(op)
        self._queued.set()

    async def submit(self, op: Op, wait: float) -> Reply | None:
        """Queue ``op`` and wait at most ``wait`` seconds for its reply; None if none came."""
        op.done = trio.Event()
        self._queue.append(op)
        self._queued.set()
        self._urgent.set()
        try:
            with trio.move_on_after(wait):
                await op.done.wait()
        finally:
            if not op.done.is_set():
                op.abandoned = True
        return op.reply

    async def run(self) -> None:
        """Send what is queued, batch after batch, until cancelled.

        A decision someone waits for goes at once, with everything queued; while decisions
        keep coming, what queued during one call goes in the next. Operations nobody waits
        for wait ``background_delay`` for one (or for each other) before they go.
        """
        while True:
            await self._queued.wait()
            if not self._urgent.is_set():
                with trio.move_on_after(self.background_delay):
                    await self._urgent.wait()
            while self._queue:
                self._queued = trio.Event()
                self._urgent = trio.Event()
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                if any(op.done is not None for op in self._queue):
                    self._urgent.set()  # more waiting decisions than one batch holds
                # A caller that stopped waiting before its operation left decided without it.
                batch = [op for op in batch if not op.abandoned]
                if self.group is None:
                    await self._send(batch)
                else:
                    groups: dict[str, list[Op]] = {}
                    for op in batch:
                        groups.setdefault(self.group(op.key), []).append(op)
                    async with trio.open_nursery() as nursery:
                        for ops in groups.values():
                            nursery.start_soon(self._send, ops)
                if not self._urgent.is_set():
                    break  # only operations nobody waits for: they wait their delay
            if self._queue:
                self._queued.set()

    async def _send(self, ops: list[Op]) -> None:
        if not ops:
            return
        keys = [op.key for op in ops]
        # One argument per operation (the BATCH script splits it at the commas).
        args: list[str | int] = [f"{op.code},{op.a},{op.b},{op.c}" for op in ops]
        self.batches += 1
        self.sent += len(ops)
        ok, reply = await self.call(keys, args)
        for index, op in enumerate(ops):
            if ok:
                op.reply = (int(reply[2 * index]), int(reply[2 * index + 1]))
                if op.then is not None:
                    op.then(op.reply)
                if op.abandoned and op.undo is not None:
                    op.undo(op.reply)
            elif op.lost is not None:
                op.lost()
            if op.done is not None:
                op.done.set()
