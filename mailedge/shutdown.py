"""Shutdown's view of the sessions: which ones wait for the client's next command.

A handler marks each wait for the client's next command with :func:`awaiting_command`. When
the server starts to shut down, those waits end at once with :class:`ShuttingDown` (a
``trio.TooSlowError``), so idle sessions get the protocol's goodbye without delay, while a
session mid-transaction gets the drain time. :func:`draining` says whether shutdown began.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import attrs
import trio

__all__ = ["DRAIN", "Drain", "ShuttingDown", "awaiting_command", "draining"]


class ShuttingDown(trio.TooSlowError):
    """Raised from a wait for the client's next command once the server is shutting down.

    A ``TooSlowError``, so a handler that already says goodbye on its idle timeout says
    goodbye here too; one that knows this class can say why (SMTP ``421 4.3.2``).
    """


@attrs.define(repr=False, eq=False)
class Drain:
    """Shutdown's view of the sessions: whether it began, and who waits for a command."""

    stopping: bool = False
    # The cancel scope of each wait in awaiting_command(), cancelled when shutdown begins.
    idle: set[trio.CancelScope] = attrs.field(factory=set)


# The running server's drain state, inherited by every session task it starts.
DRAIN: contextvars.ContextVar[Drain] = contextvars.ContextVar("mailedge_drain")


def draining() -> bool:
    """True once the server running this session is shutting down (e.g. to send HTTP's
    ``Connection: close``); False outside a server."""
    drain = DRAIN.get(None)
    return drain is not None and drain.stopping


@contextlib.contextmanager
def awaiting_command() -> Iterator[None]:
    """Mark a wait for the client's next command: the session is idle, not mid-transaction.

    At shutdown such a wait ends at once with :class:`ShuttingDown`, as does entering one
    after shutdown began, so the handler can send its goodbye; every other wait gets the
    drain time. Outside a server it does nothing.
    """
    drain = DRAIN.get(None)
    if drain is None:
        yield
        return
    if drain.stopping:
        raise ShuttingDown("the server is shutting down")
    with trio.CancelScope() as scope:
        drain.idle.add(scope)
        try:
            yield
        finally:
            drain.idle.discard(scope)
    if scope.cancelled_caught:
        raise ShuttingDown("the server is shutting down")
