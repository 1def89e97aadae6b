"""The hook interface: what BaseHooks answers, and how HookChain runs a chain."""

from __future__ import annotations

import attrs
import trio
import trio.testing
from hook_support import context

from mailedge.context import ConnectionContext
from mailedge.networks import IPAddress, IPNetwork
from mailedge.policy import BaseHooks, HookChain, Sessions, Verdict


@attrs.define
class Login(BaseHooks):
    """Answers every login attempt with ``verdict``; records who asked."""

    verdict: Verdict
    asked: list[str] = attrs.field(factory=list)
    started: list[Sessions] = attrs.field(factory=list)

    def on_start(self, sessions: Sessions) -> None:
        self.started.append(sessions)

    async def on_auth_attempt(self, context: ConnectionContext, username: str) -> Verdict:
        self.asked.append(username)
        return self.verdict


class NoSessions:
    def end(self, client: IPAddress | IPNetwork, reason: str) -> int:
        return 0


async def test_base_hooks_accept_every_login(autojump_clock: trio.testing.MockClock) -> None:
    assert (await BaseHooks().on_auth_attempt(context(), "alice")).accepted
    BaseHooks().on_start(NoSessions())  # nothing to do, and nothing raised


async def test_the_first_login_refusal_wins_and_stops_the_chain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first = Login(Verdict.accept())
    refusing = Login(Verdict.tempfail("banned until 2030-01-01T00:00:00Z"))
    never = Login(Verdict.reject("not asked"))
    verdict = await HookChain([first, refusing, never]).on_auth_attempt(context(), "alice")
    assert verdict == Verdict.tempfail("banned until 2030-01-01T00:00:00Z")
    assert (first.asked, refusing.asked, never.asked) == (["alice"], ["alice"], [])
    assert (await HookChain([first]).on_auth_attempt(context(), "bob")).accepted


def test_every_hook_in_a_chain_is_started_with_the_servers_sessions() -> None:
    hooks = [Login(Verdict.accept()), Login(Verdict.accept())]
    sessions = NoSessions()
    HookChain([hooks[0], HookChain([hooks[1], BaseHooks()])]).on_start(sessions)
    assert [hook.started for hook in hooks] == [[sessions], [sessions]]
