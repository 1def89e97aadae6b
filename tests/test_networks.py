"""Tests for mailedge.networks: parsing entries, membership, and the set operations."""

from __future__ import annotations

import functools
import pickle
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailedge.networks import (
    InvalidNetworkError,
    IPAddress,
    IPNetwork,
    NetworkEntry,
    TrustedNetworks,
    normalize_ip,
    parse_network,
)


def ip(text: str) -> IPAddress:
    return ip_address(text)


# -- membership ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "inside", "outside"),
    [
        # First and last address of the range are in; the neighbours on each side are out.
        ("10.0.0.0/8", ["10.0.0.0", "10.255.255.255", "10.1.2.3"], ["9.255.255.255", "11.0.0.0"]),
        ("192.0.2.128/25", ["192.0.2.128", "192.0.2.255"], ["192.0.2.127", "192.0.3.0"]),
        ("0.0.0.0/0", ["0.0.0.0", "255.255.255.255"], ["::", "::1"]),
        (
            "2001:db8::/32",
            ["2001:db8::", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"],
            ["2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db9::", "10.0.0.1"],
        ),
        ("::/0", ["::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"], ["0.0.0.0", "127.0.0.1"]),
        # Bare addresses are single hosts.
        ("192.0.2.1", ["192.0.2.1"], ["192.0.2.0", "192.0.2.2"]),
        ("::1", ["::1"], ["::", "::2", "127.0.0.1"]),
    ],
)
def test_membership_and_boundaries(entry: str, inside: list[str], outside: list[str]) -> None:
    networks = TrustedNetworks([entry])
    for text in inside:
        assert ip(text) in networks, text
    for text in outside:
        assert ip(text) not in networks, text


def test_mapped_peer_matches_ipv4_entries() -> None:
    # What a dual-stack (::) socket reports for an IPv4 client.
    networks = TrustedNetworks(["127.0.0.0/8", "192.0.2.7"])
    assert ip("::ffff:127.0.0.1") in networks
    assert ip("::ffff:127.255.255.255") in networks
    assert ip("::ffff:192.0.2.7") in networks
    assert ip("::ffff:128.0.0.0") not in networks
    assert ip("::ffff:192.0.2.8") not in networks


def test_mapped_entry_is_stored_as_ipv4() -> None:
    networks = TrustedNetworks(["::ffff:10.0.0.0/104", "::ffff:192.0.2.1", "::ffff:0:0/96"])
    assert networks.networks == (
        IPv4Network("10.0.0.0/8"),
        IPv4Network("192.0.2.1/32"),
        IPv4Network("0.0.0.0/0"),
    )
    assert TrustedNetworks(["::ffff:10.0.0.0/104"]) == TrustedNetworks(["10.0.0.0/8"])
    assert ip("10.1.2.3") in TrustedNetworks(["::ffff:10.0.0.0/104"])
    assert ip("::ffff:10.1.2.3") in TrustedNetworks(["::ffff:10.0.0.0/104"])
    assert ip("11.0.0.0") not in TrustedNetworks(["::ffff:10.0.0.0/104"])


def test_ipv6_entries_never_match_ipv4_peers() -> None:
    # "::/0" means every IPv6 address, not every address: IPv4 peers need an IPv4 entry.
    networks = TrustedNetworks(["::/0"])
    assert ip("192.0.2.1") not in networks
    assert ip("::ffff:192.0.2.1") not in networks
    # IPv4-compatible (::a.b.c.d) and NAT64 addresses are IPv6, and stay IPv6.
    assert TrustedNetworks(["::192.0.2.1"]).networks == (IPv6Network("::c000:201/128"),)
    assert ip("192.0.2.1") not in TrustedNetworks(["::192.0.2.1", "64:ff9b::/96"])


def test_object_entries() -> None:
    networks = TrustedNetworks(
        [
            IPv4Network("10.0.0.0/8"),
            IPv6Network("2001:db8::/32"),
            IPv4Address("192.0.2.1"),
            IPv6Address("::1"),
            IPv6Address("::ffff:198.51.100.1"),
            IPv6Network("::ffff:203.0.113.0/120"),
        ]
    )
    assert [str(network) for network in networks] == [
        "10.0.0.0/8",
        "2001:db8::/32",
        "192.0.2.1/32",
        "::1/128",
        "198.51.100.1/32",
        "203.0.113.0/24",
    ]
    assert ip("::ffff:203.0.113.9") in networks


