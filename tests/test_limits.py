"""Connection limits: per listener, per client, IPv6 counted per /64."""

from __future__ import annotations

import ipaddress

from mailedge.limits import ConnectionLimits, client_key

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
