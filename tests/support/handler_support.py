"""Run a protocol handler over one in-memory connection, as the server layer would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
import trio.testing

from mailedge.context import ConnectionContext
from mailedge.server import Handler
from mailedge.streams import IdleTimeoutStream

# Long enough for any exchange a handler test makes; a hung one fails here, not in CI's limit.
SESSION_DEADLINE = 60


@asynccontextmanager
async def handler_session(
    handler: Handler, context: ConnectionContext, *, idle_timeout: float | None = None
) -> AsyncIterator[trio.abc.Stream]:
    """Yield the client's end while ``handler`` serves the other, then close both.

    The server's end is closed when the handler returns, as the server does. Any exception
    from the handler fails the test, and a hung exchange fails at the deadline. With
    ``idle_timeout``, the handler gets its stream wrapped as the server wraps it.
    """
    client_stream, server_stream = trio.testing.memory_stream_pair()
    stream: trio.abc.Stream = server_stream
    if idle_timeout is not None:
        stream = IdleTimeoutStream(server_stream, idle_timeout)

    async def serve() -> None:
        try:
            await handler(stream, context)
        finally:
            await server_stream.aclose()

    with trio.fail_after(SESSION_DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            yield client_stream
            await trio.aclose_forcefully(client_stream)


async def outcome_when_cancelled(
    handler: Handler,
    context: ConnectionContext,
    exchange: Callable[[trio.abc.Stream], Awaitable[None]],
) -> str:
    """Cancel ``handler`` once ``exchange`` has talked to it; say how the handler ended.

    ``"cancelled"`` when ``trio.Cancelled`` went through it, ``"returned"`` when it swallowed
    the cancellation and returned.
    """
    client_stream, server_stream = trio.testing.memory_stream_pair()
    outcome = "running"

    async def serve() -> None:
        nonlocal outcome
        try:
            await handler(server_stream, context)
        except trio.Cancelled:
            outcome = "cancelled"
            raise
        outcome = "returned"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await exchange(client_stream)
        nursery.cancel_scope.cancel()
    return outcome
