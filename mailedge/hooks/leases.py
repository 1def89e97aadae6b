"""Rate-limit tokens taken from a shared store in advance and spent here: GCRA leases.

A shared store costs one round trip per decision, and a round trip costs a Python process
about as much CPU as the whole connection it decides on. A client that connects again and
again (a large sender's relays, an IMAP client's several connections) would pay it every
time. So when one client's decisions come quickly, a process asks the store for several
tokens in one step (the store advances the client's GCRA time by all of them, atomically,
and grants only what its burst still holds) and spends them locally, with no round trip.

The bounds, which docs/scale-out.md states:

- **Never looser than configured, beyond the tokens held.** Every token was counted in the
  shared store when it was granted. A token spent later than it was granted can carry at
  most itself past the window, so the excess is at most what the processes hold: at most
  :func:`lease_cap` each, and for at most :data:`LEASE_SECONDS`.
- **Briefly stricter, then repaired.** Tokens a process holds are not available to the
  others; a lease that expires unspent is handed back to the store (:meth:`LeaseTable.sweep`).
- **Small limits are exact.** A limit whose burst is below ``2 * LEASE_FRACTION`` tokens
  never leases more than one token at a time, which is exactly the one-step decision (below
  :data:`CREDIT_MIN_BURST`, not even the first decision is credited).

A client whose bucket this process knows to be full (never seen, or rested since) gets one
more thing: its first decision is made here and recorded with the store afterwards
(:meth:`LeaseTable.credit`), since a full bucket allows it. Should the other processes have
emptied the whole burst meanwhile, the excess is that one event, once per time the bucket
drains (at most a tenth of the burst per process, since limits with a burst below
:data:`CREDIT_MIN_BURST` get no credit); the reply tells this process the truth.

The same idea holds for shared connection counts (``maxConnectionsPerIp``): a slot whose
connection closed is kept for :data:`LEASE_SECONDS` for the client's next connection
(:func:`spare_cap` of them per client), so a client that comes back costs no round trip; the
count is never looser, and stricter by at most the spares kept.

This module is sans-IO: it keeps the table and says what to ask for; the store talks to Redis.
"""

from __future__ import annotations

import functools
import math

import attrs

__all__ = [
    "CREDIT_MIN_BURST",
    "LEASE_FRACTION",
    "LEASE_SECONDS",
    "MAX_LEASE",
    "MAX_LEASES",
    "LeaseTable",
    "burst_of",
    "lease_cap",
    "spare_cap",
]

# A token is spent within this long of being granted, or handed back: long enough that a
# client connecting every few hundred milliseconds reuses one lease many times, short enough
# that tokens held but unused come back to the other processes within seconds.
LEASE_SECONDS = 2.0
# One lease holds at most 1/20 of the limit's burst: with a few hosts holding one each, a
# client's limit stays within a few percent of the configured one.
LEASE_FRACTION = 20
# And never more than this many tokens, however large the burst: a lease of 64 already makes
# the round trip 1/64 of a connection's cost.
MAX_LEASE = 64
# The shortest time a pace is measured over: two decisions in the same instant mean "busy",
# not an infinite rate (the cap bounds the lease anyway).
_MIN_ELAPSED = 0.001
# A credit can exceed the limit by one event per process each time a client's bucket has
# drained: below a burst of 10, that one event would be more than a tenth of it.
CREDIT_MIN_BURST = 10
# Clients with a lease held at once; beyond this, decisions for new clients take one token
# each (the exact one-step decision). Each entry is about 200 bytes.
MAX_LEASES = 10_000


@functools.lru_cache(maxsize=256)  # a server has a handful of limits
def burst_of(emission_interval: float, burst_tolerance: float) -> int:
    """How many events a limit allows at once (its burst)."""
    if emission_interval <= 0:
        return 1  # no interval, no schedule to share: every decision is the exact one
    return int(burst_tolerance / emission_interval + 1e-9) + 1


