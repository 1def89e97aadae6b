"""RedisStore against a real redis-server: sharing, the ban view, outages and cancellation.

Each test starts its own ``redis-server`` on a unix socket (tests/support/redis_support.py).
Redis keeps its own time, so these tests run on the real clock; every wait is bounded and
waits for an event (a view change, a reply), except where a real server has to notice
something (a restart), which is polled a bounded number of times.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from redis_support import RedisServer, make_store, wait_until

from mailedge.config import loads
from mailedge.hooks.redis import (
    BanView,
    CircuitBreaker,
    RedisStore,
    hash_tag,
    open_store,
    redis_key,
)
from mailedge.hooks.store import Entry, MemoryStore
from mailedge.store_settings import StoreFailurePolicy, StoreSettings

pytest.importorskip("coredis")

# coredis 6.9's unclosed anyio streams after a failed connect are ignored suite-wide
# (pyproject.toml's filterwarnings): the garbage collector may report them in any later test.

BAN = "ab:ban:198.51.100.7"
# Generous for a loaded 2-core machine: these tests check behaviour, not speed.
SLOW = 2.0
# How long a propagated change may take to show in another process's view here.
PROPAGATION = 5.0


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    async with make_store(redis_server) as running:
        yield running


def keys(server: RedisServer) -> list[str]:
    reply = server.command("KEYS", "*").decode()
    return [line for line in reply.split("\r\n")[1:] if line and not line.startswith("$")]


# -- keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("rl:conn:smtp:198.51.100.7", "mailedge:rl:conn:smtp:{198.51.100.7}"),
        ("ab:ban:198.51.100.7", "mailedge:ab:ban:{198.51.100.7}"),
        ("ab:fail:2001:db8:1:2::/64", "mailedge:ab:fail:{2001:db8:1:2::/64}"),
        # An IPv6 client whose first group reads like a word still comes whole.
        ("ban:dead:beef::/64", "mailedge:ban:{dead:beef::/64}"),
        ("counter", "mailedge:counter"),
        # A scope that reads like hex is not taken for part of the address.
        ("rl:conn:add:192.0.2.1", "mailedge:rl:conn:add:{192.0.2.1}"),
        ("ban:192.0.2.0/24", "mailedge:ban:{192.0.2.0/24}"),
        ("ban:192.0.2.0/33", "mailedge:ban:192.0.2.0/33"),
        ("ban:2001:db8::/129", "mailedge:ban:2001:db8::/129"),
        ("ban:192.0.2.256", "mailedge:ban:192.0.2.256"),
    ],
)
def test_redis_key_puts_the_client_in_a_hash_tag(key: str, expected: str) -> None:
    assert redis_key("mailedge:", key) == expected
    assert hash_tag(expected) == (expected.partition("{")[2].rstrip("}") or expected)


def test_hash_tag_follows_redis_rules() -> None:
    assert hash_tag("a{b}c{d}") == "b"  # the first tag
    assert hash_tag("a{}b{c}") == "a{}b{c}"  # an empty first tag: the whole key
    assert hash_tag("a{b") == "a{b"


async def test_every_key_has_a_ttl_and_one_client_one_tag(
    store: RedisStore, redis_server: RedisServer
) -> None:
    await store.gcra("rl:conn:smtp:198.51.100.7", 1.0, 2.0)
    await store.hit("ab:fail:198.51.100.7", 60.0, 5)
    await store.set(BAN, "reason", 60.0)
    await store.set("note", "x", 5.0)
    names = keys(redis_server)
    assert len(names) == 4
    for name in names:
        assert name.startswith("mailedge:")
        pttl = int(redis_server.command("PTTL", name).decode().strip(":\r\n"))
        assert pttl > 0, name
    tags = {name[name.index("{") :] for name in names if "{" in name}
    assert tags == {"{198.51.100.7}"}


# -- scripts --------------------------------------------------------------------------------------


async def test_scripts_reload_after_script_flush(
    store: RedisStore, redis_server: RedisServer
) -> None:
    assert (await store.gcra("rl:x:192.0.2.1", 10.0, 0.0)).allowed
    assert redis_server.command("SCRIPT", "FLUSH").startswith(b"+OK")
    # Still answered by Redis (the limit holds), not by the fallback.
    assert not (await store.gcra("rl:x:192.0.2.1", 10.0, 0.0)).allowed
    await store.set("k", "v", 10.0)
    assert (await store.get("k")) is not None
    assert store.errors == 0 and store.fallbacks == 0


async def recovered(store: RedisStore) -> None:
    """Drive calls (each may be the breaker's probe) until Redis answers again; bounded."""
    with trio.fail_after(PROPAGATION * 2):
        while True:
            before = store.fallbacks
            await store.get("probe")
            if store.fallbacks == before and not store.breaker.is_open:
                return
            await trio.sleep(0.05)


async def test_scripts_reload_after_a_restart(store: RedisStore, redis_server: RedisServer) -> None:
    await store.set("k", "v", 10.0)
    redis_server.restart()
    await recovered(store)
    # The new server has no scripts and no data: the call loads its script and answers.
    assert await store.get("k") is None
    assert (await store.gcra("rl:x:192.0.2.1", 10.0, 0.0)).allowed
    assert not (await store.gcra("rl:x:192.0.2.1", 10.0, 0.0)).allowed


# -- sharing --------------------------------------------------------------------------------------


async def test_two_stores_share_one_gcra_limit(redis_server: RedisServer) -> None:
    async with make_store(redis_server) as one, make_store(redis_server) as two:
        key = "rl:conn:smtp:198.51.100.7"
        # 3 per 30 s: a burst of 3, then nothing for 10 s.
        assert (await one.gcra(key, 10.0, 20.0)).allowed
        assert (await two.gcra(key, 10.0, 20.0)).allowed
        assert (await one.gcra(key, 10.0, 20.0)).allowed
        assert not (await two.gcra(key, 10.0, 20.0)).allowed
        assert not (await one.gcra(key, 10.0, 20.0)).allowed
        assert (await one.hit("ab:fail:1", 60.0, 5)) == 1
        assert (await two.hit("ab:fail:1", 60.0, 5)) == 2


_WORKER = textwrap.dedent(
    """
    import json, sys, time, trio
    from mailedge.hooks.redis import RedisStore
    from mailedge.store_settings import StoreFailurePolicy

    async def main(url, interval, burst, seconds):
        # "closed": a call Redis did not answer is refused, so it can never inflate the count.
        async with RedisStore(url=url, timeout=2.0, on_failure=StoreFailurePolicy.CLOSED) as s:
            allowed = tries = 0
            start = time.time()
            while time.time() - start < seconds:
                tries += 1
                allowed += (await s.gcra("rl:shared:198.51.100.7", interval, burst)).allowed
            end = time.time()
        print(json.dumps({"allowed": allowed, "tries": tries, "start": start, "end": end,
                          "errors": s.errors}))

    trio.run(main, sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
    """
)


async def test_four_processes_share_one_limit_within_ten_percent(
    redis_server: RedisServer,
) -> None:
    # 100 per second with a burst of 30: the burst absorbs a loaded machine's scheduling gaps
    # (with none, every moment no process happened to ask would be lost), and is small enough
    # that every decision takes one token in one step (no lease below a burst of 40; each
    # process's first decision is credited, which a full bucket allows anyway).
    interval, seconds, burst_tokens = 0.01, 1.5, 30
    burst = (burst_tokens - 1) * interval
    command = [
        sys.executable,
        "-c",
        _WORKER,
        *(redis_server.url, str(interval), str(burst), str(seconds)),
    ]
    results: list[dict[str, float]] = []

    async def worker() -> None:
        done = await trio.run_process(command, capture_stdout=True, check=True)
        results.append(json.loads(done.stdout))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(worker)
    allowed = sum(result["allowed"] for result in results)
    window = max(r["end"] for r in results) - min(r["start"] for r in results)
    expected = window / interval + burst_tokens
    assert all(result["errors"] == 0 for result in results)
    assert all(result["tries"] > result["allowed"] for result in results)
    assert abs(allowed - expected) <= 0.1 * expected, (allowed, expected)


# -- the ban view ---------------------------------------------------------------------------------


async def test_a_ban_on_one_store_is_seen_by_another_and_so_is_the_lift(
    redis_server: RedisServer,
) -> None:
    async with make_store(redis_server) as one, make_store(redis_server) as two:
        await one.set(BAN, "10 failures", 600.0)
        with trio.fail_after(PROPAGATION):
            await two.view.wait_for(lambda view: view.get(BAN) is not None)
        entry = await two.get(BAN)
        assert entry is not None and entry.value == "10 failures"
        assert 590 < entry.ttl <= 600
        assert [e.key for e in await two.scan("ab:ban:")] == [BAN]
        # The lift, made on the other instance.
        assert await two.delete(BAN) is True
        with trio.fail_after(PROPAGATION):
            await one.view.wait_for(lambda view: view.get(BAN) is None)
        assert await one.get(BAN) is None


async def test_ban_checks_make_no_round_trip(store: RedisStore, redis_server: RedisServer) -> None:
    await store.set(BAN, "r", 600.0)
    redis_server.pause()
    try:
        with trio.fail_after(0.01 * 1000):
            for _ in range(1000):
                assert await store.get(BAN) is not None
        assert store.errors == 0 and store.fallbacks == 0
    finally:
        redis_server.resume()


async def test_a_missed_message_is_repaired_by_the_resync(redis_server: RedisServer) -> None:
    async with make_store(redis_server, resync_period=0.2) as store:
        # Written behind the store's back: no message is published, as if one were lost.
        name = redis_key(store.key_prefix, BAN)
        redis_server.command("SET", name, "t1\tmissed", "PX", "600000")
        with trio.fail_after(PROPAGATION):
            await store.view.wait_for(lambda view: view.get(BAN) is not None)
        redis_server.command("DEL", name)
        with trio.fail_after(PROPAGATION):
            await store.view.wait_for(lambda view: view.get(BAN) is None)


def test_view_keeps_the_newest_write() -> None:
    now = [100.0]
    view = BanView(clock=lambda: now[0])
    view.apply("ban:a", "new", 10.0, version=2)
    view.apply("ban:a", "old", 10.0, version=1)
    assert view.get("ban:a") == Entry("ban:a", "new", 10.0)
    view.apply("ban:a", None, 0.0, version=3)
    # A late "set" older than the delete cannot bring the ban back.
    view.apply("ban:a", "old", 10.0, version=2)
    assert view.get("ban:a") is None
    # A re-read that started before a newer write keeps that write.
    view.apply("ban:b", "fresh", 10.0, version=9)
    view.replace({"ban:c": ("read", 5.0, 4)}, since=5)
    assert view.get("ban:b") is not None and view.get("ban:c") is not None
    now[0] += 10.0
    assert view.get("ban:b") is None and view.get("ban:c") is None


# -- outages --------------------------------------------------------------------------------------


async def test_sigstop_every_call_returns_within_the_timeout(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailedge.hooks.redis")
    timeout = 0.05
    async with make_store(
        redis_server, timeout=timeout, breaker=CircuitBreaker(threshold=5, probe_interval=0.2)
    ) as store:
        await store.set(BAN, "known", 600.0)
        redis_server.pause()
        try:
            worst = 0.0
            for n in range(40):
                start = trio.current_time()
                assert (await store.gcra(f"rl:conn:smtp:192.0.2.{n}", 1.0, 2.0)).allowed
                assert await store.hit("ab:fail:192.0.2.1", 60.0, 100) >= 1
                # The known ban is still enforced, from the view.
                assert await store.get(BAN) is not None
                worst = max(worst, trio.current_time() - start)
            assert store.breaker.is_open and store.breaker.opened == 1
            # Two calls per round may reach Redis: each at most the timeout, plus slack.
            assert worst < 2 * timeout + 0.2, worst
            assert store.fallbacks >= 80
        finally:
            redis_server.resume()
        await recovered(store)
        assert store.breaker.closed == 1
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, text in messages if "circuit breaker" in text] == ["WARNING", "INFO"]


async def test_killed_and_restarted_sharing_resumes(redis_server: RedisServer) -> None:
    async with (
        make_store(redis_server, timeout=0.2) as one,
        make_store(redis_server, timeout=0.2) as two,
    ):
        await one.set(BAN, "before", 600.0)
        with trio.fail_after(PROPAGATION):
            await two.view.wait_for(lambda view: view.get(BAN) is not None)
        redis_server.kill()
        # The default policy keeps serving: a per-process limit, and the known ban.
        for _ in range(10):
            assert (await one.gcra("rl:conn:smtp:192.0.2.1", 10.0, 20.0)) is not None
        assert await two.get(BAN) is not None
        # A ban made during the outage is kept, and sent to Redis when it is back.
        await one.set("ab:ban:203.0.113.9", "during", 600.0)
        redis_server.start()
        await recovered(one)
        await recovered(two)
        with trio.fail_after(PROPAGATION):
            await two.view.wait_for(lambda view: view.get("ab:ban:203.0.113.9") is not None)
        # The restarted Redis lost the old ban; both views follow it after their re-read.
        with trio.fail_after(PROPAGATION):
            await two.view.wait_for(lambda view: view.get(BAN) is None)
        key = "rl:conn:smtp:198.51.100.9"
        assert (await one.gcra(key, 10.0, 0.0)).allowed
        assert not (await two.gcra(key, 10.0, 0.0)).allowed


@pytest.mark.parametrize(
    ("policy", "allowed", "hits"),
    [
        (StoreFailurePolicy.LOCAL, True, 1),
        (StoreFailurePolicy.OPEN, True, 0),
        (StoreFailurePolicy.CLOSED, False, 0),
    ],
)
async def test_failure_policies(
    redis_server: RedisServer, policy: StoreFailurePolicy, allowed: bool, hits: int
) -> None:
    async with make_store(redis_server, timeout=0.2, on_failure=policy) as store:
        await store.set(BAN, "known", 600.0)
        redis_server.kill()
        assert (await store.gcra("rl:conn:smtp:192.0.2.1", 1.0, 2.0)).allowed is allowed
        assert await store.hit("ab:fail:192.0.2.1", 60.0, 5) == hits
        await store.set("note", "x", 60.0)
        assert (await store.get("note") is not None) is (policy is StoreFailurePolicy.LOCAL)
        # Known bans hold under every policy.
        assert await store.get(BAN) is not None


async def test_a_store_starts_while_redis_is_down(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # never started
    async with RedisStore(url=server.url, timeout=0.05) as store:
        assert (await store.gcra("rl:conn:smtp:192.0.2.1", 1.0, 0.0)).allowed
        assert not (await store.gcra("rl:conn:smtp:192.0.2.1", 1.0, 0.0)).allowed


# -- cancellation ---------------------------------------------------------------------------------


async def test_cancelled_calls_never_mismatch_later_replies(store: RedisStore) -> None:
    rng = random.Random(11)
    for n in range(400):
        with trio.move_on_after(rng.choice([0, 0.00002, 0.0001, 0.0003, 0.001])):
            if n % 3 == 0:
                await store.set(f"k{n % 7}", f"v{n}", 60.0)
            elif n % 3 == 1:
                await store.get(f"k{n % 7}")
            else:
                await store.gcra(f"rl:c:192.0.2.{n % 5}", 0.001, 1.0)
    for n in range(7):
        await store.set(f"k{n}", f"final{n}", 60.0)
    for n in range(7):
        entry = await store.get(f"k{n}")
        assert entry is not None and entry.value == f"final{n}"
    assert await store.hit("ab:fail:x", 60.0, 9) == 1
    assert store.errors == 0


# -- settings -------------------------------------------------------------------------------------


async def test_open_store_from_settings(redis_server: RedisServer) -> None:
    settings = loads(
        f'[Store]\nbackend = "redis"\nurl = "{redis_server.url}"\nkeyPrefix = "t:"\n'
        'timeout = 1\nonFailure = "closed"\nresyncPeriod = 5',
        format="toml",
    ).store
    async with open_store(settings) as store:
        assert isinstance(store, RedisStore)
        assert (store.key_prefix, store.timeout, store.on_failure) == (
            "t:",
            1.0,
            StoreFailurePolicy.CLOSED,
        )
        await store.set("k", "v", 5.0)
        assert keys(redis_server) == ["t:k"]
    async with open_store(StoreSettings()) as memory:
        assert isinstance(memory, MemoryStore)
    assert os.environ is not None


# -- shared per-IP connection counts (maxConnectionsPerIp across processes) -------------------

CONN = "conn:smtp:198.51.100.7"


async def test_two_stores_share_one_connection_count(redis_server: RedisServer) -> None:
    async with make_store(redis_server) as one, make_store(redis_server) as two:
        first = await one.take_connection(CONN, 2)
        second = await two.take_connection(CONN, 2)
        assert isinstance(first, str) and isinstance(second, str)
        assert await one.take_connection(CONN, 2) is False
        assert await two.take_connection(CONN, 2) is False
        # Another client, another listener: counted apart.
        assert isinstance(await one.take_connection("conn:smtp:198.51.100.8", 2), str)
        assert isinstance(await one.take_connection("conn:imap:198.51.100.7", 2), str)
        one.release_connection(CONN, first)
        assert one.connection_slots == 2

        async def free() -> bool:
            token = await two.take_connection(CONN, 2)
            return isinstance(token, str)

        # The release goes out in the background, at once.
        await wait_until(free, SLOW)
        assert "mailedge:conn:smtp:{198.51.100.7}" in keys(redis_server)


async def test_a_dead_process_slots_expire_and_live_ones_are_renewed(
    redis_server: RedisServer,
) -> None:
    lease = 1.0
    async with (
        make_store(redis_server, connection_lease=lease, connection_heartbeat=0.2) as live,
        make_store(redis_server, connection_lease=lease, connection_heartbeat=0.2) as other,
    ):
        assert isinstance(await live.take_connection(CONN, 2), str)
        # A "process" that takes a slot and dies without releasing it: its store stops.
        async with make_store(redis_server, connection_lease=lease) as dying:
            assert isinstance(await dying.take_connection(CONN, 2), str)
        assert await other.take_connection(CONN, 2) is False
        started = trio.current_time()

        async def one_free() -> bool:
            return isinstance(await other.take_connection(CONN, 2), str)

        await wait_until(one_free, 5 * lease)
        # The dead one's lapsed after its lease; the live ones, renewed, are still held.
        assert trio.current_time() - started >= lease / 2
        await trio.sleep(2 * lease)
        assert await other.take_connection(CONN, 2) is False


async def test_connection_count_answers_none_within_the_timeout_when_redis_stops(
    redis_server: RedisServer,
) -> None:
    async with make_store(redis_server, timeout=0.05) as store:
        assert isinstance(await store.take_connection(CONN, 5), str)
        redis_server.pause()
        try:
            started = trio.current_time()
            assert await store.take_connection(CONN, 5) is None
            assert trio.current_time() - started < 0.5
        finally:
            redis_server.resume()
