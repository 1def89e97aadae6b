"""GCRA leases: how many tokens to ask for, when to spend them, and what to hand back."""

from __future__ import annotations

import pytest

from mailedge.hooks.leases import (
    LEASE_SECONDS,
    MAX_LEASE,
    LeaseTable,
    burst_of,
    lease_cap,
    spare_cap,
)
from mailedge.settings import RateLimit


def limit(text: str) -> tuple[float, float]:
    rate = RateLimit.parse(text)
    return rate.emission_interval, rate.burst_tolerance


@pytest.mark.parametrize(
    ("text", "cap"),
    [
        ("1/1s", 1),
        ("10/1m", 1),
        ("39/1m", 1),  # below two leases' worth: every decision is the exact one-step one
        ("40/1m", 2),
        ("100/1m", 5),
        ("1000/1h", 50),
        ("100000/1s", MAX_LEASE),
    ],
)
def test_a_lease_holds_at_most_a_twentieth_of_the_burst(text: str, cap: int) -> None:
    assert lease_cap(*limit(text)) == cap


def test_the_first_decision_asks_for_one_token() -> None:
    table = LeaseTable()
    assert table.want("k", *limit("100/1m"), now=0.0) == (1, 0)
    assert not table.spend("k", *limit("100/1m"), now=0.0)


def test_a_busy_client_gets_a_larger_lease_and_spends_it_locally() -> None:
    table = LeaseTable()
    interval, tolerance = limit("1000/1h")  # cap 50
    table.granted("k", interval, tolerance, 0.0, 1)
    # Back 0.1 s later: 10 per second, so a 2 s lease of 20.
    want, unused = table.want("k", interval, tolerance, now=0.1)
    assert (want, unused) == (20, 0)
    table.granted("k", interval, tolerance, 0.1, want)
    spent = [table.spend("k", interval, tolerance, now=0.1 + i * 0.01) for i in range(20)]
    assert spent == [True] * 19 + [False]
    assert table.spent == 19
    # Twenty in 0.2 s is 100 per second: the cap holds it to 50.
    assert table.want("k", interval, tolerance, now=0.3) == (50, 0)


def test_a_slow_client_keeps_asking_for_one() -> None:
    table = LeaseTable()
    interval, tolerance = limit("1000/1h")
    for minute in range(5):
        now = minute * 60.0
        assert not table.spend("k", interval, tolerance, now)
        assert table.want("k", interval, tolerance, now) == (1, 0)
        table.granted("k", interval, tolerance, now, 1)


def test_tokens_are_not_spent_after_the_lease_expires_and_are_handed_back() -> None:
    table = LeaseTable()
    interval, tolerance = limit("1000/1h")
    table.granted("k", interval, tolerance, 0.0, 10)
    assert table.spend("k", interval, tolerance, now=1.0)
    assert table.held == 8
    assert not table.spend("k", interval, tolerance, now=LEASE_SECONDS)
    # Two of ten were spent in the lease's life: ask for two, and hand the eight back.
    assert table.want("k", interval, tolerance, now=LEASE_SECONDS) == (2, 8)
    assert table.held == 0


def test_the_sweep_hands_back_what_expired_leases_hold_and_forgets_old_ones() -> None:
    table = LeaseTable()
    interval, tolerance = limit("1000/1h")
    table.granted("a", interval, tolerance, 0.0, 10)
    table.granted("b", interval, tolerance, 1.0, 10)
    assert table.sweep(now=1.0) == []
    assert table.sweep(now=LEASE_SECONDS) == [("a", interval, 9)]
    assert table.sweep(now=LEASE_SECONDS) == []  # handed back once
    assert table.sweep(now=1.0 + LEASE_SECONDS) == [("b", interval, 9)]
    assert repr(table) == "<LeaseTable keys=2 held=0 unrested=0>"
    table.sweep(now=1.0 + 2 * LEASE_SECONDS)
    assert repr(table) == "<LeaseTable keys=0 held=0 unrested=0>"


