"""Auto-ban: a client that fails too often within a window is refused for a while.

Failures come from three places:

- failed logins, through the ``on_auth_failure`` hook (the IMAP handler calls it on a failed
  LOGIN; an SMTP AUTH implementation would do the same);
- protocol errors a handler decides are abuse, through :meth:`AutoBan.record_failure` (for
  example an SMTP session closed for too many bad commands);
- PROXY headers from untrusted peers, through :meth:`AutoBan.on_gate_event`, which is meant
  to be the gate's ``on_event`` callback: each ``proxy.untrusted_header`` event is a failure
  of the peer that sent it.

``failures`` failures within ``window`` seconds ban the client's address (IPv6: its prefix,
/64 by default) for ``duration`` seconds, all from the ``[AutoBan]`` settings, read afresh for
every decision so that a reload applies at once. A banned client is refused by ``on_connect``,
right after the gate, with a TEMPFAIL "banned until <time>" that the server turns into the
protocol's refusal (SMTP 421, IMAP ``* BYE``, HTTP 503).

A ban also stops the guessing on sessions opened before it:

- ``on_auth_attempt`` refuses a banned client the same way, before a handler checks any
  password (the handler answers SMTP ``454 4.7.0`` or IMAP ``NO``);
- a new ban ends every open session it covers, on every listener of every server that ran
  ``on_start`` with these hooks (:meth:`AutoBan.enforce`, through
  :class:`~mailedge.policy.Sessions`). A ban made by another process sharing the store
  reaches this one's sessions through :meth:`AutoBan.ban_learned`: the seam a shared
  store's notification (Redis pub/sub, say) calls.

Trusted proxies are never banned, nor counted: every address in the server-wide
``proxyTrustedNetworks`` *and* in every listener's ``overrideProxyTrustedNetworks``
(:meth:`~mailedge.settings.Settings.all_proxy_trusted_networks`) is exempt. Stalwart exempts
only the server-wide list (its issue #2158), so a proxy trusted by one listener gets banned
and everyone behind it is locked out. An IPv6 prefix that would cover a trusted proxy is
narrowed to the single offending address, so a ban never reaches a proxy either.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import json
import logging
import math
import time
from collections.abc import Callable

import attrs

from mailedge.clients import client_label, describe_client, embedded_ipv4
from mailedge.context import ConnectionContext
from mailedge.defaults import MAX_IPV6_PREFIX
from mailedge.events import EventName, GateEvent
from mailedge.hooks.store import Entry, MemoryStore, RateStore
from mailedge.hooks.support import SettingsSource, TrustedProxies
from mailedge.networks import IPAddress, IPNetwork, normalize_ip, parse_network
from mailedge.policy import BaseHooks, Sessions, Verdict
from mailedge.settings import Settings

__all__ = ["DEFAULT_MAX_PENDING", "AutoBan", "Ban"]

logger = logging.getLogger("mailedge.hooks.autoban")

# Gate events wait here until the next store call (the gate's callback cannot await). Between
# two connections more than this many untrusted headers is a flood already far past any
# threshold, so dropping the oldest loses nothing.
DEFAULT_MAX_PENDING = 1024

# A user name goes into the ban's reason and the logs; a client chooses it, so it is cut.
_MAX_USERNAME_SHOWN = 64

_BAN = "ab:ban:"
_FAIL = "ab:fail:"


@attrs.frozen
class Ban:
    """One active ban, as :meth:`AutoBan.bans` lists it."""

    # The banned address ("198.51.100.7") or IPv6 network ("2001:db8:1:2::/64").
    key: str
    # When it ends, by the wall clock, in UTC (rounded up to the second).
    until: datetime.datetime
    # Seconds until it ends, by the store's clock.
    remaining: float
    # The last failure's description: what tipped it.
    reason: str
    # How many failures within the window led to it.
    failures: int

    @property
    def until_text(self) -> str:
        return self.until.strftime("%Y-%m-%dT%H:%M:%SZ")

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "until": self.until_text,
            "remaining": round(self.remaining, 3),
            "reason": self.reason,
            "failures": self.failures,
        }


@attrs.define(repr=False)
class _Exemptions:
    """What the current settings exempt, rebuilt only when the settings object changes."""

    trusted: TrustedProxies = attrs.field(factory=TrustedProxies)
    _settings: Settings | None = None
    # The IPv6 prefixes (at the ban prefix length) that contain a trusted network.
    _covering: frozenset[ipaddress.IPv6Network] = frozenset()

    def __repr__(self) -> str:
        return f"<_Exemptions {self.trusted!r}>"

    def exempt(self, settings: Settings, ip: IPAddress) -> bool:
        return ip in self.trusted(settings)

    def key(self, settings: Settings, ip: IPAddress) -> str:
        """The ban key for ``ip``: its address, or its IPv6 prefix unless that covers a proxy."""
        prefix = settings.auto_ban.ipv6_prefix
        nat64 = settings.system.nat64_prefixes
        # NAT64 addresses are banned as the IPv4 client they carry, never by IPv6 prefix.
        if ip.version == 4 or prefix == MAX_IPV6_PREFIX or embedded_ipv4(ip, nat64) is not None:
            return client_label(ip, prefix, nat64)
        if settings is not self._settings:
            self._settings = settings
            self._covering = frozenset(
                network.supernet(new_prefix=prefix)
                for network in self.trusted(settings)
                if isinstance(network, ipaddress.IPv6Network) and network.prefixlen > prefix
            )
        network = ipaddress.IPv6Network((ip, prefix), strict=False)
        if network in self._covering:
            return client_label(ip, MAX_IPV6_PREFIX)
        return str(network)


def _banned_text(ban: Ban) -> str:
    return f"banned until {ban.until_text}"


def _parse_target(target: str | IPAddress | IPNetwork) -> IPAddress | IPNetwork:
    if isinstance(target, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return normalize_ip(target)
    network = parse_network(target)  # strict: host bits, zone ids and junk are errors
    if network.prefixlen == network.max_prefixlen:
        return network.network_address
    return network


@attrs.define(repr=False)
class AutoBan(BaseHooks):
    """Counts failures per client, bans, refuses banned clients, and lists and lifts bans.

    ``settings`` returns the current settings (``lambda: gate.settings``): the ``[AutoBan]``
    policy and the trusted networks are read from it for every decision, so a reload applies
    to the next one. ``store`` may be shared with :class:`~mailedge.hooks.ratelimit.RateLimiter`
    (the keys do not collide). ``wall_clock`` only turns a ban's remaining time into a date.
    """

    settings: SettingsSource
    store: RateStore = attrs.field(factory=MemoryStore)
    wall_clock: Callable[[], float] = attrs.field(default=time.time, kw_only=True)
    max_pending: int = attrs.field(
        default=DEFAULT_MAX_PENDING, kw_only=True, validator=attrs.validators.gt(0)
    )
    # Gate events not yet counted: (peer, reason).
    _pending: collections.deque[tuple[IPAddress, str]] = attrs.field(init=False)
    _exemptions: _Exemptions = attrs.field(factory=_Exemptions, init=False)
    # Gate events dropped because the queue was full.
    dropped: int = attrs.field(default=0, init=False)
    # The servers running these hooks (on_start), whose sessions a ban ends.
    _sessions: list[Sessions] = attrs.field(factory=list, init=False)

    @_pending.default
    def _make_pending(self) -> collections.deque[tuple[IPAddress, str]]:
        return collections.deque(maxlen=self.max_pending)

    def __repr__(self) -> str:
        return f"<AutoBan store={self.store!r} pending={len(self._pending)}>"

    def on_start(self, sessions: Sessions) -> None:
        """A server runs these hooks: a ban from now on ends its sessions too."""
        if not any(known is sessions for known in self._sessions):
            self._sessions.append(sessions)

    # -- failures -----------------------------------------------------------------------------

    def on_gate_event(self, event: GateEvent) -> None:
        """The gate's ``on_event`` callback: an untrusted PROXY header is a failure of its peer.

        The callback cannot await, so the failure is queued and counted at the next call into
        this object (every connection's ``on_connect`` makes one), before any ban is checked.
        """
        if event.name is not EventName.UNTRUSTED_HEADER:
            return
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append(
            (event.peer_ip, f"PROXY header from an untrusted peer on listener {event.listener}")
        )

    async def flush(self) -> None:
        """Count the queued gate events now."""
        while self._pending:
            ip, reason = self._pending.popleft()
            await self._record(ip, reason)

    async def record_failure(self, ip: IPAddress | str, reason: str) -> Ban | None:
        """Count one failure for ``ip``; return the ban if this one (or an earlier one) made it.

        For handlers: call it for abuse the hooks do not see, such as a session closed for
        too many bad commands. ``reason`` describes the failure in a few words; the ban keeps
        the last one. Trusted proxies are never counted.
        """
        await self.flush()
        address = normalize_ip(ipaddress.ip_address(ip) if isinstance(ip, str) else ip)
        return await self._record(address, reason)

    async def on_auth_failure(self, context: ConnectionContext, username: str) -> None:
        if not context.client_known:
            return
        shown = username[:_MAX_USERNAME_SHOWN]
        await self.record_failure(
            context.client_ip, f"failed login for {shown!r} on listener {context.listener}"
        )

    async def _record(self, ip: IPAddress, reason: str) -> Ban | None:
        settings = self.settings()
        policy = settings.auto_ban
        if not policy.enable:
            return None
        if self._exemptions.exempt(settings, ip):
            logger.debug("autoban: not counting %s, a trusted proxy: %s", ip, reason)
            return None
        key = self._exemptions.key(settings, ip)
        existing = await self.store.get(_BAN + key)
        if existing is not None:
            return self._ban(existing)
        count = await self.store.hit(_FAIL + key, policy.window, policy.failures)
        # A NAT64 client in both forms: "64:ff9b::c633:6407 (as 198.51.100.7)".
        shown = key
        if embedded_ipv4(ip, settings.system.nat64_prefixes) is not None:
            shown = describe_client(ip, nat64_prefixes=settings.system.nat64_prefixes)
        logger.debug("autoban: failure %d/%d for %s: %s", count, policy.failures, shown, reason)
        if count < policy.failures:
            return None
        value = json.dumps({"reason": reason, "failures": count})
        await self.store.set(_BAN + key, value, policy.duration)
        await self.store.delete(_FAIL + key)
        ban = self._ban(Entry(_BAN + key, value, policy.duration))
        logger.warning(
            "autoban: banned %s until %s (%g s) after %d failures within %g s; last: %s",
            shown,
            ban.until_text,
            policy.duration,
            count,
            policy.window,
            reason,
        )
        self.enforce(ban)
        return ban

    # -- bans ---------------------------------------------------------------------------------

    def _ban(self, entry: Entry) -> Ban:
        try:
            record = json.loads(entry.value)
            reason, failures = str(record["reason"]), int(record["failures"])
        except (ValueError, TypeError, KeyError):
            # Another writer's format in a shared store: still a ban, with less detail.
            reason, failures = "unknown", 0
        until = math.ceil(self.wall_clock() + entry.ttl)
        return Ban(
            key=entry.key.removeprefix(_BAN),
            until=datetime.datetime.fromtimestamp(until, datetime.UTC),
            remaining=entry.ttl,
            reason=reason,
            failures=failures,
        )

    async def banned(self, ip: IPAddress) -> Ban | None:
        """The ban that covers ``ip`` now, if any (None for trusted proxies, always)."""
        await self.flush()
        settings = self.settings()
        ip = normalize_ip(ip)
        if self._exemptions.exempt(settings, ip):
            return None
        entry = await self.store.get(_BAN + self._exemptions.key(settings, ip))
        return None if entry is None else self._ban(entry)

    async def on_connect(self, context: ConnectionContext) -> Verdict:
        return await self._refuse_banned(context, "connection")

    async def on_auth_attempt(self, context: ConnectionContext, username: str) -> Verdict:
        """Refuse a banned client's login before its password is checked: on a session
        opened before the ban, this is what stops the guessing."""
        return await self._refuse_banned(context, "login")

    async def _refuse_banned(self, context: ConnectionContext, what: str) -> Verdict:
        await self.flush()
        if not self.settings().auto_ban.enable or not context.client_known:
            return Verdict.accept()
        ban = await self.banned(context.client_ip)
        if ban is None:
            return Verdict.accept()
        logger.debug(
            "autoban: refusing the %s of %r: %s is banned (%s)", what, context, ban.key, ban.reason
        )
        # TEMPFAIL rather than REJECT: the ban ends, and a legitimate sender caught by it
        # should retry then rather than bounce its mail.
        return Verdict.tempfail(_banned_text(ban))

    # -- ending the sessions a ban covers ---------------------------------------------------

    def enforce(self, ban: Ban) -> int:
        """End every open session ``ban`` covers, in every server running these hooks.

        Called for each ban this object makes. Returns how many sessions were ended.
        """
        if not self._sessions:
            return 0
        try:
            target = _parse_target(ban.key)
        except ValueError:
            # Another writer's key in a shared store: it covers nothing this server can name.
            logger.warning("autoban: cannot end the sessions of ban key %r", ban.key)
            return 0
        ended = sum(sessions.end(target, _banned_text(ban)) for sessions in self._sessions)
        if ended:
            logger.warning("autoban: ended %d open session(s) of %s", ended, ban.key)
        return ended

    async def ban_learned(self, key: str) -> int:
        """A ban with ``key`` ("198.51.100.7", "2001:db8:1:2::/64") was made elsewhere.

        The seam for a shared store: whatever tells this process of another's ban (a Redis
        pub/sub message on the ban key, say) calls this, and the ban's sessions here end as
        if it were made here. Reads the ban from the store (nothing happens when it is not
        there, or no longer); returns how many sessions were ended.
        """
        await self.flush()
        entry = await self.store.get(_BAN + key)
        if entry is None:
            return 0
        return self.enforce(self._ban(entry))

    async def bans(self) -> list[Ban]:
        """Every active ban, the soonest to end first."""
        await self.flush()
        entries = await self.store.scan(_BAN)
        return sorted((self._ban(entry) for entry in entries), key=lambda b: (b.remaining, b.key))

    async def lift(self, target: str | IPAddress | IPNetwork) -> bool:
        """Lift the ban on an address or a banned network; True when there was one.

        An address lifts the ban that covers it (its prefix, or the address itself); a
        network such as ``"2001:db8:1:2::/64"`` lifts the ban with exactly that key. Its
        failure record goes too, so the client starts afresh. Raises ``ValueError`` for text
        that is neither (the message names it).
        """
        await self.flush()
        parsed = _parse_target(target)
        if isinstance(parsed, ipaddress.IPv4Network | ipaddress.IPv6Network):
            keys = {str(parsed)}
        else:
            settings = self.settings()
            keys = {
                self._exemptions.key(settings, parsed),
                client_label(parsed, settings.auto_ban.ipv6_prefix, settings.system.nat64_prefixes),
                client_label(parsed, MAX_IPV6_PREFIX, settings.system.nat64_prefixes),
            }
        lifted = False
        for key in sorted(keys):
            if await self.store.delete(_BAN + key):
                lifted = True
                logger.warning("autoban: lifted the ban on %s", key)
            await self.store.delete(_FAIL + key)
        return lifted
