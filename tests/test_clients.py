from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from mailedge.clients import DEFAULT_IPV6_PREFIX, client_key, client_label


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
    ],
)
def test_label(address: str, prefix: int, label: str) -> None:
    assert client_label(ip_address(address), prefix) == label


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
        )
    ]
    for prefix in (32, 48, 64, 128):
        for a in addresses:
            for b in addresses:
                same_key = client_key(a, prefix) == client_key(b, prefix)
                assert same_key == (client_label(a, prefix) == client_label(b, prefix)), (a, b)


def test_families_never_collide() -> None:
    v4 = IPv4Address("198.51.100.7")
    assert client_key(IPv6Address(int(v4))) != client_key(v4)
    assert client_key(IPv6Address(int(v4) << 64)) != client_key(v4)


def test_default_prefix_is_a_64() -> None:
    assert DEFAULT_IPV6_PREFIX == 64
    assert client_label(ip_address("2001:db8::1")) == "2001:db8::/64"