def test_a_changed_limit_starts_again_and_hands_back() -> None:
    table = LeaseTable()
    old, new = limit("1000/1h"), limit("2000/1h")
    table.granted("k", *old, 0.0, 10)
    assert not table.spend("k", *new, now=0.1)
    assert table.want("k", *new, now=0.1) == (1, 9)
    assert table.held == 0


def test_small_limits_and_a_full_table_keep_no_lease() -> None:
    table = LeaseTable(max_keys=2)
    table.granted("small", *limit("10/1m"), 0.0, 1)
    assert repr(table) == "<LeaseTable keys=0 held=0 unrested=0>"
    interval, tolerance = limit("1000/1h")
    for key in ("a", "b", "c"):
        table.granted(key, interval, tolerance, 0.0, 5)
    assert repr(table) == "<LeaseTable keys=2 held=8 unrested=0>"
    assert not table.spend("c", interval, tolerance, now=0.0)
    assert table.want("c", interval, tolerance, now=0.0) == (1, 0)


@pytest.mark.parametrize(("limit", "spares"), [(1, 0), (19, 0), (20, 1), (100, 5), (10_000, 64)])
def test_spare_connection_slots_are_a_twentieth_of_the_limit(limit: int, spares: int) -> None:
    assert spare_cap(limit) == spares


def test_a_rested_client_gets_one_credit_until_a_reply_says_when_it_is_full_again() -> None:
    table = LeaseTable()
    interval, tolerance = limit("1000/1h")  # T = 3.6 s
    assert table.credit("k", interval, tolerance, now=0.0)
    assert not table.credit("k", interval, tolerance, now=0.0)  # its reply is awaited
    table.settled("k", 0.01, rested_in=interval)  # one token in use: full again in T
    assert not table.credit("k", interval, tolerance, now=1.0)
    table.sweep(now=0.01 + interval)
    assert table.credit("k", interval, tolerance, now=0.01 + interval)
    assert table.credited == 2


def test_a_client_at_its_limit_gets_no_credit_until_its_bucket_drains() -> None:
    table = LeaseTable()
    interval, tolerance = limit("1000/1h")
    # Refused: one more fits in 1 s, and the whole burst an hour after that.
    table.settled("k", 0.0, rested_in=1.0 + tolerance)
    assert not table.credit("k", interval, tolerance, now=tolerance)
    assert table.credit("k", interval, tolerance, now=1.0 + tolerance)
    table.settled("other", 0.0, rested_in=0.0)  # full now: nothing to remember
    assert repr(table).endswith("unrested=1>")


def test_no_credit_for_small_limits_or_with_the_table_full() -> None:
    table = LeaseTable(max_keys=1)
    assert not table.credit("small", *limit("9/1m"), now=0.0)
    assert table.credit("a", *limit("10/1m"), now=0.0)
    assert not table.credit("b", *limit("1000/1h"), now=0.0)


def test_a_reply_the_full_table_could_not_keep_stops_credit_until_that_bucket_is_full() -> None:
    table = LeaseTable(max_keys=1)
    interval, tolerance = limit("1000/1h")
    assert table.credit("a", interval, tolerance, now=0.0)
    # "b" refused while the table is full: not remembered.
    table.settled("b", 0.0, rested_in=60.0)
    table.settled("a", 0.0, rested_in=0.0)  # room again
    # "b" must not pass for a client never seen; nor may any other absent client, which
    # cannot be told from it.
    assert not table.credit("b", interval, tolerance, now=1.0)
    assert not table.credit("c", interval, tolerance, now=59.0)
    assert table.credit("b", interval, tolerance, now=60.0)
    assert not table.credit("b", *limit("1000/1h"), now=0.0)


@pytest.mark.parametrize(("text", "burst"), [("1/1s", 1), ("9/1m", 9), ("60/1m", 60)])
def test_the_burst_of_a_limit_is_its_count(text: str, burst: int) -> None:
    assert burst_of(*limit(text)) == burst
