from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address

import attrs
import pytest
import trio.testing
from hook_support import context, listener, settings
from hypothesis import given
from hypothesis import strategies as st

from mailedge.clients import (
    DEFAULT_IPV6_PREFIX,
    LOCAL_USE_NAT64_PREFIX,
    WELL_KNOWN_NAT64_PREFIX,
    Nat64Prefixes,
    client_key,
    client_label,
    describe_client,
    embedded_ipv4,
    parse_nat64_prefix,
)
from mailedge.hooks.autoban import AutoBan
from mailedge.hooks.ratelimit import RateLimit, RateLimitHooks
from mailedge.limits import ConnectionLimits
from mailedge.settings import AutoBanSettings, Settings, SystemSettings

# An operator's own NAT64 prefix, as nat64Prefixes would list it.
OPERATOR = (IPv6Network("2001:db8:64::/96"),)


@pytest.mark.parametrize(
    ("address", "prefix", "label"),
    [
        ("198.51.100.7", 64, "198.51.100.7"),
        ("198.51.100.7", 128, "198.51.100.7"),
        ("::ffff:198.51.100.7", 64, "198.51.100.7"),
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:aaaa::1", 128, "2001:db8:1:2:aaaa::1/128"),
        ("::", 64, "::/64"),
        # NAT64, well-known prefix (RFC 6052): the IPv4 client, whatever the IPv6 prefix.
        ("64:ff9b::c633:6407", 64, "198.51.100.7"),
        ("64:ff9b::198.51.100.8", 128, "198.51.100.8"),
        ("64:ff9b::c633:6407", 32, "198.51.100.7"),
        # Just outside 64:ff9b::/96: an IPv6 client like any other.
        ("64:ff9b::1:c633:6407", 64, "64:ff9b::/64"),
        ("64:ff9b:0:1::c633:6407", 64, "64:ff9b:0:1::/64"),
        # NAT64, local-use prefix 64:ff9b:1::/48 (RFC 8215), RFC 6052's /48 layout: the IPv4
        # address in bits 48-63 and 72-87, around the u octet (bits 64-71).
        ("64:ff9b:1:c633:64:700::", 64, "198.51.100.7"),
        ("64:ff9b:1:c633:64:700::", 128, "198.51.100.7"),
        # RFC 6052 section 2.4's own /48 example, 2001:db8:122:c000:2:2100:: for 192.0.2.33
        # under 2001:db8:122::/48, with the local-use prefix in place of 2001:db8:122.
        ("64:ff9b:1:c000:2:2100::", 64, "192.0.2.33"),
        # Just outside 64:ff9b:1::/48.
        ("64:ff9b:2:c633:64:700::", 64, "64:ff9b:2:c633::/64"),
    ],
)
def test_label(address: str, prefix: int, label: str) -> None:
    assert client_label(ip_address(address), prefix) == label


# RFC 6052 section 2.4's table: 192.0.2.33 under each prefix length. Only the /48 and /96
# rows have a built-in prefix of that length here; the others must stay IPv6 clients.
RFC_6052_TABLE = [
    ("2001:db8::/32", "2001:db8:c000:221::"),
    ("2001:db8:100::/40", "2001:db8:1c0:2:21::"),
    ("2001:db8:122::/48", "2001:db8:122:c000:2:2100::"),
    ("2001:db8:122:300::/56", "2001:db8:122:3c0:0:221::"),
    ("2001:db8:122:344::/64", "2001:db8:122:344:c0:2:2100:0"),
    ("2001:db8:122:344::/96", "2001:db8:122:344::192.0.2.33"),
    ("64:ff9b::/96", "64:ff9b::192.0.2.33"),
]


def embed(prefix: IPv6Network, v4: IPv4Address) -> IPv6Address:
    """RFC 6052 section 2.2, written from its figure for the /48 and /96 rows only."""
    value = int(v4)
    if prefix.prefixlen == 96:
        return IPv6Address(int(prefix.network_address) | value)
    assert prefix.prefixlen == 48
    # Octets 1-2 of the IPv4 address in bits 48-63, then the u octet (zero), then octets 3-4.
    return IPv6Address(int(prefix.network_address) | (value >> 16) << 64 | (value & 0xFFFF) << 40)


