"""A real ``redis-server`` for the store tests, on a unix socket in a temporary directory.

:class:`RedisServer` starts Debian's ``redis-server`` with no TCP port, no persistence and a
socket in its own directory, so tests never clash over ports or files. It can be paused
(SIGSTOP), resumed, killed and started again on the same socket, which is what the outage tests
need. :func:`require_redis` finds the binary or skips with the package to install; with
``MAILEDGE_REQUIRE_INTEROP=1`` (CI) it fails instead, like the interop tests' binaries.

For high availability, on TCP at 127.0.0.1 with free ports picked at start:
:class:`RedisSentinelSet` is a primary, its replica and a Sentinel watching them (with short
failover timings); :class:`RedisClusterSet` is a Cluster of three primaries built with
``redis-cli --cluster create``. Their set-up commands go through ``redis-cli``.

Waiting for the server is bounded and polls the socket (a real external server is the one
place the tests wait on the wall clock).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio
from interop_support import free_port, require_binary

from mailedge.hooks.redis import CircuitBreaker, RedisStore

__all__ = [
    "STARTUP_TIMEOUT",
    "RedisClusterSet",
    "RedisSentinelSet",
    "RedisServer",
    "TcpRedisServer",
    "require_redis",
    "require_redis_cli",
]

# redis-server answers within 10-20 ms of starting; 10 s covers a loaded CI machine.
STARTUP_TIMEOUT = 10.0


def require_redis() -> str:
    """The path of ``redis-server``; skip (or fail, in CI) when the package is missing."""
    return require_binary("redis-server", "redis-server")


def require_redis_cli() -> str:
    """The path of ``redis-cli`` (Debian's redis-tools, which redis-server depends on)."""
    return require_binary("redis-cli", "redis-tools")


@attrs.define
class RedisServer:
    """One ``redis-server`` process on ``directory/redis.sock``."""

    directory: Path
    binary: str = attrs.field(factory=require_redis)
    process: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False)

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self._answers():
                return
            time.sleep(0.01)
        raise RuntimeError(f"redis-server did not answer within {STARTUP_TIMEOUT} s")

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1.0)
                sock.connect(str(self.socket_path))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one command (RESP) and return the raw reply, for set-up behind the store's back."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5.0)
            sock.connect(str(self.socket_path))
            encoded = [arg.encode() for arg in args]
            frame = b"*%d\r\n" % len(encoded) + b"".join(
                b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in encoded
            )
            sock.sendall(frame)
            return sock.recv(65536)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.kill()
        self.process.wait(timeout=STARTUP_TIMEOUT)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()


# -- TCP servers: Sentinel and Cluster ------------------------------------------------------------

# Set-up waits (replication, Sentinel discovery, the Cluster agreeing): each is seconds at most
# here; 30 s covers a loaded CI machine and stays well inside the 120 s per-test timeout.
SETUP_TIMEOUT = 30.0
# The Sentinel's service name in the URLs the tests build.
SERVICE = "mymaster"


def _wait_until(what: str, check: Callable[[], bool], timeout: float = SETUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not within {timeout} s")


def _distinct_free_ports(count: int, taken: set[int]) -> list[int]:
    ports: list[int] = []
    for _ in range(100 * count):
        port = free_port()
        if port not in taken and port not in ports:
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError("no free ports")


@attrs.define
class TcpRedisServer:
    """One ``redis-server`` (or, with ``sentinel``, a Sentinel) on 127.0.0.1:``port``."""

    directory: Path
    port: int
    options: tuple[str, ...] = ()
    sentinel_config: str | None = None
    binary: str = attrs.field(factory=require_redis)
    cli: str = attrs.field(factory=require_redis_cli)
    process: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        common = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        if self.sentinel_config is not None:
            # A Sentinel rewrites its file, so it gets one of its own.
            config = self.directory / "sentinel.conf"
            config.write_text(self.sentinel_config)
            argv = [self.binary, str(config), "--sentinel", *common]
        else:
            argv = [self.binary, *common, "--save", "", "--appendonly", "no", *self.options]
        with (self.directory / "server.log").open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server on {self.port} exited with {self.process.returncode}"
                )
            if self.answers():
                return
            time.sleep(0.01)
        raise RuntimeError(f"redis-server on {self.port} did not answer in {STARTUP_TIMEOUT} s")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> str:
        """One command through ``redis-cli``; its text output."""
        done = subprocess.run(
            [self.cli, "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout

    def info(self, section: str) -> dict[str, str]:
        lines = self.command("INFO", section).splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def kill(self) -> None:
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(timeout=STARTUP_TIMEOUT)
        self.process = None

    def stop(self) -> None:
        self.kill()


@attrs.define
class RedisSentinelSet:
    """A primary, one replica and a Sentinel watching them, failing over within seconds.

    The URL lists a Sentinel address where nothing listens before the real one, so the client
    is seen to skip a dead Sentinel. One Sentinel with quorum 1 is enough to fail over here;
    production runs three (docs/scale-out.md).
    """

    directory: Path
    # How long the primary must be silent before the Sentinel calls it down, in ms. Short,
    # so that a failover takes about a second; production uses 5,000 or more.
    down_after_ms: int = 500
    primary: TcpRedisServer = attrs.field(init=False)
    replica: TcpRedisServer = attrs.field(init=False)
    sentinel: TcpRedisServer = attrs.field(init=False)
    dead_sentinel_port: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        primary, replica, sentinel, dead = _distinct_free_ports(4, set())
        self.dead_sentinel_port = dead
        # The replica's first sync starts at once, not after the default 5 s wait for more.
        self.primary = TcpRedisServer(
            self.directory / "primary", primary, ("--repl-diskless-sync-delay", "0")
        )
        self.replica = TcpRedisServer(
            self.directory / "replica", replica, ("--replicaof", "127.0.0.1", str(primary))
        )
        self.sentinel = TcpRedisServer(
            self.directory / "sentinel",
            sentinel,
            sentinel_config=(
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 2000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            ),
        )

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.dead_sentinel_port},{self.sentinel.address}/{SERVICE}"

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        # The Sentinel learns the replica from the primary's INFO: linked first.
        _wait_until(
            "the replica's link to the primary",
            lambda: self.replica.info("replication").get("master_link_status") == "up",
        )
        # ... and streaming: a primary holds back writes for a freshly synced replica until its
        # first acknowledgement, up to a second later.
        _wait_until(
            "the primary streaming to the replica",
            lambda: "state=online" in self.primary.info("replication").get("slave0", ""),
        )
        self.sentinel.start()
        _wait_until(
            "the Sentinel seeing the replica",
            lambda: (
                str(self.replica.port) in self.sentinel.command("SENTINEL", "REPLICAS", SERVICE)
            ),
        )

    def replicated(self) -> bool:
        """Whether the replica has acknowledged every write so far (WAIT, bounded at 5 s)."""
        return self.primary.command("WAIT", "1", "5000").strip() == "1"

    def primary_port(self) -> int:
        """The primary's port as the Sentinel reports it."""
        reply = self.sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE).split()
        return int(reply[1])

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.primary):
            server.stop()


