"""The SPF hook: RFC 7208 at MAIL FROM, for the client the gate recovered.

:class:`SPFHook` evaluates the sender (or, for the null sender of bounces, the HELO name: RFC
7208 2.4) against ``context.client_ip``, the client a trusted proxy named, never the proxy's
own address. It adds a ``Received-SPF:`` header (RFC 7208 9.1) and an ``spf:<result>`` flag
to its verdict, and refuses only what the policy says to:

========== =========================================== ==================================
result     default                                     option
========== =========================================== ==================================
pass, none accept with the header
neutral,   accept with the header
softfail
fail       accept with the header (DMARC decides)      ``reject_fail``: 550 5.7.23
temperror  451 4.7.24, "try again later"
permerror  accept with the header                      ``reject_permerror``: 550 5.7.24
========== =========================================== ==================================

Status codes are RFC 7372's (5.7.23 "SPF validation failed", X.7.24 "SPF validation error");
RFC 7208 8.6 and 8.7 name the older 4.4.3 and 5.5.2 for the errors.

When the gate does not know the client (a proxy's LOCAL health check, or a header without an
address), nothing is evaluated: the result is ``none`` with a comment saying why, because the
only address at hand is the proxy's, and judging the proxy as the sender gives a wrong answer.

The DMARC hook (:mod:`mailedge.hooks.dmarc`) evaluates SPF again at the end of DATA through
authheaders, with the same resolver settings: the hooks stay independent (either can be used
alone, and no per-connection state is shared between them) at the price of a second SPF
evaluation per message, which a caching resolver makes cheap.
"""

from __future__ import annotations

import logging
import re

import attrs
import spf
import trio

from mailedge.context import ConnectionContext
from mailedge.hooks.dns import (
    DEFAULT_DNS_THREADS,
    ResolverSettings,
    make_resolver,
    resolving,
    run_blocking,
)
from mailedge.names import HOSTNAME
from mailedge.policy import BaseHooks, Verdict

__all__ = ["DEFAULT_QUERYTIME", "RESULTS", "SPFHook", "SPFResult", "received_spf"]

log = logging.getLogger("mailedge.hooks.spf")

# RFC 7208 4.6.4: a whole check should be allowed at least 20 seconds before it is a temperror.
DEFAULT_QUERYTIME = 20.0
# The trio side waits this much longer than pyspf's own budget before abandoning the thread:
# pyspf checks its budget only between lookups, so the last lookup may run past it.
_GRACE = 2.0

# RFC 7208 2.6: the results a check can have.
RESULTS = frozenset({"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"})

# RFC 7208 2.3: the HELO identity is checked only when it is a domain name (not an address
# literal, and with at least one dot, as a fully qualified name has).
_FQDN = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+\.?")
# RFC 5322 3.2.4 qtext and 3.2.3 dot-atom; anything else in a value is quoted or replaced.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@attrs.frozen
class SPFResult:
    """One SPF check: the result, what was checked, and why."""

    result: str
    client_ip: str | None
    # "mailfrom" or "helo" (RFC 7208 9.1's identity key).
    identity: str
    # The checked mailbox: MAIL FROM, or postmaster@<HELO> for the null sender (RFC 7208 2.4).
    sender: str
    helo: str
    domain: str
    explanation: str = ""

    @property
    def comment(self) -> str:
        """The Received-SPF comment's text after the receiver's name (RFC 7208 9.1 style)."""
        who, ip = self.sender, self.client_ip
        match self.result:
            case "pass":
                return f"domain of {who} designates {ip} as permitted sender"
            case "fail":
                return f"domain of {who} does not designate {ip} as permitted sender"
            case "softfail":
                return f"transitioning domain of {who} does not designate {ip} as permitted sender"
            case "neutral":
                return f"{ip} is neither permitted nor denied by domain of {who}"
            case "temperror":
                return f"error in processing during lookup of {who}"
            case "permerror":
                return f"permanent error in processing domain of {who}"
        if ip is None:
            return "client address unknown, SPF not evaluated"
        if self.identity == "helo" and not _FQDN.fullmatch(self.helo):
            return "HELO is not a domain name, SPF not evaluated"
        return f"domain of {who} does not provide an SPF record"


def _comment_text(text: str) -> str:
    # A comment may hold anything printable but unescaped parentheses and backslashes.
    return re.sub(r"([()\\])", r"\\\1", _UNPRINTABLE.sub("?", text))


def _value(text: str) -> str:
    """RFC 7208 9.1: a key's value is a dot-atom or a quoted-string."""
    if _DOT_ATOM.fullmatch(text):
        return text
    quoted = re.sub(r'(["\\])', r"\\\1", _UNPRINTABLE.sub("?", text))
    return f'"{quoted}"'


