"""Policy hooks fed by the connection context: rate limits, bans, SPF and DMARC."""

from __future__ import annotations

from mailedge.policy import Action, BaseHooks, Envelope, HookChain, Hooks, Verdict

__all__ = ["Action", "BaseHooks", "Envelope", "HookChain", "Hooks", "Verdict"]
