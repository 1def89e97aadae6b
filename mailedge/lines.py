"""Reading a line protocol (SMTP, IMAP, anything CRLF-framed) from a stream, with a bound.

One policy for every handler:

* Only CRLF ends a line. A bare LF or a bare CR stays inside the line it arrived in, where
  the protocol can refuse it; no client can end a command, or SMTP's data, with a lone LF
  ("SMTP smuggling"). RFC 5321 2.3.8 and RFC 9051 2.2 both frame lines with CRLF.
* ``limit`` counts the CRLF, as the RFCs' limits do. As soon as a line is known to be
  longer, :class:`LineTooLongError` is raised: a client that never sends a CRLF cannot keep
  the reader waiting for one. The rest of that line is skipped by the next ``read_line``,
  so a protocol that answers and carries on stays in step with the client.
* The reader never holds more than ``limit`` bytes of a line plus one receive.
* End of stream, even in mid-line, raises :class:`ClientClosed`; a partial line is dropped.

Before a STARTTLS handshake, :meth:`LineReader.discard_buffered` drops whatever the client
sent after the command; :func:`mailedge.tls.negotiate_starttls` does it for you.
"""

from __future__ import annotations

import trio

__all__ = ["DEFAULT_RECEIVE_SIZE", "ClientClosed", "LineReader", "LineTooLongError"]

# One receive: several pipelined commands, small enough that a reader's bound stays near
# its limit.
DEFAULT_RECEIVE_SIZE = 4096


class LineTooLongError(Exception):
    """A line exceeded the reader's limit; its rest is skipped by the next read."""


class ClientClosed(Exception):
    """The client closed its side of the connection (EOF), possibly in mid-line."""


class LineReader:
    """Reads CRLF-terminated lines from a stream, by the module's policy."""

    def __init__(
        self, stream: trio.abc.ReceiveStream, *, receive_size: int = DEFAULT_RECEIVE_SIZE
    ) -> None:
        if receive_size < 1:
            raise ValueError("receive_size must be positive")
        self._stream = stream
        self._receive_size = receive_size
        self._buffer = bytearray()
        # How much of the buffer's head is known to hold no CRLF (its last byte may be the CR).
        self._searched = 0
        # True after a LineTooLongError raised before that line's CRLF arrived.
        self._skipping = False

    def __repr__(self) -> str:
        skipping = " skipping" if self._skipping else ""
        return f"<LineReader buffered={len(self._buffer)}{skipping}>"

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as lines."""
        return len(self._buffer)

    def discard_buffered(self) -> int:
        """Drop everything received but not yet read; return how many bytes that was."""
        dropped = len(self._buffer)
        self._buffer.clear()
        self._searched = 0
        self._skipping = False
        return dropped

    async def read_line(self, limit: int) -> bytes:
        """The next line, without its CRLF.

        Raises :class:`LineTooLongError` when the line, CRLF included, is longer than
        ``limit``, and :class:`ClientClosed` at end of stream.
        """
        if limit < 2:
            raise ValueError("limit must leave room for the CRLF")
        while True:
            end = self._buffer.find(b"\r\n", max(0, self._searched - 1))
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                self._searched = 0
                if self._skipping:
                    # The end of a line already reported as too long: read on.
                    self._skipping = False
                    continue
                if end + 2 > limit:
                    raise LineTooLongError(f"line longer than {limit} octets")
                return line
            if self._skipping or len(self._buffer) >= limit:
                # No line this long can be valid: drop it all but a final CR, which may be
                # the first half of the CRLF that ends it.
                keep_cr = self._buffer.endswith(b"\r")
                self._buffer.clear()
                if keep_cr:
                    self._buffer += b"\r"
                self._searched = len(self._buffer)
                if not self._skipping:
                    self._skipping = True
                    raise LineTooLongError(f"line longer than {limit} octets")
            self._searched = len(self._buffer)
            data = await self._stream.receive_some(self._receive_size)
            if not data:
                raise ClientClosed
            self._buffer += data
