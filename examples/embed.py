"""Embedding mailedge in your own trio server: the smallest complete example.

One SMTP-ish listener on 127.0.0.1:2526 that trusts a proxy on loopback, and a handler that
tells the client who the server thinks it is. Run it, then try it with a header::

    python examples/embed.py &
    mailedge probe smtp 127.0.0.1:2526 --client 198.51.100.7:40000
"""

from __future__ import annotations

import logging

import trio

import mailedge


async def hello(stream: trio.abc.Stream, context: mailedge.ConnectionContext) -> None:
    """A handler gets the stream after the gate, and the context the gate built."""
    await stream.send_all(
        f"220 you are {context.client_ip} ({context.address_source})\r\n".encode()
    )
    while line := await stream.receive_some():
        if line.strip().upper() == b"QUIT":
            await stream.send_all(b"221 bye\r\n")
            return
        await stream.send_all(b"250 ok\r\n")


SETTINGS = mailedge.Settings(
    system=mailedge.SystemSettings(proxy_trusted_networks=["127.0.0.0/8", "::1"]),
    listeners=[mailedge.NetworkListener(name="smtp", protocol="smtp", bind="127.0.0.1:2526")],
)


async def main() -> None:
    logging.basicConfig(level=logging.INFO)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(mailedge.serve, SETTINGS, {"smtp": hello})
        print("listening on", server.addresses["smtp"], flush=True)
        # SIGTERM drains the sessions, SIGHUP would reload a config file (none here).
        await mailedge.handle_signals(server, config_path=None)


if __name__ == "__main__":
    trio.run(main)
