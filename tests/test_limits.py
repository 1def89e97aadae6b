"""Connection limits: per listener, per client, IPv6 counted per /64; shared through Redis."""

from __future__ import annotations

import contextlib
import ipaddress
import pathlib
from functools import partial

import pytest
import trio

from mailedge.config import loads
from mailedge.context import ConnectionContext
from mailedge.limits import ConnectionLimits, client_key, shared_key
from mailedge.server import serve

V4 = ipaddress.IPv4Address("198.51.100.7")


def test_a_listener_slot_is_held_until_released() -> None:
    limits = ConnectionLimits()
    assert limits.take_listener_slot("smtp", 2)
    assert limits.take_listener_slot("smtp", 2)
    assert not limits.take_listener_slot("smtp", 2)
    assert limits.take_listener_slot("imap", 2)  # each listener has its own count
    assert limits.open_on("smtp") == 2
    limits.release_listener_slot("smtp")
    assert limits.open_on("smtp") == 1
    assert limits.take_listener_slot("smtp", 2)


def test_a_refused_slot_is_not_counted() -> None:
    limits = ConnectionLimits()
    assert not limits.take_listener_slot("smtp", 0)
    assert limits.open_on("smtp") == 0
    assert not limits.take_client_slot("smtp", V4, 0)
    assert limits.open_from("smtp", V4) == 0


def test_client_slots_count_per_listener_and_client() -> None:
    limits = ConnectionLimits()
    other = ipaddress.IPv4Address("198.51.100.8")
    assert limits.take_client_slot("smtp", V4, 1)
    assert not limits.take_client_slot("smtp", V4, 1)
    assert limits.take_client_slot("smtp", other, 1)
    assert limits.take_client_slot("imap", V4, 1)
    limits.release_client_slot("smtp", V4)
    assert limits.take_client_slot("smtp", V4, 1)


def test_one_ipv6_64_is_one_client() -> None:
    limits = ConnectionLimits()
    a = ipaddress.IPv6Address("2001:db8:1:2::1")
    b = ipaddress.IPv6Address("2001:db8:1:2:ffff:ffff:ffff:ffff")
    neighbour = ipaddress.IPv6Address("2001:db8:1:3::1")
    assert client_key(a) == client_key(b) != client_key(neighbour)
    assert limits.take_client_slot("smtp", a, 1)
    assert not limits.take_client_slot("smtp", b, 1)
    assert limits.take_client_slot("smtp", neighbour, 1)
    assert limits.open_from("smtp", b) == 1


def test_ipv4_and_ipv6_keys_never_collide() -> None:
    # ::c633:6407 has the same integer value as 198.51.100.7; a /64 of low addresses too.
    low6 = ipaddress.IPv6Address(int(V4))
    assert client_key(low6) != client_key(V4)
    assert client_key(ipaddress.IPv6Address(int(V4) << 64)) != client_key(V4)


def test_released_counts_leave_no_entries_behind() -> None:
    limits = ConnectionLimits()
    for i in range(100):
        ip = ipaddress.IPv4Address(i)
        assert limits.take_listener_slot("smtp", 1000)
        assert limits.take_client_slot("smtp", ip, 1)
        limits.release_client_slot("smtp", ip)
        limits.release_listener_slot("smtp")
    assert repr(limits) == "<ConnectionLimits open=0>"
    assert limits._by_client == {} and limits._by_listener == {}


def test_the_shared_key_names_the_listener_and_the_client() -> None:
    assert shared_key("smtp", ipaddress.ip_address("198.51.100.7")) == "conn:smtp:198.51.100.7"
    # One IPv6 /64 is one client, as in the local count; so is a mapped IPv4 address.
    assert shared_key("imap", ipaddress.ip_address("2001:db8:1:2::9")) == (
        "conn:imap:2001:db8:1:2::/64"
    )
    assert shared_key("smtp", ipaddress.ip_address("::ffff:198.51.100.7")) == (
        "conn:smtp:198.51.100.7"
    )


# -- maxConnectionsPerIp shared across servers through a real Redis -----------------------------

SHARED_CONFIG = """\
[[NetworkListener]]
name = "smtp"
protocol = "smtp"
bind = ["127.0.0.1:0"]
maxConnectionsPerIp = 1
"""


async def hold(stream: trio.abc.Stream, context: ConnectionContext) -> None:
    await stream.send_all(b"220 hello\r\n")
    with contextlib.suppress(trio.BrokenResourceError):
        while await stream.receive_some():
            pass


async def first_line(address: tuple[str, int]) -> tuple[trio.SocketStream, bytes]:
    stream = await trio.open_tcp_stream(*address)
    return stream, bytes(await stream.receive_some(200))


async def test_two_servers_share_max_connections_per_ip(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    pytest.importorskip("coredis")
    from redis_support import RedisServer

    from mailedge.hooks.redis import RedisStore

    redis = RedisServer(tmp_path)
    redis.start()
    try:
        settings = loads(SHARED_CONFIG, format="toml")
        addresses = []
        for _ in range(2):
            store = RedisStore(url=redis.url, timeout=0.2)
            await nursery.start(store.run)
            server = await nursery.start(
                partial(serve, settings, {"smtp": hold}, shared_counts=store)
            )
            addresses.append(server.addresses["smtp"][0])
        held, line = await first_line(addresses[0])
        assert line == b"220 hello\r\n"
        # The other server's local count is 0, but the client's one slot is taken.
        refused, line = await first_line(addresses[1])
        await refused.aclose()
        assert line.startswith(b"421 4.7.0 Too many connections")
        # Redis stopped: each server's local count decides, within the store's timeout.
        redis.pause()
        try:
            with trio.fail_after(2.0):
                allowed, line = await first_line(addresses[1])
            await allowed.aclose()
            assert line == b"220 hello\r\n"
        finally:
            redis.resume()
        await held.aclose()
    finally:
        nursery.cancel_scope.cancel()
        redis.stop()
