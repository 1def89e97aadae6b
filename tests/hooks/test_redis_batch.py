"""The batcher and the leases behind RedisStore, against a real redis-server.

Concurrent decisions share round trips; a slot taken for a caller that left (or by a call that
failed) is given back at once, not when its lease lapses; leased tokens are never more than the
limit, and what a process does not spend comes back to the others.
"""

from __future__ import annotations

from functools import partial

import pytest
import redis_support
import trio
from redis_support import RedisServer, wait_until

from mailedge.hooks.leases import LeaseTable
from mailedge.hooks.redis import RedisStore
from mailedge.settings import RateLimit

pytest.importorskip("coredis")

CONN = "conn:smtp:198.51.100.7"
SLOT_SET = "mailedge:conn:smtp:{198.51.100.7}"
# Generous for a loaded 2-core machine: these tests check behaviour, not speed.
SLOW = 2.0
# Every failure here is meant to be seen, not to open the breaker.
make_store = partial(redis_support.make_store, threshold=100)


async def take_all(store: RedisStore, key: str, limit: RateLimit) -> int:
    """How many decisions ``store`` allows for ``key`` before the first refusal."""
    for allowed in range(limit.count + 50):
        if not (await store.gcra(key, limit.emission_interval, limit.burst_tolerance)).allowed:
            return allowed
    raise AssertionError("never refused")


def held_slots(server: RedisServer) -> int:
    return int(server.command("ZCARD", SLOT_SET).strip().lstrip(b":"))


async def test_concurrent_decisions_share_round_trips(redis_server: RedisServer) -> None:
    limit = RateLimit.parse("10/1m")  # small: no leases, every decision goes to Redis
    async with make_store(redis_server) as store:
        results: list[bool] = []

        async def decide(n: int) -> None:
            result = await store.gcra(f"rl:c:192.0.2.{n}", limit.emission_interval, 0.0)
            results.append(result.allowed)

        async with trio.open_nursery() as nursery:
            for n in range(64):
                nursery.start_soon(decide, n)
        assert results == [True] * 64
        assert store._batcher.sent == 64
        assert store._batcher.batches <= 16, store._batcher
        # And each decision was its own: the same clients again are refused (burst 1).
        refused = [
            (await store.gcra(f"rl:c:192.0.2.{n}", limit.emission_interval, 0.0)).allowed
            for n in range(4)
        ]
        assert refused == [False] * 4


async def test_a_caller_that_gave_up_waiting_leaves_no_slot_held(
    redis_server: RedisServer,
) -> None:
    # A lease far longer than the test: only a give-back can free the slot in time.
    async with make_store(
        redis_server, timeout=0.05, connection_lease=60.0, connection_heartbeat=0.1
    ) as store:
        redis_server.pause()
        try:
            assert await store.take_connection(CONN, 5) is None
        finally:
            await trio.sleep(0.2)
            redis_server.resume()
        # Whether Redis took the slot when it woke or never saw the command, nobody holds it:
        # a slot a failed call may have taken is given back (the keeper retries).
        await wait_until(lambda: held_slots(redis_server) == 0, SLOW)
        assert store.connection_slots == 0
        token = await store.take_connection(CONN, 5)
        assert isinstance(token, str)
        assert held_slots(redis_server) == 1


async def test_a_slot_taken_for_a_cancelled_caller_is_given_back(
    redis_server: RedisServer,
) -> None:
    async with make_store(redis_server, connection_lease=60.0) as store:
        redis_server.pause()
        try:
            with trio.move_on_after(0.1) as scope:
                await store.take_connection(CONN, 5)
            assert scope.cancelled_caught
        finally:
            redis_server.resume()
        await wait_until(lambda: store._batcher.sent >= 2, SLOW)
        await wait_until(lambda: held_slots(redis_server) == 0, SLOW)
        assert store.connection_slots == 0


async def test_leased_tokens_never_exceed_the_limit_and_unspent_ones_come_back(
    redis_server: RedisServer,
) -> None:
    # 200 an hour: a burst of 200 and no refill to speak of within the test; leases up to 10.
    limit = RateLimit.parse("200/1h")
    args = (limit.emission_interval, limit.burst_tolerance)
    key = "rl:conn:smtp:198.51.100.7"
    async with (
        make_store(redis_server, leases=LeaseTable(seconds=0.3), connection_heartbeat=0.1) as one,
        make_store(redis_server) as two,
    ):
        for _ in range(150):
            assert (await one.gcra(key, *args)).allowed
        # Most decisions were spent from leases, not sent.
        assert one.leases.spent >= 100
        held = one.leases.held
        assert 0 < held < 10

        # Never looser: what one holds is not available to two.
        assert await take_all(two, key, limit) == 200 - 150 - held
        # One's lease expires; the keeper hands its unspent tokens back to Redis.
        await wait_until(lambda: one.leases.held == 0, SLOW)
        await trio.sleep(0.3)
        assert await take_all(two, key, limit) == held


async def test_a_closed_connections_slot_is_kept_for_the_clients_next_one(
    redis_server: RedisServer,
) -> None:
    # A limit of 40 keeps up to 2 spares per client; a spare lives as long as a lease.
    async with make_store(
        redis_server, leases=LeaseTable(seconds=0.5), connection_heartbeat=0.1
    ) as store:
        first = await store.take_connection(CONN, 40)
        assert isinstance(first, str)
        store.release_connection(CONN, first)
        assert (store.connection_slots, store.spare_slots) == (0, 1)
        # Still counted for every process: never looser.
        assert held_slots(redis_server) == 1
        sent = store._batcher.sent
        assert await store.take_connection(CONN, 40) == first
        assert store._batcher.sent == sent  # no round trip
        store.release_connection(CONN, first)
        # Unused for its lifetime, the spare is given back.
        await wait_until(lambda: held_slots(redis_server) == 0, SLOW)
        assert store.spare_slots == 0


async def test_small_connection_limits_keep_no_spare(redis_server: RedisServer) -> None:
    async with make_store(redis_server) as store:
        token = await store.take_connection(CONN, 19)
        assert isinstance(token, str)
        store.release_connection(CONN, token)
        assert store.spare_slots == 0
        await wait_until(lambda: held_slots(redis_server) == 0, SLOW)


async def test_a_new_clients_first_decision_makes_no_round_trip_and_is_counted(
    redis_server: RedisServer,
) -> None:
    limit = RateLimit.parse("200/1h")
    key = "rl:conn:smtp:198.51.100.7"
    async with make_store(redis_server) as one, make_store(redis_server) as two:
        sent = one._batcher.sent
        result = await one.gcra(key, limit.emission_interval, limit.burst_tolerance)
        assert result.allowed
        assert (one._batcher.sent, one.leases.credited) == (sent, 1)
        # Recorded on the way: the other store finds one token gone.
        await wait_until(lambda: one._batcher.sent == sent + 1, SLOW)
        assert await take_all(two, key, limit) == 199


async def test_a_credit_against_a_burst_emptied_elsewhere_is_one_event_once(
    redis_server: RedisServer,
) -> None:
    # The bound of the credit: the other process emptied the burst; this one, knowing no
    # use of it, allows one event, learns the truth from the reply, and refuses from then on.
    limit = RateLimit.parse("200/1h")
    key = "rl:conn:smtp:198.51.100.7"
    async with make_store(redis_server) as one, make_store(redis_server) as two:
        assert await take_all(two, key, limit) == 200
        assert await take_all(one, key, limit) == 1
        assert one.leases.credited == 1
        assert await take_all(one, key, limit) == 0
