"""mailedge.spread: the shared table, and workers taking turns on one real listening socket.

Two "workers" here are two Turns in one trio run, on one socket bound to 127.0.0.1 (the
processes, and the spread they reach, are tests/test_workers.py's and the benchmark's).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from mailedge.spread import SPREAD_LEAD, SPREAD_STEP, SPREAD_STEPS, SpreadTable, Turn, turn_of


@pytest.fixture
def table() -> Iterator[SpreadTable]:
    table = SpreadTable.create(2, 1)
    table.serving(0, True)
    table.serving(1, True)
    try:
        yield table
    finally:
        table.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    with sock:
        yield sock


def took(table: SpreadTable, counts: list[int]) -> None:
    for worker, count in enumerate(counts):
        for _ in range(count):
            table.take(0, worker)


def test_a_worker_is_ahead_only_beyond_the_lead_of_a_serving_peer(table: SpreadTable) -> None:
    took(table, [SPREAD_LEAD, 0])
    assert not table.ahead(0, 0)
    table.take(0, 0)
    assert table.ahead(0, 0)
    assert not table.ahead(0, 1)
    # A peer that does not serve (not ready yet, or exited) is nobody to wait for.
    table.serving(1, False)
    assert not table.ahead(0, 0)


def test_a_worker_attached_elsewhere_sees_the_same_counts(table: SpreadTable) -> None:
    other = SpreadTable.attach(os.dup(table.fd), 2, 1)
    try:
        other.take(0, 1)
        assert table.taken(0, 1) == 1
        table.serving(1, False)
        other.take(0, 0)
        assert not other.ahead(0, 1)
    finally:
        other.close()


def test_a_replacement_starts_level_with_the_serving_peer_with_the_fewest() -> None:
    table = SpreadTable.create(3, 2)
    try:
        for worker in (1, 2):
            table.serving(worker, True)
        took(table, [3, 50, 70])  # row 0; row 1 is all zeros
        table.level(0)
        assert [table.taken(0, 0), table.taken(1, 0)] == [50, 0]
        # Alone (every peer gone), a replacement keeps what its slot had.
        table.serving(1, False)
        table.serving(2, False)
        table.take(0, 0)
        table.level(0)
        assert table.taken(0, 0) == 51
    finally:
        table.close()


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def test_the_worker_behind_takes_the_connection(
    table: SpreadTable, listener: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    took(table, [SPREAD_LEAD + 1, 0])
    winners: list[int] = []
    taken = trio.Event()
    port = listener.getsockname()[1]
    async with trio.open_nursery() as nursery:

        async def worker(index: int) -> None:
            # Its own descriptor for the one socket, as an inherited one is.
            with socket.socket(fileno=os.dup(listener.fileno())) as own:
                sock, _ = await Turn(table, 0, index).accept(own)
            sock.close()
            winners.append(index)
            taken.set()

        nursery.start_soon(worker, 0)
        nursery.start_soon(worker, 1)
        await trio.testing.wait_all_tasks_blocked()
        client = await connect(port)
        await taken.wait()
        nursery.cancel_scope.cancel()
    await client.aclose()
    assert winners == [1]
    assert [table.taken(0, 0), table.taken(0, 1)] == [SPREAD_LEAD + 1, 1]


async def test_a_worker_ahead_waits_a_few_steps_then_takes_it_itself(
    table: SpreadTable, listener: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    # The peer serves but never accepts (busy, or stuck): the connection is not left waiting.
    took(table, [SPREAD_LEAD + 1, 0])
    client = await connect(listener.getsockname()[1])
    start = trio.current_time()
    sock, _ = await Turn(table, 0, 0).accept(listener)
    sock.close()
    await client.aclose()
    assert trio.current_time() - start == pytest.approx(SPREAD_STEPS * SPREAD_STEP)
    assert table.taken(0, 0) == SPREAD_LEAD + 2


async def test_a_stuck_peer_costs_one_wait_not_one_per_connection(
    table: SpreadTable, listener: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    took(table, [SPREAD_LEAD + 1, 0])
    turn = Turn(table, 0, 0)
    port = listener.getsockname()[1]
    waits = []
    for _ in range(5):
        client = await connect(port)
        start = trio.current_time()
        sock, _ = await turn.accept(listener)
        waits.append(trio.current_time() - start)
        sock.close()
        await client.aclose()
    # The peer took nothing during the first wait: the next connections are taken at once.
    assert waits == [pytest.approx(SPREAD_STEPS * SPREAD_STEP), 0, 0, 0, 0]
    # Once the peer takes one again, it gets its turns back.
    table.take(0, 1)
    client = await connect(port)
    start = trio.current_time()
    sock, _ = await turn.accept(listener)
    sock.close()
    await client.aclose()
    assert trio.current_time() - start == pytest.approx(SPREAD_STEPS * SPREAD_STEP)


async def test_a_worker_not_ahead_takes_it_at_once(
    table: SpreadTable, listener: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    took(table, [SPREAD_LEAD, 0])
    client = await connect(listener.getsockname()[1])
    start = trio.current_time()
    sock, _ = await Turn(table, 0, 0).accept(listener)
    sock.close()
    await client.aclose()
    assert trio.current_time() == start


def test_a_socket_without_a_turn_is_accepted_from_as_usual(listener: socket.socket) -> None:
    assert turn_of(listener) is None