def lease_cap(emission_interval: float, burst_tolerance: float) -> int:
    """The most tokens one lease may hold for a limit: 1 means no leasing."""
    return max(1, min(MAX_LEASE, burst_of(emission_interval, burst_tolerance) // LEASE_FRACTION))


def spare_cap(limit: int) -> int:
    """How many closed connections' slots to keep for a client's next ones.

    The same bound as a lease: 1/20 of the limit, so below 20 none are kept and every slot
    is taken and given back exactly.
    """
    return min(MAX_LEASE, limit // LEASE_FRACTION)


@attrs.define(repr=False, slots=True)
class _Lease:
    granted: int
    remaining: int
    granted_at: float
    expires_at: float
    emission_interval: float
    burst_tolerance: float


@attrs.define(repr=False)
class LeaseTable:
    """The tokens this process holds, by key, and how many to ask for next.

    A key's first decision takes one token. After that, a lease asks for what the client would
    spend in a lease's life at its recent pace, from one up to :func:`lease_cap`; what it
    does not spend is handed back when the lease expires.
    """

    seconds: float = LEASE_SECONDS
    max_keys: int = MAX_LEASES
    spent: int = attrs.field(default=0, init=False)
    credited: int = attrs.field(default=0, init=False)
    _leases: dict[str, _Lease] = attrs.field(factory=dict, init=False)
    # Keys whose bucket is not full, as far as this process knows: when it will be again
    # (infinity while a decision's reply is awaited). A key absent here is rested.
    _unrested: dict[str, float] = attrs.field(factory=dict, init=False)
    # A reply the full table could not keep: until then, a key not in it may be one whose
    # bucket is not full, so none is credited.
    _forgotten_until: float = attrs.field(default=-math.inf, init=False)

    def __repr__(self) -> str:
        return (
            f"<LeaseTable keys={len(self._leases)} held={self.held} unrested={len(self._unrested)}>"
        )

    @property
    def held(self) -> int:
        """Tokens held and not yet spent, over every key."""
        return sum(lease.remaining for lease in self._leases.values())

    def spend(self, key: str, emission_interval: float, burst_tolerance: float, now: float) -> bool:
        """Spend one token held for ``key`` (True), or say a round trip is needed (False)."""
        lease = self._leases.get(key)
        if (
            lease is None
            or lease.remaining <= 0
            or now >= lease.expires_at
            or lease.emission_interval != emission_interval
            or lease.burst_tolerance != burst_tolerance
        ):
            return False
        lease.remaining -= 1
        self.spent += 1
        return True

    def credit(
        self, key: str, emission_interval: float, burst_tolerance: float, now: float
    ) -> bool:
        """Allow one event for ``key`` now and record it with Redis afterwards (True)?

        Only for a client whose bucket this process knows no use of (never seen, or rested
        since its last reply): the event is within its burst unless the other processes
        emptied the whole burst meanwhile, and then the excess is this one event, once per
        time the bucket drains. Never for a limit below a burst of :data:`CREDIT_MIN_BURST`,
        nor with the table full, nor for a client not in it while a reply the full table
        could not keep may be its. Call it after :meth:`spend` said False; then
        :meth:`settled` with the reply.
        """
        if burst_of(emission_interval, burst_tolerance) < CREDIT_MIN_BURST:
            return False
        if key in self._unrested:
            if self._unrested[key] > now:
                return False
        elif now < self._forgotten_until or len(self._unrested) >= self.max_keys:
            return False
        self._unrested[key] = math.inf
        self.credited += 1
        return True

    def settled(self, key: str, now: float, rested_in: float) -> None:
        """A reply said ``key``'s bucket is full again in ``rested_in`` seconds."""
        if rested_in > 0:
            if key in self._unrested or len(self._unrested) < self.max_keys:
                self._unrested[key] = now + rested_in
            else:
                self._forgotten_until = max(self._forgotten_until, now + rested_in)
        else:
            self._unrested.pop(key, None)

    def want(
        self, key: str, emission_interval: float, burst_tolerance: float, now: float
    ) -> tuple[int, int]:
        """How many tokens to ask for, and how many held ones to hand back first.

        Call it after :meth:`spend` said False. The handed-back count is what an expired or
        outdated lease still held (the caller returns them to the store).
        """
        cap = lease_cap(emission_interval, burst_tolerance)
        lease = self._leases.get(key)
        if lease is None:
            return 1, 0
        unused = lease.remaining
        if lease.emission_interval != emission_interval or lease.burst_tolerance != burst_tolerance:
            # The limit changed (a reload): start again from one, under the new limit.
            del self._leases[key]
            return 1, unused
        if unused > 0:
            # Expired with tokens left: the client spent this many in a lease's life.
            lease.remaining = 0
            return max(1, min(cap, lease.granted - unused)), unused
        # Spent: this many tokens since the lease was granted.
        pace = lease.granted / max(now - lease.granted_at, _MIN_ELAPSED)
        return max(1, min(cap, math.ceil(pace * self.seconds))), 0

    def granted(
        self,
        key: str,
        emission_interval: float,
        burst_tolerance: float,
        now: float,
        granted: int,
    ) -> None:
        """Record a grant of ``granted`` tokens (one of them spent at once) for ``key``."""
        if granted <= 0 or lease_cap(emission_interval, burst_tolerance) <= 1:
            return
        if key not in self._leases and len(self._leases) >= self.max_keys:
            # Full: this key's decisions take one token each, the exact one-step decision.
            return
        # Re-inserted, so the table stays in the order leases expire (sweep stops early).
        self._leases.pop(key, None)
        self._leases[key] = _Lease(
            granted=granted,
            remaining=granted - 1,
            granted_at=now,
            expires_at=now + self.seconds,
            emission_interval=emission_interval,
            burst_tolerance=burst_tolerance,
        )

    def sweep(self, now: float) -> list[tuple[str, float, int]]:
        """Forget expired leases; returns (key, emission interval, unused) to hand back.

        A lease expired for less than another :data:`LEASE_SECONDS` with nothing left is
        kept, so that a client coming back soon still gets its larger lease.
        """
        for key, rested_at in list(self._unrested.items()):
            if now >= rested_at:
                del self._unrested[key]
        handed_back = []
        for key, lease in list(self._leases.items()):
            if now < lease.expires_at:
                break  # in expiry order: the rest are live
            if lease.remaining > 0:
                handed_back.append((key, lease.emission_interval, lease.remaining))
                lease.granted -= lease.remaining
                lease.remaining = 0
            if now >= lease.expires_at + self.seconds:
                del self._leases[key]
        return handed_back
