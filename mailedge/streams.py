"""A stream that hands on the bytes the gate read past the PROXY header.

``receive_some`` may return the header and the application's first bytes together (an SMTP
command, a TLS ClientHello). The gate keeps those bytes and this wrapper serves them first,
untouched, so the next layer sees exactly what the client sent.
"""

from __future__ import annotations

import trio

__all__ = ["IdleTimeoutStream", "PrefixedStream"]


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


class IdleTimeoutStream(trio.abc.Stream):
    """Ends a session whose peer neither sends nor reads for ``timeout`` seconds.

    Each ``receive_some`` and ``send_all`` must finish within ``timeout``; otherwise it raises
    ``trio.TooSlowError`` and the session ends. A handler that wants to say goodbye (SMTP's
    ``421``) can catch it; the connection is closed either way.
    """

    def __init__(self, transport_stream: trio.abc.Stream, timeout: float) -> None:
        self.transport_stream = transport_stream
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<IdleTimeoutStream {self.timeout:g}s over {self.transport_stream!r}>"

    # Each operation gets a bare CancelScope rather than trio.fail_after: the same timeout,
    # without the context-manager layers that fail_after adds on every send and receive.

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        with trio.CancelScope(deadline=trio.current_time() + self.timeout):
            return await self.transport_stream.receive_some(max_bytes)
        raise trio.TooSlowError

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with trio.CancelScope(deadline=trio.current_time() + self.timeout):
            await self.transport_stream.send_all(data)
            return
        raise trio.TooSlowError

    async def wait_send_all_might_not_block(self) -> None:
        with trio.CancelScope(deadline=trio.current_time() + self.timeout):
            await self.transport_stream.wait_send_all_might_not_block()
            return
        raise trio.TooSlowError

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
