"""The coredis client for ``[Store] url``: one server, a primary found by Sentinel, or a Cluster.

:func:`open_client` is what :class:`~mailedge.hooks.redis.RedisStore` connects with; the URL
forms are parsed (and validated) by :func:`mailedge.store_settings.parse_store_url`:

- ``redis://``, ``rediss://``, ``unix://``: ``coredis.Redis.from_url``, as coredis reads them.
- ``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]``: the Sentinels
  are asked for the service's primary on every new connection (``coredis.Sentinel``); after a
  failover the next connection goes to the new primary, and a connection to a primary that was
  demoted fails its ``ROLE`` check. The user and password are the data nodes', not the
  Sentinels'.
- ``redis+cluster://[user:password@]host[:port][,host[:port]...]``: ``coredis.RedisCluster``,
  which reads the slot layout from any of the startup nodes and routes every script by its
  keys' slot (one client's keys share a hash tag, so one slot).

``rediss+`` speaks TLS to every node (and to the Sentinels), verified against the system's CAs
(``SSL_CERT_FILE`` adds a private one). Every client is created with ``NoRetryPolicy``: a retry
would wait past the store's ``timeout``, and its failure policy is the retry. No connection
attempt waits more than ``connect_timeout``.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from mailedge.store_settings import StoreTopology, StoreURL, parse_store_url

__all__ = ["open_client"]

logger = logging.getLogger("mailedge.hooks.redis")


def _ssl_context(parsed: StoreURL) -> ssl.SSLContext | None:
    # Verified like any TLS client: the system's CAs and the host name.
    return ssl.create_default_context() if parsed.tls else None


@asynccontextmanager
async def open_client(
    url: str, *, connect_timeout: float, retry_interval: float
) -> AsyncIterator[Any]:
    """A running coredis client for ``url``, with decoded replies and no retries.

    Never fails because Redis is unreachable: a single server or a Sentinel-managed primary
    is connected on first use; a Cluster whose layout cannot be read yet is yielded all the
    same (its calls fail until then) and read again every ``retry_interval``.
    """
    import coredis
    from coredis.connection import TCPLocation
    from coredis.retry import NoRetryPolicy

    parsed = parse_store_url(url)
    if parsed.topology is StoreTopology.SINGLE:
        client: Any = coredis.Redis.from_url(
            url,
            decode_responses=True,
            retry_policy=NoRetryPolicy(),
            connect_timeout=connect_timeout,
        )
        async with client:
            yield client
        return

    nodes = [TCPLocation(host, port) for host, port in parsed.hosts]
    context = _ssl_context(parsed)
    if parsed.topology is StoreTopology.SENTINEL:
        assert parsed.service is not None
        sentinel: Any = coredis.Sentinel(
            nodes,
            decode_responses=True,
            retry_policy=NoRetryPolicy(),
            # A Sentinel that accepts but does not answer is skipped after this long too.
            sentinel_kwargs={
                "connect_timeout": connect_timeout,
                "stream_timeout": connect_timeout,
                "ssl_context": context,
            },
            connect_timeout=connect_timeout,
        )
        primary = sentinel.primary_for(
            parsed.service,
            db=parsed.db,
            username=parsed.username,
            password=parsed.password,
            ssl_context=context,
        )
        async with sentinel, primary:
            yield primary
        return

    cluster: Any = coredis.RedisCluster(
        startup_nodes=nodes,
        decode_responses=True,
        retry_policy=NoRetryPolicy(),
        connect_timeout=connect_timeout,
        username=parsed.username,
        password=parsed.password,
        ssl_context=context,
    )
    # Entering the client reads the layout, which fails while no startup node answers: the
    # entering is kept in a task of its own, which tries again until it succeeds.
    attempt = connect_timeout * len(nodes)
    async with trio.open_nursery() as nursery:
        await nursery.start(_keep_cluster_entered, cluster, attempt, retry_interval)
        yield cluster
        nursery.cancel_scope.cancel()


async def _keep_cluster_entered(
    cluster: Any,
    attempt: float,
    retry_interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Enter ``cluster`` (read its layout), retrying; started after the first attempt."""
    started = False
    while True:
        error: BaseException | None = None
        with trio.CancelScope(deadline=trio.current_time() + attempt) as scope:
            try:
                async with cluster:
                    # Read: no deadline from here on. coredis refreshes the layout by itself
                    # (after MOVED replies and errors).
                    scope.deadline = math.inf
                    if not started:
                        started = True
                        task_status.started()
                    await trio.sleep_forever()
            except Exception as exc:
                error = exc
        reason = "timed out" if error is None else f"{type(error).__name__}: {error}"
        logger.debug("redis store: cluster layout not read: %s", reason)
        if not started:
            started = True
            task_status.started()
        await trio.sleep(retry_interval)
