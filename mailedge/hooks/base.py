"""Moved: the hook interface lives in :mod:`mailedge.policy`, below the server that calls it.

This module keeps the old import path working for one release.
"""

from __future__ import annotations

from mailedge.policy import Action, BaseHooks, Envelope, HookChain, Hooks, Verdict

__all__ = ["Action", "BaseHooks", "Envelope", "HookChain", "Hooks", "Verdict"]
