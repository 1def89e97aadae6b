"""PrefixedStream: the bytes read past the header come first, untouched."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mailedge.streams import PrefixedStream


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
