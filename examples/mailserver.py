"""Run the mailedge example mail server: ``make serve`` or ``python examples/mailserver.py``.

Options: ``--config FILE`` (TOML or JSON; default: the embedded loopback-only one) and
``--log-level``. The server itself is :mod:`mailedge_examples.mailserver`.
"""

from __future__ import annotations

import sys

import trio
from mailedge_examples.mailserver import main

if __name__ == "__main__":
    sys.exit(trio.run(main))