def test_scoped_peer_matches_by_address() -> None:
    # A link-local peer comes with its interface; matching is by address alone.
    assert IPv6Address("fe80::1%eth0") in TrustedNetworks(["fe80::/64"])


def test_membership_requires_an_address_object() -> None:
    networks = TrustedNetworks(["127.0.0.0/8"])
    with pytest.raises(TypeError, match="IPv4Address or IPv6Address, not str"):
        _ = "127.0.0.1" in networks


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("10.0.0.300/8", "'10.0.0.300/8' is not an IP network"),
        ("10.0.0.300", "'10.0.0.300' is not an IP network"),
        ("localhost", "'localhost' is not an IP network"),
        ("10.0.0/8", "'10.0.0/8' is not an IP network"),
        ("010.0.0.0/8", "'010.0.0.0/8' is not an IP network"),
        ("2001:db8::g/32", "'2001:db8::g/32' is not an IP network"),
        ("1::2::3", "'1::2::3' is not an IP network"),
        ("", "'' is not an IP network: the entry is empty"),
        (" 10.0.0.0/8", "' 10.0.0.0/8' is not an IP network: remove the whitespace"),
        ("10.0.0.0/8 ", "'10.0.0.0/8 ' is not an IP network: remove the whitespace"),
        ("10.0.0.0 /8", "'10.0.0.0 /8' is not an IP network: remove the whitespace"),
        ("10.0.0.0/8\n", "'10.0.0.0/8\\n' is not an IP network: remove the whitespace"),
        ("fe80::1%eth0", "'fe80::1%eth0' is not an IP network: zone ids ('%eth0') are not allowed"),
        (
            "fe80::%en0/64",
            "'fe80::%en0/64' is not an IP network: zone ids ('%en0') are not allowed",
        ),
        (
            "10.0.0.0/33",
            "'10.0.0.0/33' is not an IP network: the prefix length must be a number from 0 to 32",
        ),
        (
            "::/129",
            "'::/129' is not an IP network: the prefix length must be a number from 0 to 128",
        ),
        (
            "10.0.0.0/08",
            "'10.0.0.0/08' is not an IP network: the prefix length must be a number from 0 to 32",
        ),
        (
            "10.0.0.0/",
            "'10.0.0.0/' is not an IP network: the prefix length must be a number from 0 to 32",
        ),
        (
            "10.0.0.0/255.0.0.0",
            "'10.0.0.0/255.0.0.0' is not an IP network: "
            "the prefix length must be a number from 0 to 32",
        ),
        (
            "10.0.0.0/8/8",
            "'10.0.0.0/8/8' is not an IP network: the prefix length must be a number from 0 to 32",
        ),
        (
            "10.0.0.0/\N{DIGIT EIGHT}\N{ARABIC-INDIC DIGIT EIGHT}",
            "'10.0.0.0/8\N{ARABIC-INDIC DIGIT EIGHT}' is not an IP network: "
            "the prefix length must be a number from 0 to 32",
        ),
    ],
)
def test_bad_entries_are_named(entry: str, message: str) -> None:
    with pytest.raises(InvalidNetworkError) as caught:
        TrustedNetworks(["127.0.0.1", entry])
    assert str(caught.value) == message
    assert caught.value.entry == entry
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "10.0.0.1/8",
            "'10.0.0.1/8' has host bits set: write '10.0.0.0/8' for the network "
            "or '10.0.0.1' for one host",
        ),
        (
            "192.168.1.1/24",
            "'192.168.1.1/24' has host bits set: write '192.168.1.0/24' for the network "
            "or '192.168.1.1' for one host",
        ),
        (
            "2001:db8::1/32",
            "'2001:db8::1/32' has host bits set: write '2001:db8::/32' for the network "
            "or '2001:db8::1' for one host",
        ),
        (
            "::ffff:10.0.0.1/104",
            "'::ffff:10.0.0.1/104' has host bits set: write '::ffff:10.0.0.0/104' for the "
            "network or '::ffff:10.0.0.1' for one host",
        ),
        (
            "0.0.0.1/0",
            "'0.0.0.1/0' has host bits set: write '0.0.0.0/0' for the network "
            "or '0.0.0.1' for one host",
        ),
    ],
)
def test_host_bits_are_rejected_with_both_fixes(entry: str, message: str) -> None:
    with pytest.raises(InvalidNetworkError) as caught:
        parse_network(entry)
    assert str(caught.value) == message
    assert caught.value.entry == entry


