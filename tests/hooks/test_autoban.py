"""Auto-ban: counting, banning, expiry, listing, lifting, and never a trusted proxy."""

from __future__ import annotations

import datetime
import ipaddress
import logging

import pytest
import trio
import trio.testing
from hook_support import PROXY, context, listener, settings

from mailedge.context import AddressSource
from mailedge.events import EventName, GateEvent
from mailedge.gate import ProxyGate, UntrustedHeaderError
from mailedge.hooks import Action, HookChain
from mailedge.hooks.autoban import AutoBan, Ban
from mailedge.hooks.ratelimit import RateLimit, RateLimitHooks
from mailedge.hooks.store import MemoryStore
from mailedge.networks import TrustedNetworks
from mailedge.proxy import InetAddress, encode_v1
from mailedge.settings import AutoBanSettings, Settings

ip = ipaddress.ip_address

# A fixed wall clock, so that "banned until" is predictable.
WALL = 1_700_000_000.0


def policy(**fields: object) -> Settings:
    """Settings with an [AutoBan] of 3 failures in 60 s banning for 600 s, unless overridden."""
    values: dict[str, object] = {"failures": 3, "window": 60.0, "duration": 600.0}
    values.update(fields)
    return settings(auto_ban=AutoBanSettings(**values))  # type: ignore[arg-type]


def autoban(conf: Settings | None = None, **kw: object) -> AutoBan:
    conf = conf if conf is not None else policy()
    return AutoBan(lambda: conf, wall_clock=lambda: WALL, **kw)  # type: ignore[arg-type]


def until_text(seconds: float) -> str:
    when = datetime.datetime.fromtimestamp(WALL + seconds, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


async def fail(ban: AutoBan, client: str, times: int, reason: str = "bad") -> list[Ban | None]:
    return [await ban.record_failure(ip(client), reason) for _ in range(times)]


def untrusted_header(peer: str, listener: str = "smtp") -> GateEvent:
    return GateEvent(
        name=EventName.UNTRUSTED_HEADER,
        listener=listener,
        connection_id=1,
        peer_ip=ip(peer),
        peer_port=40000,
        reason="untrusted_header",
        message="a PROXY header arrived from an untrusted peer",
        elapsed=0.0,
    )


# -- banning --------------------------------------------------------------------------------------


async def test_n_failures_ban(autojump_clock: trio.testing.MockClock) -> None:
    ban = autoban()
    results = await fail(ban, "198.51.100.7", 2)
    assert results == [None, None]
    assert (await ban.on_connect(context("198.51.100.7"))).accepted
    [made] = await fail(ban, "198.51.100.7", 1, "failed login")
    assert made is not None
    assert (made.key, made.failures, made.reason, made.remaining) == (
        "198.51.100.7",
        3,
        "failed login",
        600.0,
    )
    verdict = await ban.on_connect(context("198.51.100.7"))
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reason == f"banned until {until_text(600)}"
    # Another client behind the same proxy is not affected.
    assert (await ban.on_connect(context("198.51.100.8"))).accepted


async def test_failures_must_fall_within_the_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ban = autoban()
    for _ in range(10):
        assert await fail(ban, "198.51.100.7", 1) == [None]
        await trio.sleep(31)  # two failures per window at most
    assert await ban.bans() == []
    await fail(ban, "198.51.100.7", 2)
    assert [b.key for b in await ban.bans()] == ["198.51.100.7"]


async def test_bans_expire(autojump_clock: trio.testing.MockClock) -> None:
    ban = autoban()
    await fail(ban, "198.51.100.7", 3)
    await trio.sleep(599)
    assert not (await ban.on_connect(context("198.51.100.7"))).accepted
    await trio.sleep(1)
    assert (await ban.on_connect(context("198.51.100.7"))).accepted
    assert await ban.bans() == []
    # The failures that led to it were cleared: a new ban takes a full count again.
    assert await fail(ban, "198.51.100.7", 2) == [None, None]


async def test_failures_while_banned_do_not_extend_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ban = autoban()
    await fail(ban, "198.51.100.7", 3)
    await trio.sleep(300)
    [again] = await fail(ban, "198.51.100.7", 1)
    assert again is not None and again.remaining == pytest.approx(300)


async def test_bans_are_listed_soonest_first(autojump_clock: trio.testing.MockClock) -> None:
    ban = autoban()
    await fail(ban, "198.51.100.7", 3, "first")
    await trio.sleep(100)
    await fail(ban, "2001:db8:1:2::5", 3, "second")
    await trio.sleep(10)
    listed = await ban.bans()
    assert [(b.key, b.reason, b.failures) for b in listed] == [
        ("198.51.100.7", "first", 3),
        ("2001:db8:1:2::/64", "second", 3),
    ]
    assert [b.remaining for b in listed] == [pytest.approx(490), pytest.approx(590)]
    assert listed[0].until == datetime.datetime.fromtimestamp(WALL + 490, datetime.UTC)
    assert listed[1].to_json() == {
        "key": "2001:db8:1:2::/64",
        "until": until_text(590),
        "remaining": 590.0,
        "reason": "second",
        "failures": 3,
    }


async def test_lift(autojump_clock: trio.testing.MockClock) -> None:
    ban = autoban()
    await fail(ban, "198.51.100.7", 3)
    await fail(ban, "2001:db8:1:2::5", 3)
    await fail(ban, "2001:db8:9:9::5", 3)
    assert await ban.lift("198.51.100.7") is True
    assert await ban.lift("198.51.100.7") is False
    # An address lifts the ban on its prefix; the network lifts it by its key.
    assert await ban.lift(ip("2001:db8:1:2::ffff")) is True
    assert await ban.lift("2001:db8:9:9::/64") is True
    assert await ban.bans() == []
    assert (await ban.on_connect(context("198.51.100.7"))).accepted
    # Lifting also forgets the failures: the client starts afresh.
    assert await fail(ban, "198.51.100.7", 2) == [None, None]
    assert await ban.lift("10.0.0.0/8") is False


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("not-an-ip", "'not-an-ip' is not an IP network"),
        ("2001:db8::1/64", "'2001:db8::1/64' has host bits set"),
        ("", "empty"),
    ],
)
async def test_lift_refuses_what_is_not_an_address(target: str, message: str) -> None:
    ban = autoban()
    with pytest.raises(ValueError, match=message):
        await ban.lift(target)


