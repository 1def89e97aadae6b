"""How long a Sentinel failover stops two RedisStores from sharing, as the stores see it.

Each run starts a primary, its replica and one Sentinel on 127.0.0.1 (tests/support's
RedisSentinelSet: ``down-after-milliseconds`` 500), runs two stores on the Sentinel URL, kills
the primary with SIGKILL and measures until a GCRA allowance taken by one store refuses the
other's next call: sharing through the new primary. The stores probe every ``--probe`` s (the
store's default is 2 s). Prints every run and the median and maximum.

    python benchmarks/store_failover.py --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from redis_support import RedisSentinelSet, until_shared

from mailedge.hooks.redis import CircuitBreaker, RedisStore

# A failover here takes about a second; a run that has not shared again after this is a failure.
GIVE_UP = 60.0


async def one_failover(directory: Path, probe: float) -> float:
    servers = RedisSentinelSet(directory)
    await trio.to_thread.run_sync(servers.start)
    try:

        def make() -> RedisStore:
            breaker = CircuitBreaker(threshold=3, probe_interval=probe)
            return RedisStore(url=servers.url, timeout=0.5, breaker=breaker)

        async with make() as one, make() as two:
            assert (await one.gcra("rl:warm:192.0.2.1", 10.0, 0.0)).allowed
            assert not (await two.gcra("rl:warm:192.0.2.1", 10.0, 0.0)).allowed
            servers.primary.kill()
            killed = trio.current_time()
            await until_shared(one, two, GIVE_UP, pause=0.01)
            return trio.current_time() - killed
    finally:
        servers.stop()


async def main(runs: int, probe: float) -> None:
    times = []
    for run in range(runs):
        with tempfile.TemporaryDirectory() as directory:
            seconds = await one_failover(Path(directory), probe)
        times.append(seconds)
        print(f"run {run + 1}: shared again {seconds:.2f} s after the kill")
    print(f"median {statistics.median(times):.2f} s, max {max(times):.2f} s ({runs} runs)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--probe", type=float, default=0.1, help="breaker probe interval, s")
    args = parser.parse_args()
    trio.run(main, args.runs, args.probe)
