"""A stream that hands on the bytes the gate read past the PROXY header.

``receive_some`` may return the header and the application's first bytes together (an SMTP
command, a TLS ClientHello). The gate keeps those bytes and this wrapper serves them first,
untouched, so the next layer sees exactly what the client sent.
"""

from __future__ import annotations

import trio

__all__ = ["IdleTimeoutStream", "PrefixedStream", "SessionEnded"]

# The most a session's deadline may run past the idle timeout (see IdleTimeoutStream): a
# second is nothing against a timeout of minutes, and spares a deadline update per send.
IDLE_SLACK = 1.0


class PrefixedStream(trio.abc.Stream):
    """Serves ``prefix`` before anything else received from ``transport_stream``."""

    def __init__(self, transport_stream: trio.abc.Stream, prefix: bytes = b"") -> None:
        self.transport_stream = transport_stream
        self._prefix = memoryview(prefix)

    def __repr__(self) -> str:
        return f"<PrefixedStream pending={len(self._prefix)} over {self.transport_stream!r}>"

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            if max_bytes is not None and max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
            # Keep this a checkpoint, as every trio receive is.
            await trio.lowlevel.checkpoint()
            cut = len(self._prefix) if max_bytes is None else max_bytes
            chunk, self._prefix = self._prefix[:cut], self._prefix[cut:]
            return bytes(chunk)
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._prefix = memoryview(b"")
        await self.transport_stream.aclose()


class SessionEnded(trio.TooSlowError):
    """A policy ended the session (a ban): raised by every read from then on.

    A ``trio.TooSlowError``, so that a handler that answers the idle timeout with a goodbye
    (SMTP ``421``, IMAP ``* BYE``) already says one; a handler that catches this first can
    give ``reason``. The server cancels the session a grace period after it was ended.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IdleTimeoutStream(trio.abc.Stream):
    """Ends a session whose peer neither sends nor reads for ``timeout`` seconds.

    A ``receive_some`` that waits longer raises ``trio.TooSlowError``: a handler that wants
    to say goodbye (SMTP's ``421``, IMAP's ``* BYE``) catches it and still can; the
    connection is closed either way.

    Sends (``send_all``, ``wait_send_all_might_not_block``) are bounded too. On their own,
    each gets the same deadline and ``TooSlowError``. Given ``session``, a cancel scope
    around the whole handler (the server passes one), they keep that scope's deadline at
    least ``timeout`` ahead instead, which costs next to nothing per send: a peer that stops
    reading then has the session cancelled, since a goodbye it does not read would wait just
    as long. Every receive keeps the session's deadline past its own, so an idle client
    always meets the receive's ``TooSlowError`` first.

    ``end(reason)`` ends the session from outside (a ban): the read in progress, and every
    later one, raises :class:`SessionEnded`, and sends no longer move the session's deadline.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        timeout: float,
        session: trio.CancelScope | None = None,
    ) -> None:
        self.transport_stream = transport_stream
        self.timeout = timeout
        self.session = session
        # The session's deadline is moved only when it is within half of this of being
        # too close: one deadline update per half-slack seconds of a busy session instead
        # of one per operation. A stalled send is cut within timeout + slack.
        self._slack = min(IDLE_SLACK, timeout / 8)
        # Why the session was ended from outside, once it has been.
        self.ended: str | None = None
        # The scope of the read in progress, if any; cancelling a finished one does nothing.
        self._reading: trio.CancelScope | None = None

    def end(self, reason: str) -> None:
        """Make the read in progress, and every later one, raise :class:`SessionEnded`."""
        self.ended = reason
        if self._reading is not None:
            self._reading.cancel()

    def __repr__(self) -> str:
        return f"<IdleTimeoutStream {self.timeout:g}s over {self.transport_stream!r}>"

    def _keep_session_ahead(self, session: trio.CancelScope) -> None:
        if self.ended is not None:
            return  # once ended, the session's deadline is its grace, and no send moves it
        # Keep the session's deadline between timeout + slack/2 and timeout + slack from
        # now: moved when it falls behind, and pulled in from anything later (the server
        # hands the session over with no deadline at all).
        deadline = trio.current_time() + self.timeout
        if not deadline + self._slack / 2 <= session.deadline <= deadline + self._slack:
            session.deadline = deadline + self._slack

    # Each bounded operation gets a bare CancelScope rather than trio.fail_after: the same
    # timeout, without the context-manager layers that fail_after adds every time.

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.ended is not None:
            await trio.lowlevel.checkpoint()
            raise SessionEnded(self.ended)
        if self.session is not None:
            self._keep_session_ahead(self.session)
        with trio.CancelScope(deadline=trio.current_time() + self.timeout) as self._reading:
            return await self.transport_stream.receive_some(max_bytes)
        if self.ended is not None:
            raise SessionEnded(self.ended)
        raise trio.TooSlowError

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.session is not None:
            self._keep_session_ahead(self.session)
            await self.transport_stream.send_all(data)
            return
        with trio.CancelScope(deadline=trio.current_time() + self.timeout):
            await self.transport_stream.send_all(data)
            return
        raise trio.TooSlowError

    async def wait_send_all_might_not_block(self) -> None:
        if self.session is not None:
            self._keep_session_ahead(self.session)
            await self.transport_stream.wait_send_all_might_not_block()
            return
        with trio.CancelScope(deadline=trio.current_time() + self.timeout):
            await self.transport_stream.wait_send_all_might_not_block()
            return
        raise trio.TooSlowError

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