@attrs.define
class RedisClusterSet:
    """A Cluster of ``size`` primaries (no replicas), each with its own bus port."""

    directory: Path
    size: int = 3
    nodes: list[TcpRedisServer] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        ports = _distinct_free_ports(2 * self.size, set())
        # The bus port is given explicitly (Redis 7's cluster-port): the default, port + 10000,
        # may not be free, or not even a port, for an ephemeral port.
        self.nodes = [
            TcpRedisServer(
                self.directory / f"node{index}",
                ports[2 * index],
                (
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    str(ports[2 * index + 1]),
                ),
            )
            for index in range(self.size)
        ]

    @property
    def url(self) -> str:
        # Two startup nodes of three: the client learns the third from the layout.
        return "redis+cluster://" + ",".join(node.address for node in self.nodes[:2])

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = self.nodes[0].cli
        subprocess.run(
            [cli, "--cluster", "create", *(n.address for n in self.nodes), "--cluster-yes"],
            capture_output=True,
            timeout=SETUP_TIMEOUT,
            check=True,
        )
        for node in self.nodes:
            _wait_until(
                f"cluster_state:ok on {node.address}",
                lambda node=node: "cluster_state:ok" in node.command("CLUSTER", "INFO"),  # type: ignore[misc]
            )

    def keys_per_node(self) -> list[list[str]]:
        return [node.command("KEYS", "*").split() for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# Generous for a loaded 2-core machine: the store tests check behaviour, not speed.
STORE_TIMEOUT = 2.0
# How often wait_until asks.
POLL = 0.05


def make_store(
    server: RedisServer | str, *, timeout: float = STORE_TIMEOUT, threshold: int = 3, **kwargs: Any
) -> RedisStore:
    """A store on ``server`` (or a URL) whose breaker probes every 0.1 s, so that a test
    sees recovery quickly; ``threshold`` errors in a row open it."""
    url = server if isinstance(server, str) else server.url
    kwargs.setdefault("breaker", CircuitBreaker(threshold=threshold, probe_interval=0.1))
    return RedisStore(url=url, timeout=timeout, **kwargs)


async def wait_until(predicate: Callable[[], Awaitable[bool] | bool], within: float) -> None:
    """Poll ``predicate`` on the real clock (Redis keeps its own time), a bounded number of
    times within ``within`` seconds."""
    with trio.fail_after(within):
        for _ in range(int(within / POLL) + 1):
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(POLL)
    raise AssertionError(f"not within {within} s")


async def until_shared(
    one: RedisStore, two: RedisStore, within: float, pause: float = POLL
) -> None:
    """Until an allowance one store takes refuses the other's next call on the same key: they
    share one Redis again (after a failover, or once a Cluster came up). Each try is a new
    key with a burst of 1, so no lease or credit can answer it locally."""
    with trio.fail_after(within):
        for attempt in range(1, int(within / pause) + 2):
            key = f"rl:shared:203.0.113.{attempt % 250}:{attempt}"
            if (await one.gcra(key, 10.0, 0.0)).allowed and not (
                await two.gcra(key, 10.0, 0.0)
            ).allowed:
                return
            await trio.sleep(pause)
    raise AssertionError(f"not sharing within {within} s")
