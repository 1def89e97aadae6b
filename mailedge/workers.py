"""Worker processes on one host: the parent binds, N trio workers serve the same sockets.

Usable by any trio server, in three pieces:

- :func:`bind_listeners` (parent): every listener's sockets, bound once before any worker
  starts, so a bind error is one error in one process and port 0 means one port for all.
  With ``reuse_port`` each worker gets its own ``SO_REUSEPORT`` socket per address (the
  kernel spreads connections over them); without it they all share one socket.
- :class:`Supervisor` (parent): runs ``count`` copies of a command, each with its sockets
  passed as inherited descriptors (``pass_fds``, spawned, never forked from a running trio).
  A worker that dies is restarted with a backoff; SIGTERM and SIGINT are forwarded as SIGTERM
  (drain), SIGHUP as SIGHUP (reload), and the parent returns once every worker has exited.
- :func:`inherited` (worker): the sockets it was given, by listener name, for
  ``serve(..., sockets=...)``; its ``ready()`` tells the parent it serves (the parent starts
  counting as ready once every worker has said so, or died), and :func:`watch_parent` shuts
  the worker down when the parent goes away (workers run in their own process group, so a
  terminal's Ctrl-C reaches only the parent, which forwards it once).

On shared sockets the parent also keeps a :class:`~mailedge.spread.SpreadTable` that the
workers' accept loops use to take turns (:mod:`mailedge.spread`): without it, whichever
worker the scheduler runs first takes the next connection, dozens in a row.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import attrs
import trio

from mailedge.server import LISTEN_BACKLOG, BindError
from mailedge.settings import Settings
from mailedge.spread import SpreadTable, Turn, take_turns

__all__ = [
    "ENV_INDEX",
    "ENV_SOCKETS",
    "Inherited",
    "Supervisor",
    "Worker",
    "WorkerSockets",
    "bind_listeners",
    "inherited",
    "watch_parent",
    "worker_index",
]

logger = logging.getLogger("mailedge.workers")

# What a worker finds in its environment: its sockets' descriptors by listener (JSON) and the
# parent's pipe, and its number (0 .. count-1), for logs.
ENV_SOCKETS = "MAILEDGE_WORKER_SOCKETS"
ENV_INDEX = "MAILEDGE_WORKER_INDEX"

# A worker that dies is started again after a pause that doubles from RESTART_BACKOFF to
# RESTART_BACKOFF_MAX: a crash loop costs a few starts a minute, not a spinning CPU.
RESTART_BACKOFF = 0.5
RESTART_BACKOFF_MAX = 30.0
# A worker that lived this long was healthy: its next crash starts the backoff afresh.
HEALTHY_UPTIME = 60.0
# This many deaths in a row without a healthy run: the worker cannot start (a bad config, a
# missing module), so the parent stops them all and exits with an error instead of looping.
MAX_RESTARTS = 5

# By listener name, the listening sockets one worker serves.
WorkerSockets = dict[str, list[socket.socket]]


def _listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As trio.open_tcp_listeners does: a restart can rebind while old connections linger.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listeners(
    settings: Settings, count: int, *, reuse_port: bool = False
) -> list[WorkerSockets]:
    """Every listener's sockets for ``count`` workers: one list of sockets per worker.

    Shared (the default): every worker gets the same sockets. ``reuse_port``: worker ``i``
    gets its own ``SO_REUSEPORT`` socket for each address, all on one port (the first one's,
    when the config asks for port 0). Raises :class:`~mailedge.server.BindError` with nothing
    left open.
    """
    per_worker: list[WorkerSockets] = [{} for _ in range(count)]
    opened: list[socket.socket] = []
    try:
        for conf in settings.listeners:
            for bind in conf.bind:
                host, port = str(bind.host), bind.port
                copies = count if reuse_port else 1
                for index in range(copies):
                    try:
                        sock = _listening_socket(host, port, reuse_port=reuse_port)
                    except OSError as exc:
                        raise BindError(conf.name, f"{host}:{port}", exc) from exc
                    opened.append(sock)
                    # Port 0: the rest of the copies join the port the first one got.
                    port = sock.getsockname()[1]
                    targets = [per_worker[index]] if reuse_port else per_worker
                    for sockets in targets:
                        sockets.setdefault(conf.name, []).append(sock)
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return per_worker


def _shared(sockets: Sequence[WorkerSockets]) -> list[socket.socket]:
    """The sockets every worker shares, in the order each worker describes them; or none."""
    flat = [[s for socks in worker.values() for s in socks] for worker in sockets]
    if len(flat) < 2 or any(
        len(other) != len(flat[0]) or any(a is not b for a, b in zip(other, flat[0], strict=True))
        for other in flat[1:]
    ):
        return []
    return flat[0]


def worker_index() -> int | None:
    """This process's worker number, or None when it is not a worker."""
    value = os.environ.get(ENV_INDEX)
    return int(value) if value is not None else None