def received_spf(result: SPFResult, receiver: str) -> str:
    """The Received-SPF header line (RFC 7208 9.1), unfolded, without CRLF."""
    pairs = []
    if result.client_ip is not None:
        pairs.append(f"client-ip={result.client_ip}")
    pairs += [
        f"envelope-from={_value(result.sender if result.identity == 'mailfrom' else '')}",
        f"helo={_value(result.helo)}",
    ]
    if result.result in ("temperror", "permerror") and result.explanation:
        pairs.append(f"problem={_value(result.explanation)}")
    pairs += [f"receiver={_value(receiver)}", f"identity={result.identity}"]
    comment = _comment_text(f"{receiver}: {result.comment}")
    return f"Received-SPF: {result.result} ({comment}) {'; '.join(pairs)};"


def _check(
    client_ip: str, sender: str, helo: str, receiver: str, querytime: float
) -> tuple[str, str]:
    """pyspf's check2 (blocking; run in a worker thread under :func:`resolving`)."""
    result, explanation = spf.check2(
        client_ip, sender, helo, receiver=receiver, querytime=querytime
    )
    return str(result), str(explanation)


@attrs.define(repr=False)
class SPFHook(BaseHooks):
    """SPF at MAIL FROM: a Received-SPF header, and a refusal when the policy says so.

    Share one ``limiter`` between the SPF and DMARC hooks to bound their threads together.
    """

    # This server's name, as the receiver in Received-SPF (RFC 7208 9.1) and pyspf's %{r}.
    receiver: str = attrs.field(validator=attrs.validators.matches_re(HOSTNAME))
    resolver: ResolverSettings = attrs.field(factory=ResolverSettings)
    # Many sites tag SPF fail and let DMARC (with DKIM) decide: forwarders break SPF but not
    # DKIM, so rejecting on SPF alone refuses forwarded mail the domain owner would accept.
    reject_fail: bool = False
    # RFC 7208 8.7 allows either; a typo in a sender's record is the sender's problem, so the
    # default keeps the mail and records the error.
    reject_permerror: bool = False
    querytime: float = attrs.field(default=DEFAULT_QUERYTIME, validator=attrs.validators.gt(0))
    limiter: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(DEFAULT_DNS_THREADS)
    )

    def __repr__(self) -> str:
        policy = []
        if self.reject_fail:
            policy.append("reject-fail")
        if self.reject_permerror:
            policy.append("reject-permerror")
        flags = f" {' '.join(policy)}" if policy else ""
        return f"<SPFHook {self.receiver} {self.resolver!r}{flags}>"

    async def evaluate(self, context: ConnectionContext, helo: str, mail_from: str) -> SPFResult:
        """The SPF result for this client, HELO and sender; DNS errors become temperror."""
        sender = mail_from if mail_from else f"postmaster@{helo}"
        identity = "mailfrom" if mail_from else "helo"
        domain = sender.rpartition("@")[2]
        if not context.client_known:
            # A LOCAL health check or a header without an address: client_ip is a stand-in
            # (the proxy's own address), and evaluating it would judge the proxy, not a sender.
            return SPFResult("none", None, identity, sender, helo, domain)
        client_ip = str(context.client_ip)
        if identity == "helo" and not _FQDN.fullmatch(helo):
            return SPFResult("none", client_ip, identity, sender, helo, domain)
        resolver = make_resolver(self.resolver)

        def check() -> tuple[str, str]:
            with resolving(resolver):
                return _check(client_ip, mail_from, helo, self.receiver, self.querytime)

        try:
            result, explanation = await run_blocking(
                check, limiter=self.limiter, deadline=self.querytime + _GRACE
            )
        except trio.TooSlowError:
            result, explanation = "temperror", f"no answer within {self.querytime:g} s"
        except Exception:
            # pyspf turns DNS trouble into temperror itself; anything else is a bug there or
            # here, and still must not let the message through unchecked.
            log.exception("SPF check of %s for %s failed", sender, client_ip)
            result, explanation = "temperror", "internal error"
        if result not in RESULTS:
            log.warning("pyspf returned %r for %s; treating it as temperror", result, sender)
            result = "temperror"
        return SPFResult(result, client_ip, identity, sender, helo, domain, explanation)

    async def on_mail_from(self, context: ConnectionContext, helo: str, mail_from: str) -> Verdict:
        result = await self.evaluate(context, helo, mail_from)
        log.info(
            "spf=%s client=%s identity=%s sender=<%s>: %s",
            result.result,
            result.client_ip or "unknown",
            result.identity,
            result.sender,
            result.explanation or "-",
        )
        if result.result == "temperror":
            return Verdict.tempfail(
                f"SPF check of {result.domain} failed temporarily, try again later",
                status="4.7.24",
            )
        if result.result == "fail" and self.reject_fail:
            return Verdict.reject(
                f"SPF fail: {result.client_ip} is not allowed to send mail for {result.domain}",
                status="5.7.23",
            )
        if result.result == "permerror" and self.reject_permerror:
            return Verdict.reject(
                f"SPF permerror: the SPF record of {result.domain} is invalid", status="5.7.24"
            )
        return Verdict.accept(
            headers=[received_spf(result, self.receiver)],
            flags=frozenset({f"spf:{result.result}"}),
        )
