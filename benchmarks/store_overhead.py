"""What sharing costs: server CPU per connection on RedisStore vs MemoryStore, and accuracy.

Starts its own ``redis-server`` (Debian's) on a unix socket in a temporary directory, then:

1. **Server CPU per proxied connection**, with a connection rate limit (``rateLimitConnections``,
   high enough to let every connection in, so each one runs the full GCRA step) and auto-ban
   (a ban check per connection) active. The server runs in a child process (``--child``) with
   one store: ``memory``, ``redis``, or ``redis`` with ``maxConnectionsPerIp`` shared as well
   (``redis+counts``). This process opens ``--connections`` connections, each with a PROXY v2
   header, after a warm-up past each client's first leases, in three workloads (``WORKLOADS``):
   ``repeat`` (256 clients in turn, one connection at a time), ``one-off`` (every connection a
   new client), ``busy`` (new clients, 16 at a time), all under a limit far above what they
   send, and ``one-off, exact`` (new clients under a limit small enough to be decided exactly,
   one Redis step per decision: the worst case). The child reports its own
   ``time.process_time`` and how many Redis calls it made (redis-server's CPU is reported
   apart). Each workload runs ``--rounds`` rounds, the stores taking turns within each; the
   medians are compared, since one measurement on a shared machine moves by a tenth or more.
   The number that matters is the ratio to ``memory`` within one workload of one run
   (target: redis at most 1.25x).
2. **Limit accuracy across 4 processes**: four processes, each with its own ``RedisStore``,
   ask for one GCRA limit (``--rate`` per second, burst 1) as fast as they can for
   ``--seconds``; allowed in total vs the configured rate (target: within 10%).
3. **Worker spread**: ``mailedge.workers`` with 2 workers running the real server (``serve``)
   on one shared socket and with ``SO_REUSEPORT``, 400 connections one after another and 20
   clients at once, 3 runs each; what each worker took (target: 40/60 or better in every
   run), and connections per second. ``--spread`` runs this part alone (no Redis needed).

``--quick`` is a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import ipaddress
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio
from redis_clients import start_redis

from mailedge.proxy import InetAddress, encode_v2

SERVER_CONFIG = """\
[SystemSettings]
proxyTrustedNetworks = ["127.0.0.1"]

[[NetworkListener]]
name = "smtp"
protocol = "smtp"
bind = ["127.0.0.1:0"]
rateLimitConnections = "{rate}"
maxConnectionsPerIp = 100
"""
# Far above what the benchmark sends: every connection is allowed, after the full GCRA step.
LARGE_LIMIT = "100000/1s"
# A burst below 10: no lease and no credit, every decision one exact step in Redis. Each
# client of the workload that uses it connects once, so every connection is still allowed.
EXACT_LIMIT = "5/1m"
CLIENTS = 256
# The stores measured in part 1, in the order each round runs them.
KINDS = ("memory", "redis", "redis+counts")
# Connections at once in the "busy" workload.
CONCURRENCY = 16
# Eight connections per client before measuring: past the first leases, the steady state.
WARM_UP = 8 * CLIENTS


def process_cpu(pid: int) -> float:
    """A process's user+system CPU seconds, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- 1. the server, in a child process ------------------------------------------------------------


async def child(kind: str, url: str, rate: str) -> None:
    from mailedge.config import loads
    from mailedge.gate import ProxyGate
    from mailedge.hooks import HookChain
    from mailedge.hooks.autoban import AutoBan
    from mailedge.hooks.ratelimit import RateLimiter, RateLimitHooks
    from mailedge.hooks.redis import RedisStore
    from mailedge.hooks.store import MemoryStore, RateStore
    from mailedge.server import serve

    settings = loads(SERVER_CONFIG.format(rate=rate), format="toml")

    async def handler(stream: trio.abc.Stream, context: object) -> None:
        await stream.send_all(b"220 ok\r\n")

    async with trio.open_nursery() as nursery:
        store: RateStore
        if kind == "memory":
            store = MemoryStore()
        else:
            store = RedisStore(url=url, timeout=1.0)
            await nursery.start(store.run)
        gate = ProxyGate(settings)
        autoban = AutoBan(lambda: gate.settings, store)
        hooks = HookChain([autoban, RateLimitHooks(lambda: gate.settings, RateLimiter(store))])
        shared = store if kind == "redis+counts" and isinstance(store, RedisStore) else None
        server = await nursery.start(
            partial(
                serve, settings, {"smtp": handler}, gate=gate, hooks=hooks, shared_counts=shared
            )
        )
        print(server.addresses["smtp"][0][1], flush=True)
        with trio.open_signal_receiver(signal.SIGUSR1) as marks:
            async for _ in marks:
                calls = store._batcher.batches if isinstance(store, RedisStore) else 0
                print(time.process_time(), calls, flush=True)


