"""Redis clients under trio, and ban propagation between two RedisStore processes.

Starts its own ``redis-server`` (Debian's) on a unix socket in a temporary directory, then:

1. **Client CPU per decision.** The GCRA script of :mod:`mailedge.hooks._redis_scripts`, run
   by SHA, with coredis 6.x (anyio) and valkey-glide 2.x, each under ``trio.run`` in this
   process: ``--calls`` decisions one at a time, then the same number from 100 concurrent
   tasks. CPU is this process's ``time.process_time`` (the server is another process), per
   decision. The numbers that matter are the ratios between clients within one run.
2. **Ban propagation.** A second process runs a :class:`~mailedge.hooks.redis.RedisStore` and
   sets ``--bans`` bans, one every 20 ms, each carrying its wall-clock send time; this process's
   store waits for each in its local view and records the delay. Reported: p50, p99, max
   (target: p99 at most 100 ms).

``--quick`` is a seconds-long smoke run. A client that is not installed is skipped.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from mailedge.hooks import _redis_scripts as scripts

CONCURRENCY = 100
KEY = "mailedge:bench:{198.51.100.7}"
# A limit no benchmark reaches: every decision does the full read-compute-write.
ARGS = [1, 1_000_000_000]


def start_redis(directory: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: apt-get install redis-server")
    path = directory / "redis.sock"
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(path), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                return process
        except OSError:
            time.sleep(0.01)
    process.kill()
    sys.exit("redis-server did not start")


async def measure(call: Callable[[], Awaitable[Any]], calls: int) -> tuple[float, float]:
    """CPU µs per call: one at a time, then from CONCURRENCY tasks."""
    for _ in range(50):
        await call()
    start = time.process_time()
    for _ in range(calls):
        await call()
    sequential = (time.process_time() - start) / calls * 1e6

    async def task(count: int) -> None:
        for _ in range(count):
            await call()

    start = time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(task, calls // CONCURRENCY)
    concurrent = (time.process_time() - start) / (calls // CONCURRENCY * CONCURRENCY) * 1e6
    return sequential, concurrent


async def bench_coredis(path: Path, calls: int) -> tuple[float, float]:
    import coredis
    from coredis.retry import NoRetryPolicy

    client = coredis.Redis(unix_socket_path=str(path), retry_policy=NoRetryPolicy())
    async with client:
        script = client.register_script(scripts.GCRA)
        return await measure(lambda: script(keys=[KEY], args=ARGS), calls)


async def bench_glide(path: Path, calls: int) -> tuple[float, float]:
    from glide import GlideClient, GlideClientConfiguration, NodeAddress, Script

    config = GlideClientConfiguration([NodeAddress(unix_socket_path=str(path))])
    client = await GlideClient.create(config)
    try:
        script = Script(scripts.GCRA)
        return await measure(
            lambda: client.invoke_script(script, keys=[KEY], args=[str(a) for a in ARGS]),
            calls,
        )
    finally:
        await client.close()


_SENDER = """
import sys, time, trio
from mailedge.hooks.redis import RedisStore

async def main(url, count):
    async with RedisStore(url=url, timeout=1.0) as store:
        await trio.sleep(0.5)
        for n in range(count):
            await store.set(f"ab:ban:10.0.{n // 256}.{n % 256}", repr(time.time()), 600.0)
            await trio.sleep(0.02)

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


async def ban_propagation(url: str, count: int) -> list[float]:
    from mailedge.hooks.redis import BanView, RedisStore

    delays: list[float] = []
    async with RedisStore(url=url, timeout=1.0) as store, trio.open_nursery() as nursery:
        sender = [sys.executable, "-c", _SENDER, url, str(count)]
        nursery.start_soon(functools.partial(trio.run_process, sender, check=True))
        for n in range(count):
            key = f"ab:ban:10.0.{n // 256}.{n % 256}"

            def arrived(view: BanView, key: str = key) -> bool:
                return view.get(key) is not None

            with trio.fail_after(30):
                await store.view.wait_for(arrived)
            entry = store.view.get(key)
            assert entry is not None
            delays.append(time.time() - float(entry.value))
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--bans", type=int, default=300)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    if options.quick:
        options.calls, options.bans = 500, 30
    directory = Path(tempfile.mkdtemp(prefix="mailedge-redis-bench-"))
    server = start_redis(directory)
    path = directory / "redis.sock"
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {options.calls} calls")
        print(f"{'client':<16} {'1 at a time':>14} {f'{CONCURRENCY} concurrent':>16}")
        results: dict[str, tuple[float, float]] = {}
        for name, bench in (("coredis", bench_coredis), ("valkey-glide", bench_glide)):
            try:
                results[name] = trio.run(bench, path, options.calls)
            except ImportError as error:
                print(f"{name:<16} skipped: {error}")
                continue
            seq, conc = results[name]
            print(f"{name:<16} {seq:>11.0f} µs {conc:>13.0f} µs")
        if len(results) == 2:
            (s1, c1), (s2, c2) = results["coredis"], results["valkey-glide"]
            print(f"coredis / glide: {s1 / s2:.2f}x one at a time, {c1 / c2:.2f}x concurrent")
        delays = trio.run(ban_propagation, f"unix://{path}", options.bans)
        delays.sort()
        p99 = delays[min(len(delays) - 1, round(0.99 * len(delays)))]
        print(
            f"ban propagation over {len(delays)} bans: p50 {statistics.median(delays) * 1e3:.1f}"
            f" ms, p99 {p99 * 1e3:.1f} ms, max {delays[-1] * 1e3:.1f} ms (target p99 <= 100 ms)"
        )
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
