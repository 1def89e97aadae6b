"""Worker processes that share a listening socket take turns accepting from it.

Every worker waiting on a shared socket is woken by each new connection, and the first one
the scheduler runs takes it: on a busy machine that is the same worker dozens of times in a
row, and trio's ``accept`` then takes whatever else is queued before it waits again. So the
parent of the workers (:mod:`mailedge.workers`) keeps a :class:`SpreadTable` in shared
memory, how many connections each worker took from each shared socket, and each worker's
accept loop uses its socket's :class:`Turn` (found with :func:`turn_of`): one connection per
wake-up, and while this worker is more than ``SPREAD_LEAD`` ahead of a serving peer, a few
milliseconds for the others to take it first.
"""

from __future__ import annotations

import mmap
import os
import socket
import weakref

import attrs
import trio

__all__ = [
    "SPREAD_LEAD",
    "SPREAD_STEP",
    "SPREAD_STEPS",
    "SpreadTable",
    "Turn",
    "take_turns",
    "turn_of",
]

# A worker that took more than SPREAD_LEAD connections beyond the serving worker with the
# fewest leaves the next one to the others: two keeps the spread within a few connections
# of even without making every other connection wait.
SPREAD_LEAD = 2
# How long it leaves it: it looks again every SPREAD_STEP (1 ms, epoll's resolution), at most
# SPREAD_STEPS times, then takes the connection itself. A busy or stuck peer costs a new
# connection about 5 ms, never more: a loaded machine's wake-up delay, nothing next to SMTP's.
SPREAD_STEP = 0.001
SPREAD_STEPS = 5

# Each cell is one signed 64-bit integer.
_CELL = 8


@attrs.define(eq=False, repr=False)
class SpreadTable:
    """Shared memory: which workers serve, and how many connections each took per socket.

    ``workers`` serving flags, then one row of ``workers`` counts per shared socket. A worker
    writes only its own counts, the parent only the flags (and a replacement's counts, before
    it starts); a torn read would cost one decision, nothing more.
    """

    fd: int
    workers: int
    rows: int
    _map: mmap.mmap
    _cells: memoryview

    @classmethod
    def create(cls, workers: int, rows: int) -> SpreadTable:
        """A zeroed table (the parent's) in an anonymous memory file, for workers to attach."""
        fd = os.memfd_create("mailedge-spread", 0)
        try:
            os.ftruncate(fd, _CELL * workers * (rows + 1))
            return cls.attach(fd, workers, rows)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, workers: int, rows: int) -> SpreadTable:
        """The table in ``fd`` (a worker's view of the parent's); it owns ``fd`` from here."""
        mapped = mmap.mmap(fd, _CELL * workers * (rows + 1))
        return cls(fd, workers, rows, mapped, memoryview(mapped).cast("q"))

    def __repr__(self) -> str:
        return f"<SpreadTable workers={self.workers} rows={self.rows}>"

    def close(self) -> None:
        self._cells.release()
        self._map.close()
        os.close(self.fd)

    def serving(self, worker: int, flag: bool) -> None:
        """Mark ``worker`` as serving (ready) or not (exited); only serving peers count."""
        self._cells[worker] = int(flag)

    def taken(self, row: int, worker: int) -> int:
        return self._cells[self.workers * (row + 1) + worker]

    def take(self, row: int, worker: int) -> None:
        self._cells[self.workers * (row + 1) + worker] += 1

    def peers_taken(self, row: int, worker: int) -> int:
        """How many connections the serving peers of ``worker`` took on ``row``, together."""
        base = self.workers * (row + 1)
        return sum(
            self._cells[base + peer]
            for peer in range(self.workers)
            if peer != worker and self._cells[peer]
        )

    def ahead(self, row: int, worker: int) -> bool:
        """True when ``worker`` took more than SPREAD_LEAD beyond a serving peer on ``row``."""
        base = self.workers * (row + 1)
        mine = self._cells[base + worker]
        return any(
            self._cells[peer] and mine - self._cells[base + peer] > SPREAD_LEAD
            for peer in range(self.workers)
            if peer != worker
        )

    def level(self, worker: int) -> None:
        """Before a replacement starts: its counts become the fewest a serving peer has, so
        that it neither takes every connection until it has caught up, nor none."""
        peers = [p for p in range(self.workers) if p != worker and self._cells[p]]
        if not peers:
            return
        for row in range(self.rows):
            base = self.workers * (row + 1)
            self._cells[base + worker] = min(self._cells[base + p] for p in peers)


@attrs.define(eq=False, repr=False)
class Turn:
    """One worker's place at one shared socket: its row in the table and its column.

    A worker that waited its whole turn and saw no peer take anything does not wait again
    until a peer does: a peer that is stuck, or too busy to accept, must not cost every new
    connection the wait (which would cap this worker at SPREAD_STEPS steps per connection).
    """

    table: SpreadTable
    row: int
    worker: int
    # The peers' total when a whole wait went unanswered; None while they keep up.
    _stalled_at: int | None = attrs.field(default=None, init=False)

    def __repr__(self) -> str:
        return f"<Turn row={self.row} worker={self.worker}>"

    async def accept(self, listener: socket.socket) -> tuple[trio.socket.SocketType, object]:
        """One connection from ``listener``, once it is readable and this worker's turn.

        One per wake-up (trio's ``accept`` would take whatever is queued before it waits): the
        other workers woken by the same connections get their chance at the rest.
        """
        while True:
            await trio.lowlevel.wait_readable(listener)
            peers = self.table.peers_taken(self.row, self.worker)
            if self._stalled_at != peers:
                self._stalled_at = None
                for _ in range(SPREAD_STEPS):
                    if not self.table.ahead(self.row, self.worker):
                        break
                    await trio.sleep(SPREAD_STEP)
                else:
                    if self.table.peers_taken(self.row, self.worker) == peers:
                        self._stalled_at = peers
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                continue  # another worker took it
            self.table.take(self.row, self.worker)
            return trio.socket.from_stdlib_socket(sock), address


# Each shared listening socket's turn, for the accept loop (a socket holds no attributes).
_TURNS: weakref.WeakKeyDictionary[socket.socket, Turn] = weakref.WeakKeyDictionary()


def take_turns(listener: socket.socket, turn: Turn) -> None:
    """Accept from ``listener`` (shared with other workers) in turns: ``serve`` looks it up."""
    _TURNS[listener] = turn


def turn_of(listener: socket.socket) -> Turn | None:
    """``listener``'s turn, or None when this process is alone on it."""
    return _TURNS.get(listener)
