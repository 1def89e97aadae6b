"""The ``mailedge`` command line: tools for debugging a proxy in front of a mail server.

``mailedge decode`` reads one captured PROXY protocol header, in hex or raw, and prints
what mailedge's parser makes of it as JSON. See docs/decode.md.

``mailedge probe`` connects to a listener as a proxy would, sends a PROXY header, and shows
which client the server then sees. See docs/probe.md.

``mailedge check`` validates a config file and shows, per listener, what is in effect. See
docs/configuration.md.

One module per concern, each importing only those above it in this list:

- :mod:`mailedge.cli.render`: a parsed header as JSON values or one line of text;
- :mod:`mailedge.cli.hexinput`: captured hex (streams and dumps) back into bytes;
- :mod:`mailedge.cli.decode`: the ``decode`` subcommand;
- :mod:`mailedge.cli.probe`: the probe's options and client, :func:`~mailedge.cli.probe.probe`;
- :mod:`mailedge.cli.probe_report`: what a probe result means, as text or JSON;
- :mod:`mailedge.cli.probe_command`: the ``probe`` subcommand;
- :mod:`mailedge.cli.check`: the ``check`` subcommand;
- ``mailedge.cli._main``: the subcommands' parser and :func:`main`, the console script
  (``python -m mailedge.cli`` runs it too).
"""

from __future__ import annotations

from mailedge.cli._main import main

__all__ = ["main"]
