"""The bounded CRLF line reader every handler shares."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mailedge.lines import ClientClosed, LineReader, LineTooLongError


class Chunks(trio.abc.ReceiveStream):
    """Hands out ``data`` ``size`` bytes at a time, then EOF; records the reader's high mark."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data = data
        self.size = size
        self.reader: LineReader | None = None
        self.largest = 0
        self.receives = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.reader is not None:
            self.largest = max(self.largest, self.reader.buffered)
        self.receives += 1
        piece, self.data = self.data[: self.size], self.data[self.size :]
        return piece

    async def aclose(self) -> None:
        pass


def reader_of(data: bytes, size: int = 7) -> tuple[LineReader, Chunks]:
    stream = Chunks(data, size)
    reader = LineReader(stream, receive_size=size)
    stream.reader = reader
    return reader, stream


@pytest.mark.parametrize("size", [1, 2, 3, 7, 4096])
async def test_lines_split_anywhere_come_out_whole(size: int) -> None:
    reader, _ = reader_of(b"EHLO a\r\n\r\nNOOP\r\n", size)
    assert [await reader.read_line(512) for _ in range(3)] == [b"EHLO a", b"", b"NOOP"]
    with pytest.raises(ClientClosed):
        await reader.read_line(512)


@pytest.mark.parametrize("size", [1, 3, 4096])
async def test_only_crlf_ends_a_line(size: int) -> None:
    reader, _ = reader_of(b"a\nb\rc\r\r\n.\n\r\n", size)
    assert await reader.read_line(512) == b"a\nb\rc\r"
    assert await reader.read_line(512) == b".\n"


async def test_a_partial_line_at_eof_is_dropped() -> None:
    reader, _ = reader_of(b"QUIT")
    with pytest.raises(ClientClosed):
        await reader.read_line(512)


async def test_the_limit_counts_the_crlf() -> None:
    reader, _ = reader_of(b"12345678\r\n123456789\r\nok\r\n")
    assert await reader.read_line(10) == b"12345678"
    with pytest.raises(LineTooLongError):
        await reader.read_line(10)
    assert await reader.read_line(10) == b"ok"


async def test_a_line_ending_in_cr_at_the_limit_is_too_long() -> None:
    # Nine bytes and a CR fill the limit of 10; with its LF the line would be 11.
    reader, _ = reader_of(b"123456789\r\nok\r\n", size=10)
    with pytest.raises(LineTooLongError):
        await reader.read_line(10)
    assert await reader.read_line(10) == b"ok"


async def test_an_endless_line_is_refused_without_waiting_for_its_end() -> None:
    # No CRLF ever comes: the error must not wait for one.
    reader, stream = reader_of(b"x" * 100_000, size=7)
    with pytest.raises(LineTooLongError):
        await reader.read_line(100)
    assert stream.receives <= 100 // 7 + 1


async def test_the_reader_never_holds_more_than_a_line_and_a_receive() -> None:
    limit, chunk = 100, 7
    reader, stream = reader_of(b"a" * 10_000 + b"\r\nok\r\n", size=chunk)
    with pytest.raises(LineTooLongError):
        await reader.read_line(limit)
    assert await reader.read_line(limit) == b"ok"
    assert 0 < stream.largest < limit + chunk


async def test_the_skipped_rest_may_end_with_a_crlf_split_across_receives() -> None:
    reader, _ = reader_of(b"x" * 20 + b"\r" + b"\nnext\r\n", size=21)
    with pytest.raises(LineTooLongError):
        await reader.read_line(10)
    assert await reader.read_line(10) == b"next"


async def test_eof_while_skipping_is_the_client_closing() -> None:
    reader, _ = reader_of(b"x" * 50)
    with pytest.raises(LineTooLongError):
        await reader.read_line(10)
    with pytest.raises(ClientClosed):
        await reader.read_line(10)


async def test_discard_buffered_drops_what_was_pipelined() -> None:
    reader, _ = reader_of(b"STARTTLS\r\nRSET\r\nEHLO evil\r\n", size=4096)
    assert await reader.read_line(512) == b"STARTTLS"
    assert reader.buffered == len(b"RSET\r\nEHLO evil\r\n")
    assert reader.discard_buffered() == len(b"RSET\r\nEHLO evil\r\n")
    assert reader.buffered == 0
    with pytest.raises(ClientClosed):
        await reader.read_line(512)


async def test_discard_buffered_also_ends_a_skip() -> None:
    reader, stream = reader_of(b"x" * 30, size=30)
    with pytest.raises(LineTooLongError):
        await reader.read_line(10)
    reader.discard_buffered()
    stream.data = b"fresh\r\n"
    assert await reader.read_line(10) == b"fresh"


async def test_arguments_are_checked() -> None:
    reader, _ = reader_of(b"")
    with pytest.raises(ValueError, match="limit"):
        await reader.read_line(1)
    with pytest.raises(ValueError, match="receive_size"):
        LineReader(Chunks(b"", 1), receive_size=0)
    assert repr(reader) == "<LineReader buffered=0>"
