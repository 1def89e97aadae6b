"""The in-process state store: GCRA, hit windows, text records, expiry and the size bound."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from mailedge.hooks.store import DEFAULT_MAX_KEYS, Entry, GCRAResult, MemoryStore, RateStore

# 3 per 3 s: T = 1 s, tau = 2 s.
T, TAU = 1.0, 2.0


def test_memory_store_is_a_rate_store() -> None:
    store: RateStore = MemoryStore()
    assert repr(store) == f"<MemoryStore keys=0/{DEFAULT_MAX_KEYS}>"


# -- GCRA ---------------------------------------------------------------------------------------


async def test_gcra_allows_the_burst_then_refuses(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    assert [(await store.gcra("k", T, TAU)).allowed for _ in range(3)] == [True, True, True]
    refused = await store.gcra("k", T, TAU)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(1.0)
    assert (await store.gcra("other", T, TAU)) == GCRAResult(True, 0.0)
    # A refusal changes nothing: asking again at once gets the same answer.
    assert (await store.gcra("k", T, TAU)).retry_after == pytest.approx(1.0)


async def test_gcra_steady_state_is_one_per_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    for _ in range(3):
        await store.gcra("k", T, TAU)
    for _ in range(5):
        await trio.sleep(0.5)
        assert not (await store.gcra("k", T, TAU)).allowed
        await trio.sleep(0.5)
        assert (await store.gcra("k", T, TAU)).allowed


async def test_gcra_refills_completely_after_a_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    for _ in range(3):
        await store.gcra("k", T, TAU)
    await trio.sleep(3)
    assert [(await store.gcra("k", T, TAU)).allowed for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    # Rested for longer than a period: no credit beyond the burst is saved up.
    await trio.sleep(100)
    assert [(await store.gcra("k", T, TAU)).allowed for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]


@pytest.mark.parametrize(("count", "period"), [(3, 3.0), (10, 1.0), (7, 60.0), (60, 60.0)])
async def test_gcra_bound_in_any_interval(
    autojump_clock: trio.testing.MockClock, count: int, period: float
) -> None:
    """Greedy clients get at most count + floor(t / T) events in an interval of length t."""
    store = MemoryStore()
    interval = period / count
    tolerance = interval * (count - 1)
    step = interval / 4
    allowed = 0
    start = trio.current_time()
    for tick in range(count * 12):
        while (await store.gcra("k", interval, tolerance)).allowed:
            allowed += 1
        elapsed = trio.current_time() - start
        assert allowed == count + int(elapsed / interval + 1e-9), tick
        await trio.sleep(step)


async def test_gcra_keys_are_independent(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    assert (await store.gcra("a", 10.0, 0.0)).allowed
    assert not (await store.gcra("a", 10.0, 0.0)).allowed
    assert (await store.gcra("b", 10.0, 0.0)).allowed


async def test_gcra_record_expires_when_rested(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    await store.gcra("k", T, TAU)
    await store.gcra("k", T, TAU)
    assert len(store) == 1
    await trio.sleep(2)
    await store.get("other")  # any operation sweeps
    assert len(store) == 0


# -- hit windows --------------------------------------------------------------------------------


async def test_hit_counts_within_a_sliding_window(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    assert await store.hit("f", 10.0, 5) == 1
    await trio.sleep(6)
    assert await store.hit("f", 10.0, 5) == 2
    await trio.sleep(5)
    # The first hit is now 11 s old: out of the window.
    assert await store.hit("f", 10.0, 5) == 2
    await trio.sleep(10.5)
    await store.scan("")
    assert len(store) == 0
    assert await store.hit("f", 10.0, 5) == 1


async def test_hit_keeps_at_most_limit_times(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    counts = [await store.hit("f", 60.0, 3) for _ in range(10)]
    assert counts == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]


async def test_hit_record_expires_a_window_after_the_newest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    await store.hit("f", 10.0, 5)
    await trio.sleep(9)
    await store.hit("f", 10.0, 5)
    await trio.sleep(9)
    await store.scan("")
    assert len(store) == 1
    await trio.sleep(1)
    await store.scan("")
    assert len(store) == 0


# -- text records -------------------------------------------------------------------------------


async def test_text_records(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    assert await store.get("ban:a") is None
    await store.set("ban:a", "one", 100.0)
    await store.set("ban:b", "two", 50.0)
    await store.set("other", "three", 50.0)
    await trio.sleep(10)
    assert await store.get("ban:a") == Entry("ban:a", "one", 90.0)
    assert sorted(await store.scan("ban:"), key=lambda e: e.key) == [
        Entry("ban:a", "one", 90.0),
        Entry("ban:b", "two", 40.0),
    ]
    await store.set("ban:a", "replaced", 5.0)
    assert await store.get("ban:a") == Entry("ban:a", "replaced", 5.0)
    assert await store.delete("ban:b") is True
    assert await store.delete("ban:b") is False
    await trio.sleep(5)
    assert await store.get("ban:a") is None
    assert await store.scan("ban:") == []


async def test_kinds_do_not_mix(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    await store.set("k", "text", 10.0)
    # A GCRA call on a text key starts from rest rather than misreading the record.
    assert (await store.gcra("k", 1.0, 0.0)).allowed
    assert await store.get("k") is None
    assert await store.hit("k", 10.0, 3) == 1


async def test_injected_clock() -> None:
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    await store.set("k", "v", 10.0)
    now[0] += 9.5
    entry = await store.get("k")
    assert entry is not None and entry.ttl == pytest.approx(0.5)
    now[0] += 0.5
    assert await store.get("k") is None


# -- the size bound -----------------------------------------------------------------------------


async def test_memory_is_bounded_under_many_distinct_keys(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(max_keys=10_000)
    for n in range(200_000):
        await store.gcra(f"rl:{n}", 1.0, 59.0)
        assert len(store) <= 10_000
    assert len(store) == 10_000
    assert store.evictions == 190_000
    # The heap of expiry times is bounded too, stale entries included.
    assert len(store._heap) <= 2 * 10_000 + 1024 + 1


async def test_eviction_takes_the_record_that_expires_soonest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(max_keys=100)
    await store.set("ban:long", "kept", 3600.0)
    for n in range(1000):
        await store.hit(f"fail:{n}", 600.0, 10)
    assert len(store) == 100
    # The ban outlives a flood of shorter-lived keys.
    assert await store.get("ban:long") is not None


async def test_updates_do_not_grow_the_heap(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    for _ in range(10_000):
        await store.gcra("k", 0.001, 1000.0)
    assert len(store) == 1
    assert len(store._heap) <= 2 + 1024 + 1


async def test_max_keys_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        MemoryStore(max_keys=0)


# -- the contract, against every store ---------------------------------------------------------
# The same checks on MemoryStore and on RedisStore (a real redis-server, tests/hooks/test_redis.py
# says how). Redis keeps its own time, so these run on the real clock and check only what holds
# at any speed: no sleeps, and time-to-live figures within a generous margin.


@pytest.fixture(params=["memory", "redis"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RateStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    pytest.importorskip("coredis")
    from redis_support import RedisServer

    from mailedge.hooks.redis import RedisStore

    server = RedisServer(tmp_path)
    server.start()
    try:
        # A generous timeout: a loaded test machine must not turn a reply into a fallback.
        async with RedisStore(url=server.url, timeout=2.0) as store:
            yield store
            assert store.fallbacks == 0
    finally:
        server.stop()


async def test_contract_gcra(any_store: RateStore) -> None:
    key = "rl:conn:smtp:198.51.100.7"
    assert [(await any_store.gcra(key, 10.0, 20.0)).allowed for _ in range(3)] == [True] * 3
    refused = await any_store.gcra(key, 10.0, 20.0)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(10.0, abs=1.0)
    # A refusal changes nothing, and other keys have their own budget.
    assert (await any_store.gcra(key, 10.0, 20.0)).retry_after == pytest.approx(10.0, abs=1.0)
    assert await any_store.gcra("rl:conn:smtp:2001:db8::/64", 10.0, 0.0) == GCRAResult(True, 0.0)


async def test_contract_hit(any_store: RateStore) -> None:
    counts = [await any_store.hit("ab:fail:198.51.100.7", 60.0, 3) for _ in range(5)]
    assert counts == [1, 2, 3, 3, 3]
    assert await any_store.hit("ab:fail:198.51.100.8", 60.0, 3) == 1


@pytest.mark.parametrize("prefix", ["ab:ban:", "note:"])
async def test_contract_text_records(any_store: RateStore, prefix: str) -> None:
    a, b = f"{prefix}198.51.100.7", f"{prefix}2001:db8:1:2::/64"
    assert await any_store.get(a) is None
    await any_store.set(a, "one", 100.0)
    await any_store.set(b, "two", 50.0)
    await any_store.set("other", "three", 50.0)
    entry = await any_store.get(a)
    assert entry is not None and (entry.key, entry.value) == (a, "one")
    assert 99.0 < entry.ttl <= 100.0
    scanned = sorted(await any_store.scan(prefix), key=lambda e: e.key)
    assert [(e.key, e.value) for e in scanned] == [(a, "one"), (b, "two")]
    assert [e.key for e in await any_store.scan(f"{prefix}2001:")] == [b]
    await any_store.set(a, "replaced", 5.0)
    entry = await any_store.get(a)
    assert entry is not None and entry.value == "replaced" and entry.ttl <= 5.0
    assert await any_store.delete(b) is True
    assert await any_store.delete(b) is False
    assert await any_store.get(b) is None
    assert [e.key for e in await any_store.scan(prefix)] == [a]


async def test_contract_kinds_do_not_mix(any_store: RateStore) -> None:
    await any_store.set("k", "text", 10.0)
    assert (await any_store.gcra("k", 1.0, 0.0)).allowed
    assert await any_store.get("k") is None
    assert await any_store.hit("k", 10.0, 3) == 1
