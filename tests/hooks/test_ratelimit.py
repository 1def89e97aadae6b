"""Rate limits: keyed on the recovered client, IPv6 by prefix, per listener, GCRA in time."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest
import trio
import trio.testing
from hook_support import PROXY, context, listener, settings

from mailedge.context import AddressSource
from mailedge.hooks import Action, HookChain
from mailedge.hooks.ratelimit import (
    CONNECTIONS_REASON,
    MESSAGES_REASON,
    RateLimit,
    RateLimiter,
    RateLimitHooks,
    address_key,
)
from mailedge.hooks.store import MemoryStore
from mailedge.settings import ListenerProtocol, Settings

ip = ipaddress.ip_address


def limited(**fields: Any) -> Settings:
    """One SMTP listener with the given rate-limit fields."""
    return settings(listener(**fields))


def hooks_for(conf: Settings) -> RateLimitHooks:
    return RateLimitHooks(lambda: conf)


async def connects(hooks: RateLimitHooks, client: str, times: int, **kw: Any) -> list[bool]:
    return [(await hooks.on_connect(context(client, **kw))).accepted for _ in range(times)]


# -- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "prefix", "key"),
    [
        ("198.51.100.7", 64, "198.51.100.7"),
        ("198.51.100.7", 128, "198.51.100.7"),
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:aaaa::1", 56, "2001:db8:1::/56"),
        ("2001:db8:1:2:aaaa::1", 128, "2001:db8:1:2:aaaa::1/128"),
        ("::ffff:198.51.100.7", 64, "198.51.100.7"),
    ],
)
def test_address_key(address: str, prefix: int, key: str) -> None:
    assert address_key(ip(address), prefix) == key


def test_address_key_defaults_to_a_64() -> None:
    assert address_key(ip("2001:db8::1")) == "2001:db8::/64"


# -- connections ----------------------------------------------------------------------------------


async def test_two_clients_behind_one_proxy_are_limited_separately(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hooks = hooks_for(limited(rate_limit_connections=RateLimit.parse("3/1m")))
    assert await connects(hooks, "198.51.100.7", 4) == [True, True, True, False]
    # Same proxy peer, another client: its own budget.
    assert await connects(hooks, "198.51.100.8", 3) == [True, True, True]
    refused = await hooks.on_connect(context("198.51.100.7"))
    assert refused.action is Action.TEMPFAIL
    assert (
        refused.reason
        == CONNECTIONS_REASON
        == ("Too many connections from your network, try later")
    )


async def test_the_limit_recovers_at_the_steady_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hooks = hooks_for(limited(rate_limit_connections=RateLimit.parse("3/1m")))
    assert await connects(hooks, "198.51.100.7", 4) == [True, True, True, False]
    await trio.sleep(19)
    assert await connects(hooks, "198.51.100.7", 1) == [False]
    await trio.sleep(1)
    # One every 20 s (60 s / 3) once the burst is spent.
    assert await connects(hooks, "198.51.100.7", 2) == [True, False]
    await trio.sleep(60)
    assert await connects(hooks, "198.51.100.7", 4) == [True, True, True, False]


async def test_ipv6_clients_share_a_limit_per_64(autojump_clock: trio.testing.MockClock) -> None:
    hooks = hooks_for(limited(rate_limit_connections=RateLimit.parse("2/1h")))
    assert await connects(hooks, "2001:db8:1:2::1", 1) == [True]
    # Another address in the same /64: the same client.
    assert await connects(hooks, "2001:db8:1:2:ffff::9", 2) == [True, False]
    # The next /64 over: another client.
    assert await connects(hooks, "2001:db8:1:3::1", 2) == [True, True]


async def test_the_ipv6_prefix_is_configurable(autojump_clock: trio.testing.MockClock) -> None:
    per_address = hooks_for(
        limited(rate_limit_connections=RateLimit.parse("1/1h"), rate_limit_ipv6_prefix=128)
    )
    assert await connects(per_address, "2001:db8:1:2::1", 2) == [True, False]
    assert await connects(per_address, "2001:db8:1:2::2", 1) == [True]
    per_48 = hooks_for(
        limited(rate_limit_connections=RateLimit.parse("1/1h"), rate_limit_ipv6_prefix=48)
    )
    assert await connects(per_48, "2001:db8:1:2::1", 1) == [True]
    assert await connects(per_48, "2001:db8:1:ffff::1", 1) == [False]


@pytest.mark.parametrize("source", [AddressSource.PROXY_LOCAL, AddressSource.UNKNOWN])
async def test_connections_without_a_known_client_are_not_counted(
    autojump_clock: trio.testing.MockClock, source: AddressSource
) -> None:
    hooks = hooks_for(limited(rate_limit_connections=RateLimit.parse("1/1h")))
    assert await connects(hooks, "198.51.100.7", 5, source=source) == [True] * 5
    # Nothing was charged to the proxy's address either.
    assert await connects(hooks, PROXY, 1, peer=None) == [True]


async def test_a_trusted_proxys_own_direct_connections_are_not_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hooks = hooks_for(limited(rate_limit_connections=RateLimit.parse("1/1h")))
    # Optional header mode: the proxy's health check arrives without a header.
    assert await connects(hooks, PROXY, 5, peer=None) == [True] * 5
    # Any other direct client is counted.
    assert await connects(hooks, "203.0.113.5", 2, peer=None) == [True, False]


async def test_limits_are_per_listener(autojump_clock: trio.testing.MockClock) -> None:
    conf = settings(
        listener("mx", rate_limit_connections=RateLimit.parse("1/1h")),
        listener("submission", rate_limit_connections=RateLimit.parse("1/1h")),
        listener("imap", ListenerProtocol.IMAP),
    )
    hooks = hooks_for(conf)
    assert await connects(hooks, "198.51.100.7", 2, listener="mx") == [True, False]
    assert await connects(hooks, "198.51.100.7", 2, listener="submission") == [True, False]
    # A listener without a limit is not limited.
    assert await connects(hooks, "198.51.100.7", 5, listener="imap") == [True] * 5
    # A context for a listener the settings do not know (a test, a removed listener): accepted.
    assert await connects(hooks, "198.51.100.7", 2, listener="gone") == [True, True]


async def test_a_reload_applies_to_the_next_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    current = [limited()]
    hooks = RateLimitHooks(lambda: current[0])
    assert await connects(hooks, "198.51.100.7", 3) == [True] * 3
    current[0] = limited(rate_limit_connections=RateLimit.parse("1/1h"))
    assert await connects(hooks, "198.51.100.7", 2) == [True, False]


async def test_a_refusal_is_logged_with_the_client(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailedge.hooks.ratelimit")
    hooks = hooks_for(limited(rate_limit_connections=RateLimit.parse("1/1m")))
    await connects(hooks, "2001:db8:1:2::7", 2)
    [record] = caplog.records
    assert "over conn limit 1/1m for 2001:db8:1:2::/64; retry in 60.0 s" in record.getMessage()
    assert "client=[2001:db8:1:2::7]:40000" in record.getMessage()


# -- messages -------------------------------------------------------------------------------------


async def test_messages_are_limited_at_mail_from(autojump_clock: trio.testing.MockClock) -> None:
    hooks = hooks_for(limited(rate_limit_messages=RateLimit.parse("2/1h")))
    client = context("198.51.100.7")
    verdicts = [await hooks.on_mail_from(client, "mx.example", "a@example.org") for _ in range(3)]
    assert [v.accepted for v in verdicts] == [True, True, False]
    assert verdicts[2].action is Action.TEMPFAIL
    assert (verdicts[2].reason, verdicts[2].status) == (MESSAGES_REASON, "4.7.1")
    # Connections have their own budget (and none is configured here).
    assert (await hooks.on_connect(client)).accepted
    # Another client behind the same proxy is not affected.
    other = context("198.51.100.8")
    assert (await hooks.on_mail_from(other, "mx.example", "b@example.org")).accepted


async def test_message_and_connection_budgets_are_separate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hooks = hooks_for(
        limited(
            rate_limit_connections=RateLimit.parse("1/1h"),
            rate_limit_messages=RateLimit.parse("1/1h"),
        )
    )
    client = context("198.51.100.7")
    assert (await hooks.on_connect(client)).accepted
    assert (await hooks.on_mail_from(client, "h", "a@example.org")).accepted
    assert not (await hooks.on_connect(client)).accepted
    assert not (await hooks.on_mail_from(client, "h", "a@example.org")).accepted


async def test_unknown_clients_send_unlimited_messages(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hooks = hooks_for(limited(rate_limit_messages=RateLimit.parse("1/1h")))
    local = context(source=AddressSource.UNKNOWN)
    for _ in range(3):
        assert (await hooks.on_mail_from(local, "h", "a@example.org")).accepted


# -- the limiter and the chain --------------------------------------------------------------------


async def test_the_limiter_on_a_shared_store(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    one, two = RateLimiter(store), RateLimiter(store)
    limit = RateLimit.parse("1/1m")
    assert (await one.acquire("conn:smtp", ip("198.51.100.7"), limit)).allowed
    # Another process (another limiter) on the same store sees the same budget.
    result = await two.acquire("conn:smtp", ip("198.51.100.7"), limit)
    assert not result.allowed
    assert result.retry_after == pytest.approx(60.0)
    assert (await two.acquire("conn:imap", ip("198.51.100.7"), limit)).allowed


async def test_in_a_hook_chain(autojump_clock: trio.testing.MockClock) -> None:
    hooks = HookChain([hooks_for(limited(rate_limit_connections=RateLimit.parse("1/1h")))])
    assert (await hooks.on_connect(context())).accepted
    verdict = await hooks.on_connect(context())
    assert (verdict.action, verdict.reason) == (Action.TEMPFAIL, CONNECTIONS_REASON)


def test_reprs() -> None:
    hooks = RateLimitHooks(lambda: Settings())
    assert repr(hooks) == "<RateLimitHooks <RateLimiter store=<MemoryStore keys=0/100000>>>"
