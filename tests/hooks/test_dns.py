"""The hooks' DNS: resolver settings, and the resolver and adapters against a real server."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import attrs
import dns.resolver
import dns_support
import pytest
import spf
import trio
from dns_support import TEST_LIFETIME, TEST_TIMEOUT, Zone, ZoneServer, serve_zone

import mailedge.hooks.dns as hooks_dns
from mailedge.hooks.dns import (
    DEFAULT_LIFETIME,
    DEFAULT_TIMEOUT,
    AuthDNS,
    DNSTempError,
    ResolverSettings,
    make_resolver,
    resolving,
    run_blocking,
    txt_records,
)

# Longer than the 1 s timeout the tests once used, much shorter than TEST_TIMEOUT: an answer
# from a server thread that waited its turn on a loaded machine.
LOADED_DELAY = 1.5

# A TXT record too long for a 512-octet UDP answer: the server truncates, the resolver asks
# again over TCP.
LONG_TEXT = "v=spf1 " + " ".join(f"ip4:192.0.2.{i}" for i in range(60)) + " -all"

ZONE = Zone(
    {
        "example.test": {
            "TXT": ["v=spf1 ip4:198.51.100.7 -all", "unrelated=1"],
            "A": ["192.0.2.1"],
        },
        "long.test": {"TXT": [LONG_TEXT]},
        "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject", "something else"]},
        "_dmarc.twice.test": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
        "_dmarc.other.test": {"TXT": ["v=spf1 -all"]},
        "mx-only.test": {"MX": ["10 mail.example.test"]},
        "sel._domainkey.example.test": {"TXT": ["v=DKIM1; p=AAAA"]},
        "txt-only.test": {"TXT": ["hello"]},
    },
    servfail=["broken.test", "_dmarc.broken.test"],
    silent=["slow.test"],
)


@pytest.fixture
def server() -> Iterator[ZoneServer]:
    with serve_zone(ZONE) as running:
        yield running


@pytest.fixture
def resolver(server: ZoneServer) -> dns.resolver.Resolver:
    return make_resolver(server.settings())


# -- settings ----------------------------------------------------------------------------------


def test_the_defaults_are_the_system_resolver_with_bounded_waits() -> None:
    settings = ResolverSettings()
    assert settings.nameservers == ()
    assert (settings.timeout, settings.lifetime) == (DEFAULT_TIMEOUT, DEFAULT_LIFETIME) == (5, 10)
    assert repr(settings) == "<ResolverSettings system timeout=5 lifetime=10>"


def test_nameservers_keep_their_own_ports_and_lists_become_tuples() -> None:
    servers: list[tuple[str, int]] = [("192.0.2.53", 53), ("2001:db8::53", 5353)]
    settings = ResolverSettings(servers, timeout=1, lifetime=3)
    assert settings.nameservers == (("192.0.2.53", 53), ("2001:db8::53", 5353))
    assert repr(settings) == (
        "<ResolverSettings 192.0.2.53:53,[2001:db8::53]:5353 timeout=1 lifetime=3>"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("192.0.2.53:5353", ("192.0.2.53", 5353)),
        (" 192.0.2.53:5353 ", ("192.0.2.53", 5353)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("[2001:db8::53]", ("2001:db8::53", 53)),
        ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
    ],
)
def test_parse(text: str, expected: tuple[str, int]) -> None:
    assert ResolverSettings.parse([text]).nameservers == (expected,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dns.example", "not an IP address"),
        ("dns.example:53", "not an IP address"),
        ("192.0.2.53:0", "port 0"),
        ("192.0.2.53:65536", "port 65536"),
        ("192.0.2.53:domain", "is not a number"),
        ("[2001:db8::53", "expected"),
        ("[2001:db8::53]5353", "expected"),
        ("[2001:db8::53]:", "is not a number"),
    ],
)
def test_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ResolverSettings.parse([text])


@pytest.mark.parametrize(
    ("timeout", "lifetime", "message"),
    [
        (0, 10, "timeout must be positive"),
        (-1, 10, "timeout must be positive"),
        (5, 0, "lifetime must be positive"),
        (5, 4, "shorter than one attempt"),
        (float("nan"), 10, "timeout must be positive"),
    ],
)
def test_bounds_are_validated(timeout: float, lifetime: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ResolverSettings(timeout=timeout, lifetime=lifetime)


def test_make_resolver_applies_the_settings() -> None:
    resolver = make_resolver(ResolverSettings.parse(["192.0.2.53:5353", "[::1]"], timeout=2))
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [  # type: ignore[union-attr]
        ("192.0.2.53", 5353),
        ("::1", 53),
    ]
    assert (resolver.timeout, resolver.lifetime) == (2, DEFAULT_LIFETIME)
    assert resolver.cache is None


@pytest.mark.skipif(not os.path.exists("/etc/resolv.conf"), reason="no system resolver config")
def test_no_nameservers_means_the_system_resolver() -> None:
    resolver = make_resolver(ResolverSettings(timeout=1, lifetime=2))
    assert resolver.nameservers  # from /etc/resolv.conf
    assert (resolver.timeout, resolver.lifetime) == (1, 2)


# -- lookups against the server ----------------------------------------------------------------


def test_the_resolver_asks_the_configured_server(
    server: ZoneServer, resolver: dns.resolver.Resolver
) -> None:
    assert sorted(txt_records(resolver, "example.test")) == [
        b"unrelated=1",
        b"v=spf1 ip4:198.51.100.7 -all",
    ]
    assert [(q.name, q.rtype, q.protocol) for q in server.queries] == [
        ("example.test", "TXT", "udp")
    ]


def test_a_long_record_comes_over_tcp_and_its_strings_are_joined(
    server: ZoneServer, resolver: dns.resolver.Resolver
) -> None:
    assert txt_records(resolver, "long.test") == [LONG_TEXT.encode()]
    assert [q.protocol for q in server.queries] == ["udp", "tcp"]


def test_nxdomain_and_nodata_are_no_records(resolver: dns.resolver.Resolver) -> None:
    assert txt_records(resolver, "missing.test") == []
    assert txt_records(resolver, "mx-only.test") == []


def test_servfail_is_a_temporary_error(resolver: dns.resolver.Resolver) -> None:
    with pytest.raises(DNSTempError, match="SERVFAIL"):
        txt_records(resolver, "broken.test")


def test_a_silent_server_is_a_temporary_error_within_the_lifetime(server: ZoneServer) -> None:
    resolver = make_resolver(server.silent_settings())
    start = time.monotonic()
    with pytest.raises(DNSTempError):
        txt_records(resolver, "slow.test")
    # lifetime=0.5: the query gives up then, not after dnspython's 5 s default lifetime (the
    # slack is for a loaded machine).
    assert time.monotonic() - start < 4


def test_an_answer_slowed_by_a_loaded_machine_is_still_an_answer() -> None:
    # A test that expects an answer once failed when the server's thread, on a loaded machine,
    # answered after the 1 s timeout the tests used; their bounds now allow for that.
    with serve_zone(attrs.evolve(ZONE, delay=LOADED_DELAY)) as slow:
        resolver = make_resolver(slow.settings())
        assert b"v=spf1 ip4:198.51.100.7 -all" in txt_records(resolver, "example.test")


def test_each_nameserver_keeps_its_own_port() -> None:
    broken = Zone(servfail=["example.test"])
    with serve_zone(broken) as first, serve_zone(ZONE) as second:
        assert first.port != second.port
        settings = ResolverSettings(
            nameservers=(("127.0.0.1", first.port), ("127.0.0.1", second.port)),
            timeout=TEST_TIMEOUT,
            lifetime=TEST_LIFETIME,
        )
        resolver = make_resolver(settings)
        assert b"v=spf1 ip4:198.51.100.7 -all" in txt_records(resolver, "example.test")
        assert first.asked("example.test") and second.asked("example.test")


# -- the dnsfunc for dkimpy and authheaders -----------------------------------------------------


def test_authdns_answers_dkimpy_with_bytes(resolver: dns.resolver.Resolver) -> None:
    lookup = AuthDNS(resolver)
    assert lookup(b"sel._domainkey.example.test.", timeout=5) == b"v=DKIM1; p=AAAA"
    assert lookup(b"nokey._domainkey.example.test.") is None
    assert repr(lookup) == "<AuthDNS 1 nameserver(s)>"


def test_authdns_answers_authheaders_with_the_one_dmarc_record(
    resolver: dns.resolver.Resolver,
) -> None:
    lookup = AuthDNS(resolver)
    assert lookup("_dmarc.example.test") == "v=DMARC1; p=reject"
    # RFC 7489 6.6.3: two DMARC records are as good as none; other TXT records do not count.
    assert lookup("_dmarc.twice.test") is None
    assert lookup("_dmarc.other.test") is None
    assert lookup("_dmarc.missing.test") is None


def test_authdns_existence_checks_use_address_and_mx_records(
    resolver: dns.resolver.Resolver,
) -> None:
    lookup = AuthDNS(resolver)
    assert lookup("example.test") == "exists"
    assert lookup("mx-only.test") == "exists"
    assert lookup("txt-only.test") is None
    assert lookup("missing.test") is None


def test_authdns_raises_temporary_errors(resolver: dns.resolver.Resolver) -> None:
    lookup = AuthDNS(resolver)
    for name in (b"broken.test.", "_dmarc.broken.test", "broken.test"):
        with pytest.raises(DNSTempError):
            lookup(name)


# -- pyspf ---------------------------------------------------------------------------------------


def test_pyspf_asks_the_resolver_set_for_the_evaluation(
    server: ZoneServer, resolver: dns.resolver.Resolver
) -> None:
    with resolving(resolver):
        assert spf.check2("198.51.100.7", "a@example.test", "client.example")[0] == "pass"
        assert spf.check2("203.0.113.9", "a@example.test", "client.example")[0] == "fail"
        assert spf.check2("203.0.113.9", "a@broken.test", "client.example")[0] == "temperror"
        assert spf.check2("203.0.113.9", "a@long.test", "client.example")[0] == "fail"
    assert server.asked("example.test") and server.asked("long.test")


def test_outside_an_evaluation_pyspf_keeps_its_previous_lookup(
    monkeypatch: pytest.MonkeyPatch, resolver: dns.resolver.Resolver
) -> None:
    with resolving(resolver):
        pass  # installs the dispatcher
    assert spf.DNSLookup is hooks_dns._pyspf_lookup
    asked: list[tuple[str, str]] = []

    def previous(name: str, qtype: str, strict: object, timeout: float) -> list[object]:
        asked.append((name, qtype))
        return [((name, qtype), (b"v=spf1 +all",))]

    monkeypatch.setattr(hooks_dns, "_previous", previous)
    assert spf.check2("203.0.113.9", "a@elsewhere.test", "client.example")[0] == "pass"
    assert asked == [("elsewhere.test", "TXT")]


def test_installing_twice_keeps_the_original_fallback(resolver: dns.resolver.Resolver) -> None:
    with resolving(resolver):
        pass
    previous = hooks_dns._previous
    with resolving(resolver), resolving(resolver):
        pass
    assert hooks_dns._previous is previous
    assert previous is not hooks_dns._pyspf_lookup


def test_concurrent_evaluations_use_their_own_resolvers() -> None:
    # Two servers that disagree about example.test; threads evaluating at once each get the
    # answer of the resolver they were given.
    other = ZONE.with_records("example.test", "TXT", "v=spf1 ip4:203.0.113.9 -all")
    results: dict[str, list[str]] = {"first": [], "second": []}
    with serve_zone(ZONE) as first, serve_zone(other) as second:
        resolvers = {
            "first": make_resolver(first.settings()),
            "second": make_resolver(second.settings()),
        }
        barrier = threading.Barrier(2, timeout=5)

        def evaluate(name: str) -> None:
            with resolving(resolvers[name]):
                barrier.wait()
                for _ in range(5):
                    result, _ = spf.check2("203.0.113.9", "a@example.test", "client.example")
                    results[name].append(result)

        threads = [threading.Thread(target=evaluate, args=(name,)) for name in results]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert results == {"first": ["fail"] * 5, "second": ["pass"] * 5}


# -- threads -------------------------------------------------------------------------------------


async def test_run_blocking_runs_in_a_thread_behind_the_limiter() -> None:
    limiter = trio.CapacityLimiter(1)
    seen: list[int] = []

    def work() -> str:
        seen.append(limiter.borrowed_tokens)
        return threading.current_thread().name

    name = await run_blocking(work, limiter=limiter, deadline=5)
    assert name != threading.current_thread().name
    assert seen == [1]
    assert limiter.borrowed_tokens == 0


async def test_past_the_deadline_the_thread_is_abandoned_and_ends_at_its_next_lookup(
    resolver: dns.resolver.Resolver,
) -> None:
    limiter = trio.CapacityLimiter(1)
    release, ended = threading.Event(), threading.Event()
    outcome: list[BaseException] = []

    def work() -> None:
        try:
            release.wait(5)
            txt_records(resolver, "example.test")
        except BaseException as exc:
            outcome.append(exc)
            raise
        finally:
            ended.set()

    with pytest.raises(trio.TooSlowError):
        await run_blocking(work, limiter=limiter, deadline=0.1)
    # The abandoned thread still holds its token, so the threads stay bounded.
    assert limiter.borrowed_tokens == 1
    release.set()
    assert await trio.to_thread.run_sync(ended.wait, 5)
    assert isinstance(outcome[0], DNSTempError)
    assert "abandoned" in str(outcome[0])


async def test_cancellation_is_not_swallowed() -> None:
    release = threading.Event()
    with trio.move_on_after(0.1) as scope:
        await run_blocking(lambda: release.wait(5), limiter=trio.CapacityLimiter(1), deadline=10)
    release.set()
    assert scope.cancelled_caught


def test_the_support_server_repr_is_short(server: ZoneServer) -> None:
    assert repr(server) == f"<ZoneServer 127.0.0.1:{server.port} queries=0>"
    assert repr(dns_support.dkim_key()) == "<DKIMKey rsa-2048>"