async def test_a_ban_is_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mailedge.hooks.autoban")
    ban = autoban()
    await fail(ban, "198.51.100.7", 3, "failed login for 'alice' on listener imap")
    [record] = caplog.records
    assert record.getMessage() == (
        f"autoban: banned 198.51.100.7 until {until_text(600)} (600 s) after 3 failures "
        "within 60 s; last: failed login for 'alice' on listener imap"
    )
    await ban.lift("198.51.100.7")
    assert caplog.records[-1].getMessage() == "autoban: lifted the ban on 198.51.100.7"


# -- IPv6 -----------------------------------------------------------------------------------------


async def test_ipv6_failures_add_up_per_64(autojump_clock: trio.testing.MockClock) -> None:
    ban = autoban()
    await fail(ban, "2001:db8:1:2::1", 1)
    await fail(ban, "2001:db8:1:2::2", 1)
    await fail(ban, "2001:db8:1:3::1", 1)  # another /64
    [made] = await fail(ban, "2001:db8:1:2:ffff::3", 1)
    assert made is not None and made.key == "2001:db8:1:2::/64"
    assert not (await ban.on_connect(context("2001:db8:1:2::abcd"))).accepted
    assert (await ban.on_connect(context("2001:db8:1:3::1"))).accepted


async def test_the_ban_prefix_is_configurable(autojump_clock: trio.testing.MockClock) -> None:
    ban = autoban(policy(ipv6_prefix=128))
    await fail(ban, "2001:db8:1:2::1", 3)
    assert not (await ban.on_connect(context("2001:db8:1:2::1"))).accepted
    assert (await ban.on_connect(context("2001:db8:1:2::2"))).accepted
    assert [b.key for b in await ban.bans()] == ["2001:db8:1:2::1/128"]


