"""Moved: the hook interface lives in :mod:`mailedge.policy`, below the server that calls it.

This module keeps the old import path working for one release.
"""

from __future__ import annotations

import warnings

from mailedge.policy import Action, BaseHooks, Envelope, HookChain, Hooks, Verdict

__all__ = ["Action", "BaseHooks", "Envelope", "HookChain", "Hooks", "Verdict"]

warnings.warn(
    "mailedge.hooks.base moved to mailedge.policy (mailedge.hooks exports the same names)",
    DeprecationWarning,
    stacklevel=2,
)