@pytest.mark.parametrize(("prefix", "address"), RFC_6052_TABLE)
def test_the_embedding_matches_rfc_6052s_table(prefix: str, address: str) -> None:
    network = IPv6Network(prefix)
    if network.prefixlen in (48, 96):
        assert embed(network, IPv4Address("192.0.2.33")) == IPv6Address(address)
    # Listed by the operator, the /96 row is the IPv4 client; every other row is not NAT64.
    extra = (network,) if network.prefixlen == 96 else ()
    expected = "192.0.2.33" if extra else str(IPv6Network((address, 64), strict=False))
    assert client_label(ip_address(address), 64, extra) == expected


@given(
    v4=st.integers(0, 0xFFFFFFFF).map(IPv4Address),
    prefix=st.sampled_from([WELL_KNOWN_NAT64_PREFIX, LOCAL_USE_NAT64_PREFIX, OPERATOR[0]]),
    ipv6_prefix=st.sampled_from([32, 48, 64, 96, 128]),
)
def test_every_nat64_address_is_the_ipv4_client_it_carries(
    v4: IPv4Address, prefix: IPv6Network, ipv6_prefix: int
) -> None:
    address = embed(prefix, v4)
    assert client_key(address, ipv6_prefix, OPERATOR) == client_key(v4) == int(v4)
    assert client_label(address, ipv6_prefix, OPERATOR) == str(v4)
    assert embedded_ipv4(address, OPERATOR) == v4
    assert describe_client(address, ipv6_prefix, OPERATOR) == f"{address} (as {v4})"


def test_operator_prefixes_count_only_when_listed() -> None:
    address = ip_address("2001:db8:64::c633:6407")
    assert client_label(address) == "2001:db8:64::/64"
    assert client_label(address, 64, OPERATOR) == "198.51.100.7"
    assert client_key(address, 64, OPERATOR) == client_key(IPv4Address("198.51.100.7"))
    assert embedded_ipv4(address) is None
    # The neighbouring /96 is not listed.
    assert client_label(ip_address("2001:db8:64:0:1::c633:6407"), 64, OPERATOR) == (
        "2001:db8:64::/64"
    )


def test_an_operator_96_inside_the_local_use_48_wins() -> None:
    # RFC 8215 lets an operator deploy a /96 out of 64:ff9b:1::/48; read with the /48 layout,
    # all of its clients would be 0.0.0.0 (one client again).
    address = ip_address("64:ff9b:1::c633:6407")
    assert client_label(address) == "0.0.0.0"
    listed = (IPv6Network("64:ff9b:1::/96"),)
    assert client_label(address, 64, listed) == "198.51.100.7"
    assert client_label(ip_address("64:ff9b:1::c633:6408"), 64, listed) == "198.51.100.8"


def test_nat64_neighbours_are_different_clients() -> None:
    one, other = ip_address("64:ff9b::c633:6407"), ip_address("64:ff9b::c633:6408")
    assert client_key(one) != client_key(other)
    assert client_label(one) != client_label(other)
    # And the same client as the IPv4 address itself, however it arrives.
    assert client_key(one) == client_key(ip_address("::ffff:198.51.100.7"))
    assert client_key(one) == client_key(ip_address("198.51.100.7"))


