"""The store's coredis client for each URL form, and RedisStore on Sentinel and on Cluster.

The client tests look at what :func:`open_client` builds without a server. The store tests
run real servers from Debian's redis-server on 127.0.0.1 (tests/support/redis_support.py): a
primary, a replica and a Sentinel that fails over within a second or two; a Cluster of three
primaries. They are marked ``slow`` (several servers each, a few seconds); like the other
interop tests they skip when redis-server is missing, and fail instead under
``MAILEDGE_REQUIRE_INTEROP=1`` (CI). Waits on the servers are on the real clock, bounded,
and wait for an event (a view change, a reply) wherever there is one.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import redis_support
import trio
from redis_support import RedisClusterSet, RedisSentinelSet, until_shared

from mailedge.hooks.redis_client import open_client

coredis = pytest.importorskip("coredis")

# How long a propagated change may take to show in another process's view here.
PROPAGATION = 5.0
# From the primary's death to both stores sharing again: the Sentinel notices in 0.5 s
# (down-after-milliseconds) and promotes the replica; a few seconds here, 30 s on a slow CI.
FAILOVER = 30.0


make_store = partial(redis_support.make_store, timeout=0.5)


# -- the client each URL builds (no server) -------------------------------------------------------


async def test_a_sentinel_url_builds_a_primary_found_through_every_sentinel() -> None:
    url = "redis+sentinel://app:s%40cret@127.0.0.1:26379,[::1]:26380/mail-state/3"
    async with open_client(url, connect_timeout=1.0, retry_interval=0.1) as client:
        pool = client.connection_pool
        assert isinstance(pool, coredis.pool.SentinelConnectionPool)
        assert pool.service_name == "mail-state"
        assert pool.is_primary
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "app", "s@cret")
        assert kwargs["ssl_context"] is None
        sentinels = [s.connection_pool.location for s in pool.sentinel_manager.sentinels]
        assert [(loc.host, loc.port) for loc in sentinels] == [
            ("127.0.0.1", 26379),
            ("::1", 26380),
        ]
        # The data nodes' password is not sent to the Sentinels.
        assert all(
            s.connection_pool.connection_kwargs.get("password") is None
            for s in pool.sentinel_manager.sentinels
        )
        assert isinstance(client.retry_policy, coredis.retry.NoRetryPolicy)


@pytest.mark.parametrize(
    "url", ["rediss+sentinel://127.0.0.1:1/mymaster", "rediss+cluster://127.0.0.1:1"]
)
async def test_tls_urls_verify_the_server(url: str) -> None:
    # Nothing listens on port 1: the client is built (and the Cluster's layout not read).
    async with open_client(url, connect_timeout=0.1, retry_interval=0.1) as client:
        context = client.connection_pool.connection_kwargs["ssl_context"]
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert context.check_hostname


async def test_a_cluster_url_builds_a_cluster_client_without_retries() -> None:
    url = "redis+cluster://app:pw@127.0.0.1:1,127.0.0.1:2"
    async with open_client(url, connect_timeout=0.1, retry_interval=0.1) as client:
        assert isinstance(client, coredis.RedisCluster)
        assert isinstance(client.retry_policy, coredis.retry.NoRetryPolicy)
        pool = client.connection_pool
        assert [(n.host, n.port) for n in pool.startup_nodes] == [
            ("127.0.0.1", 1),
            ("127.0.0.1", 2),
        ]
        assert pool.connection_kwargs["password"] == "pw"
        # No layout yet: a call fails at once, for the store's failure policy to answer.
        with trio.fail_after(1.0), pytest.raises(Exception):  # noqa: B017, PT011
            await client.get("k")


# -- Sentinel ---------------------------------------------------------------------------------


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[RedisSentinelSet]:
    servers = RedisSentinelSet(tmp_path)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.mark.slow
async def test_sentinel_shares_through_the_primary_and_follows_a_failover(
    sentinel_set: RedisSentinelSet,
) -> None:
    """Decisions and bans go through the primary the Sentinel names; when it dies the
    Sentinel promotes the replica, and both stores share again by themselves."""
    async with make_store(sentinel_set.url) as one, make_store(sentinel_set.url) as two:
        key = "rl:conn:smtp:198.51.100.7"
        # 3 per 30 s: a burst of 3 shared by both stores, then nothing.
        assert [(await s.gcra(key, 10.0, 20.0)).allowed for s in (one, two, one, two)] == [
            True,
            True,
            True,
            False,
        ]
        await one.set("ab:ban:198.51.100.7", "before", 600.0)
        with trio.fail_after(PROPAGATION):
            await two.view.wait_for(lambda view: view.get("ab:ban:198.51.100.7") is not None)
        # Through the primary: the keys are on it (and replicated, not written, to the replica).
        assert sentinel_set.primary_port() == sentinel_set.primary.port
        assert "mailedge:ab:ban:{198.51.100.7}" in sentinel_set.primary.command("KEYS", "*")
        assert one.errors == two.errors == 0
        # Replication is asynchronous: what the replica has not acknowledged dies with the
        # primary (docs/scale-out.md). Here it has all of it.
        assert sentinel_set.replicated()

        sentinel_set.primary.kill()
        killed = trio.current_time()
        # The default policy keeps serving meanwhile (per process), and the known ban holds.
        assert (await one.gcra("rl:conn:smtp:192.0.2.1", 10.0, 0.0)).allowed
        assert await two.get("ab:ban:198.51.100.7") is not None
        # Sharing is back when one store's allowance refuses the other's next call.
        await until_shared(one, two, FAILOVER)
        # How long this takes is benchmarks/store_failover.py's to say; here only that it ends.
        assert trio.current_time() - killed < FAILOVER
        assert sentinel_set.primary_port() == sentinel_set.replica.port
        assert one.errors > 0 and one.breaker.closed >= 1
        # A ban made after the failover reaches the other store: its subscriber follows too.
        await one.set("ab:ban:203.0.113.9", "after", 600.0)
        with trio.fail_after(PROPAGATION):
            await two.view.wait_for(lambda view: view.get("ab:ban:203.0.113.9") is not None)


# -- Cluster ----------------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterSet]:
    servers = RedisClusterSet(tmp_path)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


def clients(count: int) -> list[str]:
    return [f"198.51.100.{n}" for n in range(1, count + 1)]


@pytest.mark.slow
async def test_cluster_shares_limits_and_bans_over_every_primary(
    cluster: RedisClusterSet,
) -> None:
    async with make_store(cluster.url) as one, make_store(cluster.url) as two:
        # Many clients, so their keys spread over the three primaries' slots.
        for client in clients(60):
            key = f"rl:conn:smtp:{client}"
            assert (await one.gcra(key, 10.0, 0.0)).allowed, client
            assert not (await two.gcra(key, 10.0, 0.0)).allowed, client
        per_node = cluster.keys_per_node()
        assert all(len(keys) >= 5 for keys in per_node), per_node

        # Bans of many clients, published from whichever primary holds each key, all reach
        # the other store's one subscription (cluster PUBLISH reaches every node).
        bans = [f"ab:ban:{client}" for client in clients(30)]
        for ban in bans:
            await one.set(ban, "r", 600.0)
        with trio.fail_after(PROPAGATION):
            await two.view.wait_for(lambda view: all(view.get(ban) for ban in bans))
        holders = [sum("ab:ban:" in key for key in keys) for keys in cluster.keys_per_node()]
        assert all(holders), holders
        # A store started now reads every ban at its first re-read: SCAN on every primary.
        async with make_store(cluster.url) as three:
            assert sorted(e.key for e in await three.scan("ab:ban:")) == sorted(bans)
            # An unmirrored listing scans every primary too.
            for client in clients(12):
                await one.set(f"note:{client}", "n", 60.0)
            assert len(await three.scan("note:")) == 12
        # The lift, on the other store.
        assert await two.delete(bans[0]) is True
        with trio.fail_after(PROPAGATION):
            await one.view.wait_for(lambda view: view.get(bans[0]) is None)
        assert one.errors == two.errors == 0


@pytest.mark.slow
async def test_cluster_decisions_made_at_once_are_batched_per_slot(
    cluster: RedisClusterSet,
) -> None:
    # One script may only touch one slot's keys: concurrent decisions for clients spread over
    # the three primaries, and the slots they take, each go in a call of their slot.
    async with make_store(cluster.url) as store:
        refused: list[str] = []

        async def decide(client: str) -> None:
            if not (await store.gcra(f"rl:conn:smtp:{client}", 10.0, 0.0)).allowed:
                refused.append(client)
            token = await store.take_connection(f"conn:smtp:{client}", 1)
            assert isinstance(token, str), client
            store.release_connection(f"conn:smtp:{client}", token)

        async with trio.open_nursery() as nursery:
            for client in clients(60):
                nursery.start_soon(decide, client)
        assert refused == []
        assert store.errors == 0
        assert all(len(keys) >= 5 for keys in cluster.keys_per_node())
        # Each decision counted once: the same clients again are refused (burst 1).
        for client in clients(5):
            assert not (await store.gcra(f"rl:conn:smtp:{client}", 10.0, 0.0)).allowed


@pytest.mark.slow
async def test_a_cluster_store_starts_before_its_cluster_and_joins_it(tmp_path: Path) -> None:
    cluster = RedisClusterSet(tmp_path)  # ports chosen, nothing started yet
    try:
        async with make_store(cluster.url) as one, make_store(cluster.url) as two:
            key = "rl:conn:smtp:192.0.2.1"
            # Serving by the default policy: each process its own limit.
            assert (await one.gcra(key, 10.0, 0.0)).allowed
            assert (await two.gcra(key, 10.0, 0.0)).allowed
            await trio.to_thread.run_sync(cluster.start)
            await until_shared(one, two, FAILOVER)
            await one.set("ab:ban:192.0.2.9", "r", 600.0)
            with trio.fail_after(PROPAGATION):
                await two.view.wait_for(lambda view: view.get("ab:ban:192.0.2.9") is not None)
    finally:
        cluster.stop()
