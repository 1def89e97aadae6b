"""The decision ring: bounded, newest first, live subscribers, capped peer labels."""

from __future__ import annotations

import ipaddress

import pytest
import trio
import trio.testing

from mailedge.decisions import OTHER_PEERS, DecisionRing, PeerCounts, fan_out
from mailedge.events import EventName, GateEvent, GateReason
from mailedge.gate import ProxyGate
from mailedge.settings import NetworkListener, Settings, SystemSettings


def event(n: int, name: EventName = EventName.DIRECT, peer: str = "192.0.2.1") -> GateEvent:
    return GateEvent(
        name=name,
        listener="smtp",
        connection_id=n,
        peer_ip=ipaddress.ip_address(peer),
        peer_port=40000 + n,
        reason=GateReason.UNTRUSTED_HEADER
        if name is EventName.UNTRUSTED_HEADER
        else GateReason.UNTRUSTED,
        message=f"decision {n}",
        elapsed=0.0,
    )


def test_the_ring_keeps_the_newest_and_lists_them_first() -> None:
    ring = DecisionRing(size=3, wall_clock=lambda: 1_700_000_000.0)
    for n in range(5):
        ring.record(event(n))
    assert [d.connection_id for d in ring.recent()] == [4, 3, 2]
    first = ring.recent()[0].to_json()
    assert first == {
        "time": 1_700_000_000.0,
        "listener": "smtp",
        "connection_id": 4,
        "event": "proxy.direct",
        "reason": "untrusted",
        "peer": "192.0.2.1:40004",
        "client": None,
        "message": "decision 4",
        "first_bytes": None,
    }
    assert ring.counts() == {("smtp", "proxy.direct"): 3}


def test_the_ring_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="size"):
        DecisionRing(size=0)


async def test_subscribers_get_new_decisions_and_a_slow_one_drops_the_excess() -> None:
    ring = DecisionRing()
    with ring.subscribe(queue=2) as fast, ring.subscribe(queue=2) as slow:
        ring.record(event(1))
        assert (await fast.receive()).connection_id == 1
        ring.record(event(2))
        ring.record(event(3))
        assert [(await fast.receive()).connection_id for _ in range(2)] == [2, 3]
        # slow read nothing: its queue took 1 and 2, and 3 was dropped for it alone.
        assert slow.dropped == 1
        assert [(await slow.receive()).connection_id for _ in range(2)] == [1, 2]
    assert "subscribers=0" in repr(ring)
    ring.record(event(4))  # no subscriber left to hand it to


def test_peer_labels_are_capped_and_the_rest_is_other() -> None:
    counts = PeerCounts(labels=2)
    for peer in ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.1", "192.0.2.4"]:
        counts.add("smtp", peer)
    assert dict(counts) == {
        ("smtp", "192.0.2.1"): 2,
        ("smtp", "192.0.2.2"): 1,
        ("smtp", OTHER_PEERS): 2,
    }


def test_only_untrusted_headers_are_counted_by_peer() -> None:
    ring = DecisionRing()
    ring.record(event(1))
    ring.record(event(2, EventName.UNTRUSTED_HEADER, peer="198.51.100.9"))
    assert dict(ring.untrusted_peers) == {("smtp", "198.51.100.9"): 1}


def test_fan_out_calls_every_sink_in_order() -> None:
    seen: list[str] = []
    sink = fan_out(lambda e: seen.append(f"a{e.connection_id}"), lambda e: seen.append("b"))
    sink(event(7))
    assert seen == ["a7", "b"]


async def test_a_gate_with_the_ring_as_sink_records_routine_decisions() -> None:
    settings = Settings(
        system=SystemSettings(proxy_trusted_networks=["10.0.0.0/8"]),
        listeners=[NetworkListener(name="smtp", protocol="smtp", bind="127.0.0.1:25")],
    )
    ring = DecisionRing()
    gate = ProxyGate(settings, on_event=ring.record)
    ours, _theirs = trio.testing.memory_stream_pair()
    await gate.admit(ours, listener="smtp", peer=("192.0.2.8", 5000), local=("127.0.0.1", 25))
    [decision] = ring.recent()
    assert (decision.event, decision.peer, decision.client) == (
        "proxy.direct",
        "192.0.2.8:5000",
        "192.0.2.8:5000",
    )


def test_decisions_are_numbered_and_read_after_a_number() -> None:
    ring = DecisionRing(size=3, wall_clock=lambda: 1_700_000_000.0)
    assert ring.last == 0
    assert ring.after(0) == ([], 0)
    for n in range(1, 6):
        ring.record(event(n))
    assert ring.last == 5
    # The ring holds 3, 4 and 5; 1 and 2 fell out of it.
    numbered, lost = ring.after(3)
    assert [(seq, d.connection_id) for seq, d in numbered] == [(4, 4), (5, 5)]
    assert lost == 0
    numbered, lost = ring.after(0)
    assert [seq for seq, _ in numbered] == [3, 4, 5]
    assert lost == 2
    assert ring.after(1) == (ring.after(0)[0], 1)
    assert ring.after(5) == ([], 0)
    # A number this ring never gave (another process's) gives nothing, not an error.
    assert ring.after(99) == ([], 0)
    assert numbered[0][1] == ring.recent()[-1]


def test_each_ring_has_its_own_epoch() -> None:
    assert DecisionRing().epoch != DecisionRing().epoch
    assert DecisionRing(epoch="abc").epoch == "abc"


async def test_subscribers_get_the_numbers_too() -> None:
    ring = DecisionRing()
    ring.record(event(1))
    with ring.subscribe() as subscription:
        ring.record(event(2))
        seq, decision = await subscription.receive_numbered()
    assert (seq, decision.connection_id) == (2, 2)


def test_the_ring_keeps_the_event_and_builds_the_decision_when_read() -> None:
    clock = iter([1.0, 2.0])
    ring = DecisionRing(wall_clock=lambda: next(clock))
    ring.record(event(1))
    ring.record(event(2))
    # The time is the one recorded, not the time of reading.
    assert [d.time for d in ring.recent()] == [2.0, 1.0]
    assert [d.time for d in ring.recent()] == [2.0, 1.0]
