"""A per-connection log prefix, so every line a handler logs names its connection.

``ConnectionLogger(logger, context)`` is a :class:`logging.LoggerAdapter` that writes
``#<connection id> <listener> client=<ip:port>`` before each message: the words the context's
repr starts with, naming the client the gate established, never a proxy. The connection id
finds the rest (the proxy, TLS) in the server's own lines, which log the whole context::

    log = ConnectionLogger(logging.getLogger("myserver.smtp"), context)
    log.info("delivered %s", 1)
    # "#25 smtp client=198.51.100.7:40123: delivered 1"
"""

from __future__ import annotations

import logging
from typing import Any

from mailedge.context import ConnectionContext

__all__ = ["ConnectionLogger", "connection_prefix"]


def connection_prefix(context: ConnectionContext) -> str:
    """``#id listener client=ip:port``, as the connection's log lines begin."""
    return f"#{context.connection_id} {context.listener} client={context.client_endpoint}"


class ConnectionLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger whose messages start with :func:`connection_prefix` of ``context``.

    Assign a new ``context`` after STARTTLS if you like; the prefix names the same connection.
    """

    def __init__(self, logger: logging.Logger, context: ConnectionContext) -> None:
        super().__init__(logger)
        self.context = context

    def __repr__(self) -> str:
        return f"<ConnectionLogger {self.logger.name} {connection_prefix(self.context)}>"

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        prefix = connection_prefix(self.context)
        if args:
            # A scoped IPv6 address carries a "%", which must not pose as a format directive.
            prefix = prefix.replace("%", "%%")
        # Name the caller, not this method, as the record's origin.
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
        self.logger.log(level, f"{prefix}: {msg}", *args, **kwargs)