async def test_a_prefix_covering_a_trusted_proxy_is_narrowed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conf = settings(
        trusted=("2001:db8:1:2::10",), auto_ban=AutoBanSettings(failures=1, window=60.0)
    )
    ban = autoban(conf)
    [made] = await fail(ban, "2001:db8:1:2::99", 1)
    # The /64 would cover the proxy at ::10: only the offender's own address is banned.
    assert made is not None and made.key == "2001:db8:1:2::99/128"
    assert not (await ban.on_connect(context("2001:db8:1:2::99"))).accepted
    assert (await ban.on_connect(context("2001:db8:1:2::98"))).accepted
    assert (await ban.on_connect(context("2001:db8:1:2::10", peer=None))).accepted
    assert await ban.lift("2001:db8:1:2::99") is True


# -- trusted proxies ------------------------------------------------------------------------------


async def test_a_proxy_is_never_banned_even_when_all_its_clients_are(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ban = autoban()
    clients = [f"198.51.100.{n}" for n in range(1, 6)]
    for client in clients:
        await fail(ban, client, 3)
    assert len(await ban.bans()) == 5
    for client in clients:
        assert not (await ban.on_connect(context(client))).accepted
    # The proxy's failures are not even counted...
    assert await fail(ban, PROXY, 50) == [None] * 50
    assert await ban.banned(ip(PROXY)) is None
    # ...its health checks, direct connections and other clients are served.
    local = context(source=AddressSource.PROXY_LOCAL)
    assert (await ban.on_connect(local)).accepted
    assert (await ban.on_connect(context(source=AddressSource.UNKNOWN))).accepted
    assert (await ban.on_connect(context(PROXY, peer=None))).accepted
    assert (await ban.on_connect(context("198.51.100.99"))).accepted
    assert PROXY not in [b.key for b in await ban.bans()]


async def test_a_proxy_trusted_only_by_a_listener_override_is_exempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 192.0.2.10 is trusted on "submission" only; Stalwart (#2158) would ban it.
    conf = Settings(
        system=settings().system,
        listeners=(
            listener("smtp"),
            listener("submission", override_proxy_trusted_networks=TrustedNetworks(["192.0.2.10"])),
        ),
        auto_ban=AutoBanSettings(failures=3, window=60.0),
    )
    ban = autoban(conf)
    # It sends headers to "smtp", where it is not trusted: each is an untrusted-header failure.
    for _ in range(10):
        ban.on_gate_event(untrusted_header("192.0.2.10", listener="smtp"))
    assert await fail(ban, "192.0.2.10", 10) == [None] * 10
    assert (await ban.on_connect(context("192.0.2.10", peer=None))).accepted
    assert await ban.bans() == []


async def test_the_exemption_follows_a_reload(autojump_clock: trio.testing.MockClock) -> None:
    current = [policy()]
    ban = AutoBan(lambda: current[0], wall_clock=lambda: WALL)
    await fail(ban, "203.0.113.9", 3)
    assert not (await ban.on_connect(context("203.0.113.9", peer=None))).accepted
    # 203.0.113.9 turns out to be a new proxy: once trusted, it is served and never counted.
    current[0] = settings(
        trusted=(PROXY, "203.0.113.9"), auto_ban=AutoBanSettings(failures=3, window=60.0)
    )
    assert (await ban.on_connect(context("203.0.113.9", peer=None))).accepted
    assert await fail(ban, "203.0.113.9", 5) == [None] * 5


async def test_disabled(autojump_clock: trio.testing.MockClock) -> None:
    current = [policy()]
    ban = AutoBan(lambda: current[0], wall_clock=lambda: WALL)
    await fail(ban, "198.51.100.7", 3)
    current[0] = policy(enable=False)
    # Off: existing bans are not enforced, and nothing is counted.
    assert (await ban.on_connect(context("198.51.100.7"))).accepted
    assert await fail(ban, "198.51.100.8", 10) == [None] * 10
    current[0] = policy()
    assert not (await ban.on_connect(context("198.51.100.7"))).accepted
    assert (await ban.on_connect(context("198.51.100.8"))).accepted


# -- the failure sources --------------------------------------------------------------------------


async def test_auth_failures(autojump_clock: trio.testing.MockClock) -> None:
    ban = autoban()
    client = context("198.51.100.7", listener="imap")
    for _ in range(3):
        await ban.on_auth_failure(client, "alice" * 40)
    [made] = await ban.bans()
    assert made.reason == f"failed login for {('alice' * 40)[:64]!r} on listener imap"


async def test_auth_failures_without_a_known_client_are_ignored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ban = autoban()
    unknown = context(source=AddressSource.UNKNOWN)
    for _ in range(10):
        await ban.on_auth_failure(unknown, "alice")
    assert await ban.bans() == []


async def test_untrusted_headers_from_gate_events(autojump_clock: trio.testing.MockClock) -> None:
    ban = autoban()
    for _ in range(3):
        ban.on_gate_event(untrusted_header("203.0.113.9"))
    # Other events are not failures.
    ban.on_gate_event(
        GateEvent(
            name=EventName.REJECTED,
            listener="smtp",
            connection_id=2,
            peer_ip=ip("203.0.113.10"),
            peer_port=1,
            reason="v1_syntax",
            message="",
            elapsed=0.0,
        )
    )
    # Counted at the next call: the gate's callback cannot await.
    verdict = await ban.on_connect(context("203.0.113.9", peer=None))
    assert verdict.reason.startswith("banned until ")
    [made] = await ban.bans()
    assert made.reason == "PROXY header from an untrusted peer on listener smtp"


async def test_untrusted_headers_through_a_real_gate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The SMTP listener trusts nobody; 203.0.113.9 keeps sending PROXY headers anyway.
    conf = settings(
        listener("smtp", override_proxy_trusted_networks=TrustedNetworks()),
        auto_ban=AutoBanSettings(failures=3, window=60.0),
    )
    ban = autoban(conf)
    gate = ProxyGate(conf, on_event=ban.on_gate_event)
    client = InetAddress(ip("198.51.100.7"), 40000)
    server = InetAddress(ip("192.0.2.25"), 25)
    for _ in range(3):
        theirs, ours = trio.testing.memory_stream_pair()
        stream, admitted = await gate.admit(
            ours, listener="smtp", peer=("203.0.113.9", 40000), local=("192.0.2.25", 25)
        )
        assert (await ban.on_connect(admitted)).accepted
        await theirs.send_all(encode_v1(client, server))
        with pytest.raises(UntrustedHeaderError):
            await stream.receive_some()
    _, ours = trio.testing.memory_stream_pair()
    _, admitted = await gate.admit(
        ours, listener="smtp", peer=("203.0.113.9", 40001), local=("192.0.2.25", 25)
    )
    assert not (await ban.on_connect(admitted)).accepted


async def test_the_gate_event_queue_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    ban = autoban(max_pending=3)
    for n in range(5):
        ban.on_gate_event(untrusted_header(f"203.0.113.{n}"))
    assert ban.dropped == 2
    assert repr(ban) == "<AutoBan store=<MemoryStore keys=0/100000> pending=3>"
    await ban.flush()
    assert repr(ban) == "<AutoBan store=<MemoryStore keys=3/100000> pending=0>"


async def test_record_failure_takes_text(autojump_clock: trio.testing.MockClock) -> None:
    ban = autoban(policy(failures=1))
    made = await ban.record_failure("::ffff:198.51.100.7", "too many bad commands")
    assert made is not None and made.key == "198.51.100.7"


# -- memory ---------------------------------------------------------------------------------------


async def test_memory_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore(max_keys=1000)
    conf = policy(failures=2)
    ban = AutoBan(lambda: conf, store)
    await fail(ban, "198.51.100.7", 2)
    for n in range(20_000):
        await ban.record_failure(ipaddress.IPv4Address(0x0B000000 + n), "scan")
        assert len(store) <= 1000
    # The ban outlives the flood of single failures: they would expire sooner.
    assert [b.key for b in await ban.bans()] == ["198.51.100.7"]
    # Failure records expire with their window.
    await trio.sleep(61)
    await ban.bans()
    assert len(store) == 1


# -- composition ----------------------------------------------------------------------------------


async def test_in_a_chain_before_the_rate_limits(autojump_clock: trio.testing.MockClock) -> None:
    conf = settings(
        listener(rate_limit_connections=RateLimit.parse("100/1h")),
        auto_ban=AutoBanSettings(failures=2, window=60.0, duration=600.0),
    )
    store = MemoryStore()
    ban = AutoBan(lambda: conf, store, wall_clock=lambda: WALL)
    hooks = HookChain([ban, RateLimitHooks(lambda: conf)])
    client = context("198.51.100.7")
    await hooks.on_auth_failure(client, "alice")
    await hooks.on_auth_failure(client, "alice")
    verdict = await hooks.on_connect(client)
    assert (verdict.action, verdict.reason) == (Action.TEMPFAIL, f"banned until {until_text(600)}")


# -- bans on open sessions ------------------------------------------------------------------------


class RecordingSessions:
    """A server's Sessions as AutoBan sees it: records what it is asked to end."""

    def __init__(self) -> None:
        self.ended: list[tuple[object, str]] = []

    def end(self, client: object, reason: str) -> int:
        self.ended.append((client, reason))
        return 2


async def test_a_banned_clients_login_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    ban = autoban()
    guesser = context("198.51.100.7")
    assert (await ban.on_auth_attempt(guesser, "alice")).accepted
    await fail(ban, "198.51.100.7", 3)
    verdict = await ban.on_auth_attempt(guesser, "alice")
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reason == f"banned until {until_text(600)}"
    # Other clients, and a client the gate does not know, log in as before.
    assert (await ban.on_auth_attempt(context("198.51.100.8"), "alice")).accepted
    # A proxy's LOCAL health check names no client; its address is the proxy's, never banned.
    local = context("198.51.100.7", source=AddressSource.PROXY_LOCAL)
    assert (await ban.on_auth_attempt(local, "alice")).accepted


async def test_a_new_ban_ends_the_sessions_it_covers(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mailedge.hooks.autoban")
    ban = autoban(policy(failures=1))
    first, second = RecordingSessions(), RecordingSessions()
    HookChain([ban]).on_start(first)
    ban.on_start(second)
    ban.on_start(second)  # twice is once
    await fail(ban, "2001:db8:1:2::99", 1)
    expected = (ipaddress.ip_network("2001:db8:1:2::/64"), f"banned until {until_text(600)}")
    assert first.ended == [expected]
    assert second.ended == [expected]
    assert "ended 4 open session(s) of 2001:db8:1:2::/64" in caplog.text
    # Failures during the ban make no new ban, and end nothing more.
    await fail(ban, "2001:db8:1:2::99", 1)
    assert len(first.ended) == 1


async def test_a_ban_learned_from_a_shared_store_ends_the_sessions_here(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    here = autoban(store=store)
    elsewhere = autoban(store=store)
    sessions = RecordingSessions()
    here.on_start(sessions)
    [*_, made] = await fail(elsewhere, "198.51.100.7", 3)
    assert made is not None
    assert sessions.ended == []  # nothing told this process yet
    assert await here.ban_learned(made.key) == 2
    assert sessions.ended == [(ip("198.51.100.7"), f"banned until {until_text(600)}")]
    # A ban that is gone by the time the news arrives ends nothing.
    await here.lift(made.key)
    assert await here.ban_learned(made.key) == 0
    # Another writer's key that names no address or network: logged, and nothing ended.
    await store.set("ab:ban:not-an-address", "{}", 60.0)
    assert await here.ban_learned("not-an-address") == 0
    assert len(sessions.ended) == 1