def test_describe_client() -> None:
    assert describe_client(ip_address("64:ff9b::c633:6407")) == (
        "64:ff9b::c633:6407 (as 198.51.100.7)"
    )
    assert describe_client(ip_address("64:ff9b:1:c633:64:700::")) == (
        "64:ff9b:1:c633:64:700:: (as 198.51.100.7)"
    )
    assert describe_client(ip_address("2001:db8::1")) == "2001:db8::/64"
    assert describe_client(ip_address("2001:db8::1"), 128) == "2001:db8::1/128"
    assert describe_client(ip_address("198.51.100.7")) == "198.51.100.7"
    assert embedded_ipv4(ip_address("198.51.100.7")) is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("2001:db8:64::/64", "'2001:db8:64::/64' is a /64; a NAT64 prefix must be given as a /96"),
        ("2001:db8:64::/104", "is a /104"),
        ("2001:db8:64::", "write it with its length, '2001:db8:64::/96'"),
        ("2001:db8:64::1/96", "with no bits set after the prefix"),
        ("10.0.0.0/8", "'10.0.0.0/8' is not a NAT64 prefix: it is IPv4, not IPv6"),
        ("fe80::%eth0/96", "'fe80::%eth0/96' is not a NAT64 prefix"),
        (" 2001:db8:64::/96", "' 2001:db8:64::/96' is not a NAT64 prefix"),
        ("nat64", "'nat64' is not a NAT64 prefix"),
        (IPv6Network("2001:db8::/64"), "'2001:db8::/64' is a /64"),
    ],
)
def test_parse_nat64_prefix_refuses(entry: str | IPv6Network, message: str) -> None:
    with pytest.raises(ValueError, match="NAT64 prefix") as raised:
        parse_nat64_prefix(entry)
    assert message in str(raised.value)


def test_parse_nat64_prefix() -> None:
    assert parse_nat64_prefix("2001:DB8:64::/96") == OPERATOR[0]
    assert parse_nat64_prefix(OPERATOR[0]) == OPERATOR[0]
    with pytest.raises(TypeError):
        parse_nat64_prefix(96)  # type: ignore[arg-type]


def test_the_two_forms_name_the_same_clients() -> None:
    addresses = [
        ip_address(text)
        for text in (
            "198.51.100.7",
            "::ffff:198.51.100.7",
            "198.51.100.8",
            "2001:db8::1",
            "2001:db8::ffff:1",
            "2001:db8:0:1::1",
            "::c633:6407",  # the IPv4-compatible form: IPv6, not the IPv4 client
            "64:ff9b::c633:6407",
            "64:ff9b::c633:6408",
            "64:ff9b::1:c633:6407",
            "64:ff9b:1:c633:64:700::",
            "64:ff9b:1:c633:ff64:7ff::",  # u octet and suffix set: still 198.51.100.7
            "64:ff9b:1::c633:6407",
            "2001:db8:64::c633:6407",
            "2001:db8:64::c633:6408",
        )
    ]
    nat64_options: list[Nat64Prefixes] = [(), OPERATOR, (IPv6Network("64:ff9b:1::/96"),)]
    for nat64 in nat64_options:
        for prefix in (32, 48, 64, 128):
            for a in addresses:
                for b in addresses:
                    same_key = client_key(a, prefix, nat64) == client_key(b, prefix, nat64)
                    same_label = client_label(a, prefix, nat64) == client_label(b, prefix, nat64)
                    assert same_key == same_label, (a, b, prefix, nat64)


def test_families_never_collide() -> None:
    v4 = IPv4Address("198.51.100.7")
    assert client_key(IPv6Address(int(v4))) != client_key(v4)
    assert client_key(IPv6Address(int(v4) << 64)) != client_key(v4)


def test_default_prefix_is_a_64() -> None:
    assert DEFAULT_IPV6_PREFIX == 64
    assert client_label(ip_address("2001:db8::1")) == "2001:db8::/64"


# -- through the real hooks ------------------------------------------------------------------------

NAT64_CLIENT = "64:ff9b::c633:6407"
NAT64_NEIGHBOUR = "64:ff9b::c633:6408"


def with_nat64(conf: Settings, *prefixes: str) -> Settings:
    return attrs.evolve(conf, system=attrs.evolve(conf.system, nat64_prefixes=list(prefixes)))