def connect(port: int, header: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(header)
        while sock.recv(64):
            pass


def client_header(index: int) -> bytes:
    """A PROXY v2 header naming client number ``index`` (a distinct IPv4 address for each)."""
    source = ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.0.0.1")) + index)
    return encode_v2(
        source=InetAddress(source, 40000 + index % 20000),
        destination=InetAddress(ipaddress.ip_address("192.0.2.1"), 25),
    )


# The workloads: who connects, how many at once, and under which connection rate limit.
WORKLOADS = {
    # 256 clients in turn, one connection at a time: a client comes back every 256 connections,
    # like relays of large senders and users' mail clients.
    "repeat": (CLIENTS, 1, LARGE_LIMIT),
    # Every connection a new client, one at a time.
    "one-off": (0, 1, LARGE_LIMIT),
    # Every connection a new client, 16 at a time: a busy server.
    "busy": (0, CONCURRENCY, LARGE_LIMIT),
    # New clients one at a time under a small limit, which is decided exactly: the worst case.
    "one-off, exact": (0, 1, EXACT_LIMIT),
}


def cpu_per_connection(
    kind: str, url: str, connections: int, redis_pid: int, workload: str = "repeat"
) -> tuple[float, float, float]:
    """Server CPU, redis-server CPU and Redis calls, each per connection."""
    clients, concurrency, rate = WORKLOADS[workload]
    total = WARM_UP + connections
    headers = [client_header(i % clients if clients else i) for i in range(total)]
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, url, rate],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    port = int(process.stdout.readline())

    def mark() -> tuple[float, int]:
        process.send_signal(signal.SIGUSR1)
        cpu, calls = process.stdout.readline().split()  # type: ignore[union-attr]
        return float(cpu), int(calls)

    def run(first: int, count: int) -> None:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            for _ in pool.map(lambda i: connect(port, headers[i]), range(first, first + count)):
                pass

    try:
        run(0, WARM_UP)  # warm-up: imports, caches, scripts loaded, leases grown
        (start, calls_start), redis_start = mark(), process_cpu(redis_pid)
        run(WARM_UP, connections)
        (end, calls_end), redis_end = mark(), process_cpu(redis_pid)
    finally:
        process.terminate()
        process.wait(timeout=10)
    return (
        (end - start) / connections,
        (redis_end - redis_start) / connections,
        (calls_end - calls_start) / connections,
    )


# -- 2. accuracy across 4 processes ---------------------------------------------------------------


async def hammer(url: str, rate: float, seconds: float) -> None:
    from mailedge.hooks.redis import RedisStore

    allowed = 0
    async with RedisStore(url=url, timeout=1.0) as store:
        start = trio.current_time()
        while trio.current_time() - start < seconds:
            result = await store.gcra("rl:bench:198.51.100.7", 1 / rate, 0.0)
            allowed += result.allowed
    print(allowed, flush=True)


def accuracy(url: str, rate: float, seconds: float) -> tuple[int, float]:
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--hammer", url, str(rate), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    total = 0
    for process in processes:
        out, _ = process.communicate(timeout=seconds + 30)
        total += int(out)
    return total, rate * seconds


# -- 3. worker spread ------------------------------------------------------------------------------

SPREAD_CONFIG = """\
[[NetworkListener]]
name = "smtp"
protocol = "smtp"
bind = ["127.0.0.1:0"]
# Every connection of the concurrent phase is from 127.0.0.1: none may be refused.
maxConnectionsPerIp = 1000
"""
SPREAD_CONNECTIONS = 400
SPREAD_CLIENTS = 20
SPREAD_RUNS = 3


async def spread_worker() -> None:
    """One worker: the real server (``serve``) on the inherited sockets, greeting with its pid."""
    from mailedge.config import loads
    from mailedge.server import serve
    from mailedge.workers import inherited, watch_parent

    given = inherited()
    assert given is not None

    async def greet(stream: trio.abc.Stream, context: object) -> None:
        await stream.send_all(f"{os.getpid()}\n".encode())

    settings = loads(SPREAD_CONFIG, format="toml")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(serve, settings, {"smtp": greet}, sockets=given.sockets)
        )
        given.ready()
        nursery.start_soon(watch_parent, given.parent_fd, server.shutdown)
        await server.wait_stopped()
        nursery.cancel_scope.cancel()