def test_full_length_prefix_is_a_host() -> None:
    assert parse_network("10.0.0.1/32") == IPv4Network("10.0.0.1/32")
    assert parse_network("::1/128") == IPv6Network("::1/128")
    assert parse_network("10.0.0.1") == IPv4Network("10.0.0.1/32")


@pytest.mark.parametrize(
    "entry", [IPv6Address("fe80::1%eth0"), IPv6Network("fe80::%eth0/64")], ids=repr
)
def test_zone_ids_are_rejected_on_objects(entry: NetworkEntry) -> None:
    with pytest.raises(InvalidNetworkError, match="zone ids are not allowed") as caught:
        parse_network(entry)
    assert caught.value.entry is entry


def test_wrong_types_are_type_errors() -> None:
    with pytest.raises(TypeError, match=r"write TrustedNetworks\(\['10.0.0.0/8'\]\)"):
        TrustedNetworks("10.0.0.0/8")
    with pytest.raises(TypeError, match="not int"):
        TrustedNetworks([167772160])  # type: ignore[list-item]


# -- the set ----------------------------------------------------------------------------------


def test_dedup_keeps_input_order() -> None:
    networks = TrustedNetworks(["::1", "10.0.0.0/8", "::1", "::ffff:10.0.0.0/104", "127.0.0.1"])
    assert [str(network) for network in networks] == ["::1/128", "10.0.0.0/8", "127.0.0.1/32"]
    assert len(networks) == 3
    assert networks.networks == tuple(networks)


def test_overlapping_networks_are_kept_as_written() -> None:
    networks = TrustedNetworks(["10.0.0.0/8", "10.1.0.0/16"])
    assert len(networks) == 2
    assert ip("10.1.0.1") in networks


def test_empty_is_falsy() -> None:
    assert not TrustedNetworks()
    assert len(TrustedNetworks([])) == 0
    assert ip("127.0.0.1") not in TrustedNetworks()
    assert TrustedNetworks(["::1"])


def test_equality_and_hash_ignore_order_and_spelling() -> None:
    one = TrustedNetworks(["127.0.0.0/8", "::1"])
    two = TrustedNetworks(["::1/128", "127.0.0.0/8", "::ffff:127.0.0.0/104"])
    assert one == two
    assert hash(one) == hash(two)
    assert len({one, two}) == 1
    assert one != TrustedNetworks(["127.0.0.0/8"])
    assert one != ["127.0.0.0/8", "::1"]
    assert TrustedNetworks() == TrustedNetworks([])


def test_repr_is_short() -> None:
    assert repr(TrustedNetworks()) == "TrustedNetworks([])"
    assert repr(TrustedNetworks(["127.0.0.0/8", "::1"])) == (
        "TrustedNetworks(['127.0.0.0/8', '::1/128'])"
    )
    many = TrustedNetworks(f"10.{i}.0.0/16" for i in range(200))
    assert repr(many) == (
        "TrustedNetworks(['10.0.0.0/16', '10.1.0.0/16', '10.2.0.0/16', '10.3.0.0/16', "
        "... 196 more])"
    )


def test_union() -> None:
    system = TrustedNetworks(["127.0.0.0/8", "::1"])
    smtp = TrustedNetworks(["10.0.0.0/8", "127.0.0.0/8"])
    imap = TrustedNetworks(["2001:db8::/32"])
    merged = system.union(smtp, imap)
    assert [str(network) for network in merged] == [
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "2001:db8::/32",
    ]
    assert system | smtp | imap == merged
    assert system.union() == system
    assert ip("10.9.9.9") in merged
    assert ip("10.9.9.9") not in system


def test_or_with_something_else_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        _ = TrustedNetworks() | ["10.0.0.0/8"]


def test_immutable_and_picklable() -> None:
    networks = TrustedNetworks(["127.0.0.0/8", "::1"])
    with pytest.raises(AttributeError, match="immutable"):
        networks._networks = ()
    with pytest.raises(AttributeError, match="immutable"):
        del networks._networks
    copy = pickle.loads(pickle.dumps(networks))
    assert copy == networks
    assert ip("127.0.0.2") in copy