@attrs.frozen
class Inherited:
    """What a worker got from its parent: sockets by listener, and two pipes.

    ``parent_fd`` reaches end of file when the parent is gone (:func:`watch_parent`);
    :meth:`ready` tells the parent this worker serves (its signals are caught).
    """

    sockets: WorkerSockets
    parent_fd: int
    ready_fd: int

    def ready(self) -> None:
        """Tell the parent this worker is serving; call once, after catching signals."""
        try:
            os.write(self.ready_fd, b"r")
        finally:
            os.close(self.ready_fd)


def inherited() -> Inherited | None:
    """In a worker: what the parent passed down; None when this process is not a worker."""
    value = os.environ.get(ENV_SOCKETS)
    if value is None:
        return None
    described = json.loads(value)
    sockets = {
        name: [socket.socket(fileno=fd) for fd in fds]
        for name, fds in described["listeners"].items()
    }
    spread = described.get("spread")
    if spread is not None:
        # Shared sockets: row k of the table is the k-th socket, in this order.
        flat = [sock for socks in sockets.values() for sock in socks]
        table = SpreadTable.attach(spread["fd"], spread["workers"], len(flat))
        for row, sock in enumerate(flat):
            take_turns(sock, Turn(table, row, int(os.environ[ENV_INDEX])))
    for socks in sockets.values():
        for sock in socks:
            sock.setblocking(False)
    return Inherited(sockets, int(described["parent"]), int(described["ready"]))


async def watch_parent(fd: int, on_gone: Callable[[], None]) -> None:
    """Call ``on_gone`` once the parent's end of the pipe closes (it exited, or was killed)."""
    stream = trio.lowlevel.FdStream(fd)
    async with stream:
        while await stream.receive_some(64):
            pass
    logger.warning("worker %s: the parent process is gone; shutting down", worker_index())
    on_gone()


@attrs.define(eq=False, repr=False)
class Worker:
    """One worker slot: its sockets, its current process, and its restart history."""

    index: int
    sockets: WorkerSockets
    process: trio.Process | None = None
    # Deaths in a row without a healthy run; starts counts every start.
    failures: int = 0
    starts: int = 0
    pids: list[int] = attrs.field(factory=list)

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"<Worker {self.index} pid={pid} starts={self.starts}>"