async def served_by(port: int) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        line = b""
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(32)
            assert chunk, "closed before the greeting"
            line += chunk
    return line.decode().strip()


async def spread(reuse_port: bool, clients: int) -> tuple[list[int], float]:
    """SPREAD_CONNECTIONS connections to 2 workers, ``clients`` at a time: what each worker
    took (fewest first), and connections per second."""
    from mailedge.config import loads
    from mailedge.workers import Supervisor, bind_listeners

    settings = loads(SPREAD_CONFIG, format="toml")
    sockets = bind_listeners(settings, 2, reuse_port=reuse_port)
    port = sockets[0]["smtp"][0].getsockname()[1]
    supervisor = Supervisor([sys.executable, __file__, "--spread-worker"], sockets)
    served: collections.Counter[str] = collections.Counter()

    async def client(count: int) -> None:
        for _ in range(count):
            served[await served_by(port)] += 1

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            served.update({str(pid): 0 for pid in supervisor.pids})
            start = time.perf_counter()
            async with trio.open_nursery() as load:
                for _ in range(clients):
                    load.start_soon(client, SPREAD_CONNECTIONS // clients)
            elapsed = time.perf_counter() - start
            supervisor.stop()
    finally:
        for worker in sockets:
            for sock in worker["smtp"]:
                sock.close()
    return sorted(served.values()), SPREAD_CONNECTIONS / elapsed


def print_spread() -> None:
    print(f"3. 2 workers, {SPREAD_CONNECTIONS} connections to the real server, {SPREAD_RUNS} runs")
    for reuse in (False, True):
        name = "SO_REUSEPORT" if reuse else "shared socket"
        for clients in (1, SPREAD_CLIENTS):
            how = "sequential" if clients == 1 else f"{clients} at once"
            runs = [trio.run(spread, reuse, clients) for _ in range(SPREAD_RUNS)]
            shares = "  ".join(f"{few}/{many}" for (few, many), _ in runs)
            worst = min(few / (few + many) for (few, many), _ in runs)
            rate = statistics.median(r for _, r in runs)
            met = "met" if worst >= 0.4 else "NOT met"
            print(
                f"   {name:<13} {how:<11} {shares}   fewest {worst:.1%} ({met})"
                f"   {rate:5.0f} conn/s"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.connections, args.seconds = 300, 2.0
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        redis = start_redis(directory)
        url = f"unix://{directory / 'redis.sock'}"
        try:
            print(f"1. server CPU per proxied connection ({args.connections} connections)")
            print(f"   median of {args.rounds} rounds, the stores taking turns in each")
            for workload in WORKLOADS:
                print(f"   {workload}:")
                rounds: dict[str, list[tuple[float, float, float]]] = {}
                for _ in range(args.rounds):
                    for kind in KINDS:
                        rounds.setdefault(kind, []).append(
                            cpu_per_connection(kind, url, args.connections, redis.pid, workload)
                        )
                results = {
                    kind: tuple(statistics.median(column) for column in zip(*runs, strict=True))
                    for kind, runs in rounds.items()
                }
                base = results["memory"][0]
                for kind, (cpu, redis_cpu, calls) in results.items():
                    each = " ".join(f"{run[0] / base:.2f}" for run in rounds[kind])
                    print(
                        f"     {kind:<13} {cpu * 1e6:6.0f} us  ({cpu / base:.2f}x memory;"
                        f" rounds {each})   redis-server {redis_cpu * 1e6:4.0f} us"
                        f"   {calls:.3f} Redis calls"
                    )
            print(f"2. one limit of {args.rate:g}/s across 4 processes for {args.seconds:g} s")
            allowed, expected = accuracy(url, args.rate, args.seconds)
            error = (allowed - expected) / expected
            print(f"   allowed {allowed}, expected {expected:.0f} ({error:+.1%})")
            print_spread()
        finally:
            redis.terminate()
            redis.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--spread-worker":
        trio.run(spread_worker)
    elif len(sys.argv) > 1 and sys.argv[1] == "--spread":
        print_spread()
    elif len(sys.argv) > 1 and sys.argv[1] == "--child":
        trio.run(child, sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "--hammer":
        trio.run(hammer, sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