def test_normalize_ip() -> None:
    assert normalize_ip(ip("::ffff:192.0.2.1")) == IPv4Address("192.0.2.1")
    assert normalize_ip(ip("192.0.2.1")) == IPv4Address("192.0.2.1")
    assert normalize_ip(ip("::1")) == IPv6Address("::1")
    assert normalize_ip(ip("::192.0.2.1")) == IPv6Address("::192.0.2.1")


# -- against brute force ------------------------------------------------------------------------


def brute_force(networks: list[IPNetwork], address: IPAddress) -> bool:
    address = normalize_ip(address)
    return any(address in network for network in networks)


@st.composite
def networks_of_any_length(draw: st.DrawFn) -> IPNetwork:
    if draw(st.booleans()):
        prefixlen = draw(st.integers(0, 32))
        return IPv4Network((draw(st.integers(0, 2**32 - 1)), prefixlen), strict=False)
    prefixlen = draw(st.integers(0, 128))
    return IPv6Network((draw(st.integers(0, 2**128 - 1)), prefixlen), strict=False)


def address_near(data: st.DataObject, networks: list[IPNetwork]) -> IPAddress:
    """An address inside one of ``networks``, next to one, or anywhere."""
    choice = data.draw(st.sampled_from(["inside", "edge", "anywhere4", "anywhere6", "mapped"]))
    if networks and choice in {"inside", "edge", "mapped"}:
        network = data.draw(st.sampled_from(networks))
        base = int(network.network_address)
        if choice == "edge":
            offset = data.draw(st.sampled_from([-1, network.num_addresses]))
        else:
            offset = data.draw(st.integers(0, network.num_addresses - 1))
        value = (base + offset) % (2**network.max_prefixlen)
        if isinstance(network, IPv4Network):
            address = IPv4Address(value)
            return IPv6Address((0xFFFF << 32) | value) if choice == "mapped" else address
        return IPv6Address(value)
    if choice == "anywhere6":
        return IPv6Address(data.draw(st.integers(0, 2**128 - 1)))
    return IPv4Address(data.draw(st.integers(0, 2**32 - 1)))


@given(st.data(), st.lists(networks_of_any_length(), max_size=20))
def test_membership_matches_brute_force(data: st.DataObject, networks: list[IPNetwork]) -> None:
    trusted = TrustedNetworks(networks)
    for _ in range(10):
        address = address_near(data, networks)
        assert (address in trusted) == brute_force(networks, address), address


@functools.cache
def thousands() -> tuple[dict[int, list[IPNetwork]], TrustedNetworks]:
    """2,500 /24s and 2,500 /48s, clustered so that random addresses hit some of them."""
    rng = random.Random(2024)
    by_version: dict[int, list[IPNetwork]] = {4: [], 6: []}
    for _ in range(2_500):
        # Inside 10.0.0.0/8 there are 65,536 /24s: about one in twenty-six is listed.
        by_version[4].append(IPv4Network(((10 << 24) | (rng.getrandbits(16) << 8), 24)))
        # Inside 2001:db8::/32 there are 65,536 /48s.
        by_version[6].append(IPv6Network(((0x20010DB8 << 96) | (rng.getrandbits(16) << 80), 48)))
    return by_version, TrustedNetworks(by_version[4] + by_version[6])


@given(st.data())
def test_thousands_of_entries_match_brute_force(data: st.DataObject) -> None:
    by_version, trusted = thousands()
    assert len(trusted) == len(set(by_version[4])) + len(set(by_version[6]))
    kind = data.draw(st.sampled_from(["listed", "v4", "v6", "mapped"]))
    address: IPAddress
    if kind == "listed":
        address = address_near(data, by_version[4] + by_version[6])
    elif kind == "v6":
        address = IPv6Address((0x20010DB8 << 96) | data.draw(st.integers(0, 2**96 - 1)))
    else:
        value = (10 << 24) | data.draw(st.integers(0, 2**24 - 1))
        address = IPv6Address((0xFFFF << 32) | value) if kind == "mapped" else IPv4Address(value)
    # Brute force over the networks of the address's own version only, to keep it quick.
    expected = brute_force(by_version[normalize_ip(address).version], address)
    assert (address in trusted) == expected, address