@attrs.define(repr=False)
class Supervisor:
    """Runs ``count`` workers of ``command`` on pre-bound sockets until they have all drained.

    ``command`` is the worker's argv (``[sys.executable, "-m", "myserver"]``); it finds its
    sockets with :func:`inherited`. ``env`` is added to the environment of every worker.
    ``on_exit(pid)`` is called after a worker process exits (prometheus-client's
    ``mark_process_dead``, say).
    """

    command: Sequence[str]
    sockets: list[WorkerSockets]
    env: Mapping[str, str] = attrs.field(factory=dict)
    on_exit: Callable[[int], None] | None = None
    restart_backoff: float = RESTART_BACKOFF
    workers: list[Worker] = attrs.field(init=False)
    stopping: bool = attrs.field(default=False, init=False)
    # Set when a worker kept dying (MAX_RESTARTS): the parent exits with an error.
    failed: bool = attrs.field(default=False, init=False)
    _stopped: trio.Event = attrs.field(factory=trio.Event, init=False)
    # Shared sockets only: who took how many connections, while run() runs.
    _table: SpreadTable | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.workers = [Worker(i, s) for i, s in enumerate(self.sockets)]

    def __repr__(self) -> str:
        return f"<Supervisor workers={len(self.workers)} stopping={self.stopping}>"

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.process is not None]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every worker, then supervise them; signals are handled here.

        With ``nursery.start``, it returns once every worker has said it is ready (or died).
        """
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        shared = _shared(self.sockets)
        if shared:
            self._table = SpreadTable.create(len(self.workers), len(shared))
        try:
            with trio.open_signal_receiver(*signals) as received:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._forward, received)
                    async with trio.open_nursery() as workers:
                        for worker in self.workers:
                            await workers.start(self._keep, worker)
                        task_status.started()
                    nursery.cancel_scope.cancel()
        finally:
            if self._table is not None:
                self._table.close()
                self._table = None

    def stop(self) -> None:
        """Drain: SIGTERM to every worker, and no more restarts."""
        self.stopping = True
        self._stopped.set()
        self.signal(signal.SIGTERM)

    def signal(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    async def _forward(self, received: AsyncIterator[int]) -> None:
        async for signum in received:
            if signum == signal.SIGHUP:
                logger.info("SIGHUP: reloading %d worker(s)", len(self.workers))
                self.signal(signal.SIGHUP)
            elif not self.stopping:
                logger.info(
                    "%s: draining %d worker(s)", signal.Signals(signum).name, len(self.pids)
                )
                self.stop()
            else:
                logger.warning(
                    "%s again: workers close their sessions now", signal.Signals(signum).name
                )
                self.signal(signal.SIGTERM)

    async def _keep(self, worker: Worker, *, task_status: trio.TaskStatus[None]) -> None:
        """Run one worker slot: start, wait, restart with a backoff, until stopping."""
        backoff = self.restart_backoff
        started = False
        while not self.stopping:
            began = trio.current_time()
            read_end, write_end = os.pipe()
            ready_read, ready_write = os.pipe()
            try:
                process = await self._spawn(worker, read_end, ready_write)
            finally:
                os.close(read_end)
                os.close(ready_write)
            # One byte once it serves, or end of file if it died first.
            async with trio.lowlevel.FdStream(ready_read) as ready:
                if await ready.receive_some(1):
                    logger.info("worker %d ready (pid %d)", worker.index, process.pid)
                    if self._table is not None:
                        self._table.serving(worker.index, True)
            if not started:
                task_status.started()
                started = True
            try:
                code = await process.wait()
            finally:
                # Closing our end tells a worker that outlives us (we were cancelled) to stop.
                os.close(write_end)
            worker.process = None
            if self._table is not None:
                self._table.serving(worker.index, False)
            if self.on_exit is not None:
                self.on_exit(process.pid)
            if self._stopped.is_set():
                logger.info("worker %d (pid %d) exited: %s", worker.index, process.pid, code)
                return
            if trio.current_time() - began >= HEALTHY_UPTIME:
                worker.failures, backoff = 0, self.restart_backoff
            worker.failures += 1
            if worker.failures > MAX_RESTARTS:
                logger.error(
                    "worker %d died %d times in a row; stopping every worker",
                    worker.index,
                    worker.failures,
                )
                self.failed = True
                self.stop()
                return
            logger.warning(
                "worker %d (pid %d) died (%s); restarting in %g s",
                worker.index,
                process.pid,
                _describe_exit(code),
                backoff,
            )
            with trio.move_on_after(backoff):
                await self._stopped.wait()
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)

    async def _spawn(self, worker: Worker, parent_fd: int, ready_fd: int) -> trio.Process:
        fds = [s.fileno() for socks in worker.sockets.values() for s in socks]
        described: dict[str, object] = {
            "listeners": {
                name: [s.fileno() for s in socks] for name, socks in worker.sockets.items()
            },
            "parent": parent_fd,
            "ready": ready_fd,
        }
        if self._table is not None:
            self._table.level(worker.index)
            described["spread"] = {"fd": self._table.fd, "workers": self._table.workers}
            fds.append(self._table.fd)
        env = {
            **os.environ,
            **self.env,
            ENV_SOCKETS: json.dumps(described),
            ENV_INDEX: str(worker.index),
        }
        process = await trio.lowlevel.open_process(
            list(self.command),
            env=env,
            pass_fds=[*fds, parent_fd, ready_fd],
            # Its own process group: a terminal's Ctrl-C reaches the parent, which forwards it.
            process_group=0,
            stdin=subprocess.DEVNULL,
        )
        worker.process = process
        worker.starts += 1
        worker.pids.append(process.pid)
        logger.info("worker %d started (pid %d)", worker.index, process.pid)
        return process


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