async def test_three_failures_ban_one_nat64_client_not_its_neighbours(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mailedge.hooks.autoban")
    conf = settings(auto_ban=AutoBanSettings(failures=3, window=60.0, duration=600.0))
    ban = AutoBan(lambda: conf)
    for _ in range(3):
        await ban.on_auth_failure(context(NAT64_CLIENT), "alice")
    assert not (await ban.on_connect(context(NAT64_CLIENT))).accepted
    assert (await ban.on_connect(context(NAT64_NEIGHBOUR))).accepted
    # The ban is on the IPv4 client: it arrives over IPv4 too, and it is lifted by either name.
    assert not (await ban.on_connect(context("198.51.100.7"))).accepted
    assert [b.key for b in await ban.bans()] == ["198.51.100.7"]
    assert "banned 64:ff9b::c633:6407 (as 198.51.100.7) until" in caplog.text
    assert await ban.lift(NAT64_CLIENT)
    assert (await ban.on_connect(context(NAT64_CLIENT))).accepted


async def test_an_operator_nat64_prefix_bans_one_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    auto_ban = AutoBanSettings(failures=3, window=60.0, duration=600.0)
    conf = with_nat64(settings(auto_ban=auto_ban), "2001:db8:64::/96")
    ban = AutoBan(lambda: conf)
    for _ in range(3):
        await ban.on_auth_failure(context("2001:db8:64::c633:6407"), "alice")
    assert not (await ban.on_connect(context("2001:db8:64::c633:6407"))).accepted
    assert (await ban.on_connect(context("2001:db8:64::c633:6408"))).accepted


async def test_one_nat64_client_does_not_spend_anothers_rate_budget(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailedge.hooks.ratelimit")
    conf = settings(listener(rate_limit_connections=RateLimit.parse("2/1m")))
    hooks = RateLimitHooks(lambda: conf)
    verdicts = [(await hooks.on_connect(context(NAT64_CLIENT))).accepted for _ in range(3)]
    assert verdicts == [True, True, False]
    assert (await hooks.on_connect(context(NAT64_NEIGHBOUR))).accepted
    assert (await hooks.on_connect(context("64:ff9b:1:c633:64:800::"))).accepted
    assert "for 64:ff9b::c633:6407 (as 198.51.100.7); retry in" in caplog.text


async def test_an_operator_nat64_prefix_in_the_rate_limits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conf = settings(listener(rate_limit_connections=RateLimit.parse("1/1m")))
    conf = with_nat64(conf, "2001:db8:64::/96")
    hooks = RateLimitHooks(lambda: conf)
    assert (await hooks.on_connect(context("2001:db8:64::c633:6407"))).accepted
    assert not (await hooks.on_connect(context("2001:db8:64::c633:6407"))).accepted
    assert (await hooks.on_connect(context("2001:db8:64::c633:6408"))).accepted


def test_per_ip_connection_slots_count_nat64_clients_apart() -> None:
    limits = ConnectionLimits()
    one, other = ip_address(NAT64_CLIENT), ip_address(NAT64_NEIGHBOUR)
    assert limits.take_client_slot("smtp", one, 1)
    assert not limits.take_client_slot("smtp", one, 1)
    assert limits.take_client_slot("smtp", other, 1)
    # The same IPv4 client, through an operator's prefix: its slot is taken already.
    assert not limits.take_client_slot("smtp", ip_address("2001:db8:64::c633:6407"), 1, OPERATOR)
    operator = ip_address("2001:db8:64::c633:6409")
    assert limits.take_client_slot("smtp", operator, 1, OPERATOR)
    assert limits.take_client_slot("smtp", ip_address("2001:db8:64::c633:640a"), 1, OPERATOR)
    assert limits.open_from("smtp", operator, OPERATOR) == 1
    limits.release_client_slot("smtp", operator, OPERATOR)
    limits.release_client_slot("smtp", one)
    assert limits.open_from("smtp", one) == 0
    assert limits.open_from("smtp", other) == 1


def test_system_settings_take_nat64_prefixes() -> None:
    system = SystemSettings(nat64_prefixes=["2001:db8:64::/96"])
    assert system.nat64_prefixes == OPERATOR
    assert SystemSettings().nat64_prefixes == ()
