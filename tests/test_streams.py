"""PrefixedStream hands on bytes untouched; IdleTimeoutStream bounds every wait."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mailedge.streams import IDLE_SLACK, IdleTimeoutStream, PrefixedStream


async def test_prefix_comes_first_then_the_transport() -> None:
    client, server = trio.testing.memory_stream_pair()
    stream = PrefixedStream(server, b"EHLO x\r\n")
    await client.send_all(b"MAIL FROM:<>\r\n")
    assert await stream.receive_some() == b"EHLO x\r\n"
    assert await stream.receive_some() == b"MAIL FROM:<>\r\n"


async def test_prefix_respects_max_bytes() -> None:
    _, server = trio.testing.memory_stream_pair()
    stream = PrefixedStream(server, b"abcdef")
    assert await stream.receive_some(4) == b"abcd"
    assert await stream.receive_some(4) == b"ef"


async def test_bad_max_bytes_is_refused_like_trio_does() -> None:
    _, server = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="max_bytes"):
        await PrefixedStream(server, b"x").receive_some(0)


async def test_sends_and_close_reach_the_transport() -> None:
    client, server = trio.testing.memory_stream_pair()
    stream = PrefixedStream(server, b"left over")
    await stream.send_all(b"220 hi\r\n")
    assert await client.receive_some() == b"220 hi\r\n"
    await stream.aclose()
    assert await client.receive_some() == b""
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")


async def test_receive_from_the_prefix_is_a_checkpoint() -> None:
    _, server = trio.testing.memory_stream_pair()
    stream = PrefixedStream(server, b"x")
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await stream.receive_some()
    assert await stream.receive_some() == b"x"


async def test_obeys_trios_stream_contract() -> None:
    async def pair() -> tuple[PrefixedStream, PrefixedStream]:
        left, right = trio.testing.memory_stream_pair()
        return PrefixedStream(left), PrefixedStream(right)

    async def clogged() -> tuple[PrefixedStream, PrefixedStream]:
        left, right = trio.testing.lockstep_stream_pair()
        return PrefixedStream(left), PrefixedStream(right)

    await trio.testing.check_two_way_stream(pair, clogged)


# -- IdleTimeoutStream ------------------------------------------------------------------------


async def test_an_idle_receive_raises_too_slow_at_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _client, server = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await IdleTimeoutStream(server, 30).receive_some()
    assert trio.current_time() - start == pytest.approx(30)


async def test_on_its_own_a_stalled_send_raises_too_slow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _client, server = trio.testing.lockstep_stream_pair()  # a send waits for a reader
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await IdleTimeoutStream(server, 30).send_all(b"250 OK\r\n")
    assert trio.current_time() - start == pytest.approx(30)


async def test_with_a_session_a_stalled_send_cancels_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _client, server = trio.testing.lockstep_stream_pair()
    start = trio.current_time()
    with trio.fail_after(3600), trio.CancelScope() as session:
        await IdleTimeoutStream(server, 30, session).send_all(b"250 OK\r\n")
    assert session.cancelled_caught
    assert 30 <= trio.current_time() - start <= 30 + IDLE_SLACK


async def test_with_a_session_an_idle_client_still_gets_its_goodbye(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    stream = IdleTimeoutStream(server, 30, trio.CancelScope())
    assert stream.session is not None
    with stream.session:
        await stream.send_all(b"220 ready\r\n")
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await stream.receive_some()  # the receive's own deadline comes first
        assert trio.current_time() - start == pytest.approx(30)
        await stream.send_all(b"421 idle\r\n")
    assert not stream.session.cancelled_caught
    assert await client.receive_some() == b"220 ready\r\n421 idle\r\n"


async def test_a_busy_session_outlives_its_timeout_many_times(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    with trio.CancelScope() as session:
        stream = IdleTimeoutStream(server, 30, session)
        for _ in range(10):  # a reply every 25 s for 250 s: never idle for 30
            await stream.send_all(b"250 OK\r\n")
            await trio.sleep(25)
            await client.send_all(b"NOOP\r\n")
            assert await stream.receive_some() == b"NOOP\r\n"
    assert not session.cancelled_caught
    assert session.deadline <= trio.current_time() + 30 + IDLE_SLACK


async def test_idle_timeout_stream_obeys_trios_stream_contract() -> None:
    async def pair() -> tuple[IdleTimeoutStream, IdleTimeoutStream]:
        left, right = trio.testing.memory_stream_pair()
        return IdleTimeoutStream(left, 30), IdleTimeoutStream(right, 30)

    async def clogged() -> tuple[IdleTimeoutStream, IdleTimeoutStream]:
        left, right = trio.testing.lockstep_stream_pair()
        return IdleTimeoutStream(left, 30), IdleTimeoutStream(right, 30)

    await trio.testing.check_two_way_stream(pair, clogged)
