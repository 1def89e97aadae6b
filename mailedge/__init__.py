"""mailedge: the network edge for trio mail servers.

A strict, sans-IO PROXY protocol codec (:mod:`mailedge.proxy`), and the trusted-network
gate and listeners built on it.
"""

from __future__ import annotations

__all__: list[str] = []
