"""The hook interface: where a mail server's policy meets the connection context.

Hooks run at the points where mail servers decide, in this order for one SMTP session:

1. ``on_connect``: right after the gate (and the per-IP limit), before TLS or any greeting;
2. ``on_helo``: for HELO/EHLO (again after STARTTLS, since RFC 3207 resets the session);
3. ``on_mail_from``: for each MAIL FROM;
4. ``on_data``: at the end of DATA, with the whole message, before it is stored;
5. ``on_auth_attempt``: before every login's password is checked (IMAP LOGIN, SMTP AUTH): a
   refusal means the password is not even looked at (a banned client guesses nothing);
6. ``on_auth_failure``: whenever a login fails (IMAP LOGIN, SMTP AUTH), for bans.

One more is not about a connection: ``on_start(sessions)``, called once by each server that
runs the hooks, hands them the server's :class:`Sessions`, so that a policy can end open
sessions (a new ban ends every session of the banned client, on every listener).

Every hook is async, takes the :class:`~mailedge.context.ConnectionContext`, and returns a
:class:`Verdict`; the protocol handler turns it into the protocol's reply. A hook may
assume the context is final for the gate's part (``client_ip`` is the recovered client,
``client_known`` says whether there is one) and that earlier hooks accepted.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol as TypingProtocol

import attrs

from mailedge.context import ConnectionContext
from mailedge.networks import IPAddress, IPNetwork

__all__ = ["Action", "BaseHooks", "Envelope", "HookChain", "Hooks", "Sessions", "Verdict"]


class Action(enum.Enum):
    """What a hook wants done."""

    # Carry on. Headers and flags from the verdict still apply.
    ACCEPT = "accept"
    # Try again later: SMTP 4xx (421 at connect), IMAP NO/BYE, HTTP 503.
    TEMPFAIL = "tempfail"
    # Refuse for good: SMTP 5xx (554 at connect), IMAP NO/BYE, HTTP 403.
    REJECT = "reject"


@attrs.frozen
class Verdict:
    """A hook's answer. ``reason`` goes into the reply and the log, so keep it short."""

    action: Action = Action.ACCEPT
    reason: str = ""
    # Header lines (without CRLF) to prepend to the message, e.g. Received-SPF.
    headers: tuple[str, ...] = ()
    # Labels for policy downstream, e.g. "quarantine" for a DMARC p=quarantine failure.
    flags: frozenset[str] = frozenset()
    # An enhanced status code (RFC 3463) for SMTP replies, e.g. "5.7.23" for SPF fail.
    status: str | None = None

    @classmethod
    def accept(cls, *, headers: Sequence[str] = (), flags: frozenset[str] = frozenset()) -> Verdict:
        return cls(Action.ACCEPT, "", tuple(headers), flags)

    @classmethod
    def tempfail(cls, reason: str, *, status: str | None = None) -> Verdict:
        return cls(Action.TEMPFAIL, reason, status=status)

    @classmethod
    def reject(cls, reason: str, *, status: str | None = None) -> Verdict:
        return cls(Action.REJECT, reason, status=status)

    @property
    def accepted(self) -> bool:
        return self.action is Action.ACCEPT


@attrs.frozen
class Envelope:
    """One SMTP transaction as the hooks see it."""

    helo: str
    mail_from: str
    rcpt_to: tuple[str, ...]


class Sessions(TypingProtocol):
    """What a server lets its hooks do to the sessions it has open; it implements this.

    A server passes its own to every hook through ``on_start``. A policy that learns a client
    must go (a ban, made here or, through a shared store, by another process) calls ``end``.
    """

    def end(self, client: IPAddress | IPNetwork, reason: str) -> int:
        """End every open session of ``client`` (an address, or a network such as a ban's
        IPv6 /64), on every listener, with the protocol's goodbye (SMTP ``421``, IMAP
        ``* BYE``) carrying ``reason``. Returns how many sessions it ended. Does not wait."""
        ...


class Hooks(TypingProtocol):
    """What a policy implements; :class:`HookChain` runs several in order."""

    def on_start(self, sessions: Sessions) -> None: ...

    async def on_connect(self, context: ConnectionContext) -> Verdict: ...

    async def on_helo(self, context: ConnectionContext, helo: str) -> Verdict: ...

    async def on_mail_from(
        self, context: ConnectionContext, helo: str, mail_from: str
    ) -> Verdict: ...

    async def on_data(
        self, context: ConnectionContext, envelope: Envelope, message: bytes
    ) -> Verdict: ...

    async def on_auth_attempt(self, context: ConnectionContext, username: str) -> Verdict: ...

    async def on_auth_failure(self, context: ConnectionContext, username: str) -> None: ...


class BaseHooks:
    """Accepts everything; subclass it and override the points you care about."""

    def on_start(self, sessions: Sessions) -> None:
        return None

    async def on_connect(self, context: ConnectionContext) -> Verdict:
        return Verdict.accept()

    async def on_helo(self, context: ConnectionContext, helo: str) -> Verdict:
        return Verdict.accept()

    async def on_mail_from(self, context: ConnectionContext, helo: str, mail_from: str) -> Verdict:
        return Verdict.accept()

    async def on_data(
        self, context: ConnectionContext, envelope: Envelope, message: bytes
    ) -> Verdict:
        return Verdict.accept()

    async def on_auth_attempt(self, context: ConnectionContext, username: str) -> Verdict:
        return Verdict.accept()

    async def on_auth_failure(self, context: ConnectionContext, username: str) -> None:
        return None


@attrs.define(repr=False)
class HookChain(BaseHooks):
    """Runs hooks in order. The first verdict that is not ACCEPT wins and stops the chain;
    headers and flags of the accepting verdicts before it are merged, in order."""

    hooks: Sequence[Hooks] = ()

    def __repr__(self) -> str:
        return f"<HookChain {[type(hook).__name__ for hook in self.hooks]}>"

    async def _first_refusal(self, call: Callable[[Hooks], Awaitable[Verdict]]) -> Verdict:
        accepted: list[Verdict] = []
        for hook in self.hooks:
            verdict = await call(hook)
            if not verdict.accepted:
                break
            accepted.append(verdict)
        else:
            verdict = Verdict.accept()
        return attrs.evolve(
            verdict,
            headers=tuple(h for v in accepted for h in v.headers) + verdict.headers,
            flags=frozenset().union(*(v.flags for v in accepted), verdict.flags),
        )

    def on_start(self, sessions: Sessions) -> None:
        for hook in self.hooks:
            hook.on_start(sessions)

    async def on_connect(self, context: ConnectionContext) -> Verdict:
        return await self._first_refusal(lambda hook: hook.on_connect(context))

    async def on_helo(self, context: ConnectionContext, helo: str) -> Verdict:
        return await self._first_refusal(lambda hook: hook.on_helo(context, helo))

    async def on_mail_from(self, context: ConnectionContext, helo: str, mail_from: str) -> Verdict:
        return await self._first_refusal(lambda hook: hook.on_mail_from(context, helo, mail_from))

    async def on_data(
        self, context: ConnectionContext, envelope: Envelope, message: bytes
    ) -> Verdict:
        return await self._first_refusal(lambda hook: hook.on_data(context, envelope, message))

    async def on_auth_attempt(self, context: ConnectionContext, username: str) -> Verdict:
        return await self._first_refusal(lambda hook: hook.on_auth_attempt(context, username))

    async def on_auth_failure(self, context: ConnectionContext, username: str) -> None:
        for hook in self.hooks:
            await hook.on_auth_failure(context, username)
