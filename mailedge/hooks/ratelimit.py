"""Rate limits per recovered client: connections per period, and messages per period.

The limits count the client the gate recovered (``context.client_ip``), never the proxy's
address: behind a proxy every connection comes from the proxy, and counting it would let one
noisy client use up everybody's allowance. IPv4 clients are counted by address, IPv6 clients
by prefix (``rateLimitIpv6Prefix``, /64 by default), because one host normally owns a whole
/64 and could otherwise rotate through 2**64 addresses.

Not counted:

- connections without a known client (``context.client_known`` is false): a proxy's LOCAL
  health check, or a header without addresses (v1 UNKNOWN, v2 UNSPEC). The context's address
  is then the proxy's own, and counting it would rate-limit the proxy;
- direct connections from a trusted proxy's own address (optional header mode: its health
  checks and local scripts), for the same reason.

The algorithm is GCRA (the generic cell rate algorithm): one number per key, the theoretical
arrival time (TAT) of the next event. ``docs/hooks.md`` compares it with a token bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs

from mailedge.clients import DEFAULT_IPV6_PREFIX, Nat64Prefixes, describe_client
from mailedge.clients import client_label as address_key
from mailedge.context import ConnectionContext
from mailedge.hooks.store import GCRAResult, MemoryStore, RateStore
from mailedge.hooks.support import SettingsSource, TrustedProxies
from mailedge.policy import BaseHooks, Verdict
from mailedge.proxy import IPAddress
from mailedge.settings import NetworkListener, RateLimit, Settings, UnknownListenerError

__all__ = [
    "CONNECTIONS_REASON",
    "MESSAGES_REASON",
    "MESSAGES_STATUS",
    "RateLimit",
    "RateLimitHooks",
    "RateLimiter",
    "TrustedProxies",
    "address_key",
]

logger = logging.getLogger("mailedge.hooks.ratelimit")

# The replies' text. SMTP turns the connection refusal into "421 4.7.0 ..." at connect.
CONNECTIONS_REASON = "Too many connections from your network, try later"
MESSAGES_REASON = "Too many messages from your network, try later"
# RFC 3463 "delivery not authorized": 451 4.7.1 is what MTAs retry on for policy limits.
MESSAGES_STATUS = "4.7.1"


@attrs.define(repr=False)
class RateLimiter:
    """GCRA limits on a :class:`~mailedge.hooks.store.RateStore`, keyed by client network."""

    store: RateStore = attrs.field(factory=MemoryStore)

    def __repr__(self) -> str:
        return f"<RateLimiter store={self.store!r}>"

    async def acquire(
        self,
        scope: str,
        ip: IPAddress,
        limit: RateLimit,
        *,
        ipv6_prefix: int = DEFAULT_IPV6_PREFIX,
        nat64_prefixes: Nat64Prefixes = (),
    ) -> GCRAResult:
        """Count one event for ``ip`` (aggregated by ``ipv6_prefix``) under ``scope``.

        ``scope`` separates independent limits ("conn:smtp", "msg:smtp"); the same client
        has one budget per scope. An address under a NAT64 prefix (the built-in ones, or
        ``nat64_prefixes``) counts as the IPv4 client it carries.
        """
        key = f"rl:{scope}:{address_key(ip, ipv6_prefix, nat64_prefixes)}"
        return await self.store.gcra(key, limit.emission_interval, limit.burst_tolerance)


@attrs.define(repr=False)
class RateLimitHooks(BaseHooks):
    """Per-listener limits from the settings: connections on connect, messages on MAIL FROM.

    ``settings`` returns the current settings (``lambda: gate.settings``), so a reload's new
    limits apply to the next connection. A listener without ``rateLimitConnections`` or
    ``rateLimitMessages`` is not limited.
    """

    settings: SettingsSource
    limiter: RateLimiter = attrs.field(factory=RateLimiter)
    _trusted: TrustedProxies = attrs.field(factory=TrustedProxies, init=False)

    def __repr__(self) -> str:
        return f"<RateLimitHooks {self.limiter!r}>"

    def _counted(self, context: ConnectionContext, settings: Settings) -> bool:
        if not context.client_known:
            return False
        # A trusted proxy connecting for itself (optional mode) is not a client.
        return context.proxied or context.client_ip not in self._trusted(settings)

    def _listener(self, context: ConnectionContext) -> tuple[Settings, NetworkListener | None]:
        settings = self.settings()
        try:
            return settings, settings.listener(context.listener)
        except UnknownListenerError:
            return settings, None

    async def _check(
        self,
        context: ConnectionContext,
        kind: str,
        pick: Callable[[NetworkListener], RateLimit | None],
    ) -> GCRAResult | None:
        settings, conf = self._listener(context)
        if conf is None:
            return None
        limit = pick(conf)
        if limit is None or not self._counted(context, settings):
            return None
        result = await self.limiter.acquire(
            f"{kind}:{conf.name}",
            context.client_ip,
            limit,
            ipv6_prefix=conf.rate_limit_ipv6_prefix,
            nat64_prefixes=settings.system.nat64_prefixes,
        )
        if not result.allowed:
            logger.info(
                "%r: over %s limit %s for %s; retry in %.1f s",
                context,
                kind,
                limit,
                describe_client(
                    context.client_ip,
                    conf.rate_limit_ipv6_prefix,
                    settings.system.nat64_prefixes,
                ),
                result.retry_after,
            )
        return result

    async def on_connect(self, context: ConnectionContext) -> Verdict:
        result = await self._check(context, "conn", lambda conf: conf.rate_limit_connections)
        if result is not None and not result.allowed:
            return Verdict.tempfail(CONNECTIONS_REASON)
        return Verdict.accept()

    async def on_mail_from(self, context: ConnectionContext, helo: str, mail_from: str) -> Verdict:
        # Counted at MAIL FROM rather than at the end of DATA, so a limited client learns it
        # before it sends the message. A transaction refused later still counts.
        result = await self._check(context, "msg", lambda conf: conf.rate_limit_messages)
        if result is not None and not result.allowed:
            return Verdict.tempfail(MESSAGES_REASON, status=MESSAGES_STATUS)
        return Verdict.accept()
