"""The DMARC hook: SPF, DKIM and DMARC (RFC 7489) at the end of DATA, through authheaders.

:class:`DMARCHook` runs ``authheaders.authenticate_message`` on the whole message with the
recovered client address, the envelope sender and the HELO name, and the configured resolver
(:mod:`mailedge.hooks.dns`), in a worker thread. The message is read there too, from the
:class:`~mailedge.policy.Message` the handler hands ``on_data`` (a file in the Maildir's
``tmp/`` for the example handler): its bytes exist only in that thread, so at most
``limiter``'s threads hold a message each, however many sessions are in DATA. It adds the library's
``Authentication-Results:`` header (RFC 8601), parsed and written again with authres as one
line, and applies the From domain's policy when ``enforce`` is set:

============================================ ============================================
outcome                                      verdict
============================================ ============================================
dmarc=pass, none, permerror; or p=none       accept, ``Authentication-Results``
dmarc=fail, p=reject                         reject: 550 5.7.1 "DMARC policy of <domain>
                                             rejects this message"
dmarc=fail, p=quarantine                     accept with the ``quarantine`` flag
dmarc=fail with SPF or DKIM temperror,       tempfail: 451 4.4.3 (the failure may be the
p=reject or quarantine                       DNS's, not the sender's)
DNS failure fetching the DMARC record;       tempfail: 451 4.4.3
no answer within ``deadline``
anything else going wrong                    tempfail: 451 4.3.0 (logged)
============================================ ============================================

With ``enforce=False`` a failing message is only tagged (``dmarc:fail``), whatever the policy.
``pct=`` is not applied (authheaders does not; DMARCbis drops it): a policy applies to all.

The policy is looked up again by the hook (RFC 7489 6.6.3): authheaders 0.16 applies a
record's ``sp=`` to the organizational domain itself, which would let ``p=reject; sp=none``
forgeries of that domain through. The header's ``policy.dmarc`` shows the policy applied.
Organizational domains come from authheaders' public suffix list: under a TLD the list does
not know (``.test``, a private TLD), every domain of the TLD counts as one organization.

An unsigned message gets ``dkim=none`` rather than authheaders' ``dkim=fail`` (RFC 8601 2.7.1:
"none" means the message was not signed); it is passed in as a previous result.

When the gate does not know the client (a proxy's LOCAL health check, or a header without an
address), nothing is evaluated and the header says ``none`` with a comment: the only address
at hand is the proxy's, and SPF for it would be a wrong answer.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import attrs
import authheaders
import authres
import authres.core
import dkim
import trio
from authheaders import dmarc_lookup

from mailedge.context import ConnectionContext
from mailedge.hooks.dns import (
    DEFAULT_DNS_THREADS,
    AuthDNS,
    DNSTempError,
    ResolverSettings,
    make_resolver,
    resolving,
    run_blocking,
)
from mailedge.names import HOSTNAME
from mailedge.policy import BaseHooks, Envelope, Message, Verdict

__all__ = ["DEFAULT_DEADLINE", "DMARCHook", "DMARCResult"]

log = logging.getLogger("mailedge.hooks.dmarc")

# RFC 7208 4.6.4's 20 s for the SPF check, plus the DKIM key and DMARC record lookups.
DEFAULT_DEADLINE = 30.0

_PREFIX = "Authentication-Results:"


@attrs.frozen
class DMARCResult:
    """What authheaders found, as the hook decides on it."""

    # The whole Authentication-Results header line, unfolded, without CRLF.
    header: str
    dmarc: str = "none"
    # The RFC5322.From domain and the policy that applied to it (p=, or sp= for a subdomain).
    domain: str | None = None
    policy: str | None = None
    spf: str | None = None
    dkim: str | None = None

    @property
    def temperror(self) -> bool:
        """True when SPF or DKIM could not be evaluated for now (a DNS failure)."""
        return "temperror" in (self.spf, self.dkim)


def _signed(message: bytes) -> bool:
    headers, _ = dkim.rfc822_parse(message)
    return any(name.lower() == b"dkim-signature" for name, _ in headers)


def _published_policy(domain: str, dnsfunc: AuthDNS) -> str | None:
    """The policy that applies to mail from ``domain`` (RFC 7489 6.3 and 6.6.3, RFC 9091).

    The From domain's own record gives ``p=``; failing that, its organizational domain's
    record gives ``sp=`` (else ``p=``), or ``np=`` when the From domain does not exist.
    authheaders 0.16 applies ``sp=`` to the organizational domain's own mail too, so a
    ``p=reject; sp=none`` domain would lose its protection; the hook asks again itself.
    """
    record, organizational = dmarc_lookup.receiver_record(domain, dnsfunc=dnsfunc)
    if not record or "p" not in record:
        return None
    if not organizational:
        return str(record["p"])
    if "np" in record and dnsfunc(domain) is None:
        return str(record["np"])
    return str(record.get("sp", record["p"]))


def _property(result: Any, ptype: str, name: str) -> Any:
    for prop in result.properties:
        if prop.type == ptype and prop.name == name:
            return prop
    return None


def _results(header: str, dnsfunc: AuthDNS) -> DMARCResult:
    """The results in authheaders' header, with the policy checked (see _published_policy).

    Raises on a header that does not parse or names a method twice: authheaders writes one
    result per method, so a second one could only come from text smuggled into a value.
    """
    parsed = authres.AuthenticationResultsHeader.parse(" ".join(header.split()))
    found: dict[str, Any] = {}
    for result in parsed.results:
        method = str(result.method).lower()
        if method in found:
            raise ValueError(f"{method} appears twice in {header!r}")
        found[method] = result
    dmarc = found.get("dmarc")
    domain = policy = None
    if dmarc is not None:
        header_from = _property(dmarc, "header", "from")
        domain = str(header_from.value) if header_from is not None and header_from.value else None
        claimed = _property(dmarc, "policy", "dmarc")
        if claimed is not None and claimed.value:
            policy = str(claimed.value)
        if domain is not None and policy is not None and str(dmarc.result) in ("pass", "fail"):
            # Asked again with the same resolver, the record is there; should it have gone
            # (or turned unreadable) in between, authheaders' reading stands.
            with contextlib.suppress(dmarc_lookup.DMARCException):
                policy = _published_policy(domain, dnsfunc) or policy
            claimed.value = authres.core.QuotableValue(policy)

    def outcome(method: str) -> str | None:
        result = found.get(method)
        return None if result is None else str(result.result).lower()

    return DMARCResult(
        header=str(parsed),
        dmarc=str(dmarc.result).lower() if dmarc is not None else "none",
        domain=domain,
        policy=policy,
        spf=outcome("spf"),
        dkim=outcome("dkim"),
    )


@attrs.define(repr=False)
class DMARCHook(BaseHooks):
    """SPF + DKIM + DMARC at the end of DATA; the From domain's policy when ``enforce``.

    Share one ``limiter`` between the SPF and DMARC hooks to bound their threads together.
    """

    # This server's authserv-id (RFC 8601 2.5): usually its host name.
    authserv_id: str = attrs.field(validator=attrs.validators.matches_re(HOSTNAME))
    resolver: ResolverSettings = attrs.field(factory=ResolverSettings)
    # Apply p=reject and p=quarantine; False only tags (a trial period for a new receiver).
    enforce: bool = True
    deadline: float = attrs.field(default=DEFAULT_DEADLINE, validator=attrs.validators.gt(0))
    limiter: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(DEFAULT_DNS_THREADS)
    )

    def __repr__(self) -> str:
        mode = "enforce" if self.enforce else "tag-only"
        return f"<DMARCHook {self.authserv_id} {self.resolver!r} {mode}>"

    def _unknown_client(self) -> DMARCResult:
        return DMARCResult(f"{_PREFIX} {self.authserv_id}; none (client address unknown)")

    async def evaluate(
        self, context: ConnectionContext, envelope: Envelope, message: Message
    ) -> DMARCResult:
        """authheaders' results for this message; raises DNSTempError or trio.TooSlowError."""
        if not context.client_known:
            # A LOCAL health check or a header without an address: client_ip is the proxy's.
            return self._unknown_client()
        resolver = make_resolver(self.resolver)
        client_ip = str(context.client_ip)
        dnsfunc = AuthDNS(resolver)

        def authenticate() -> DMARCResult:
            # Read here, in the worker thread: dkimpy needs the bytes, and they need not
            # outlive the check (nor wait in the event loop for a thread).
            data = message.read_bytes()
            # authheaders reports an unsigned message as dkim=fail; a previous result it is
            # handed is kept instead of a check of its own (DMARC sees no DKIM pass either way).
            previous = (
                None if _signed(data) else f"{_PREFIX} {self.authserv_id}; dkim=none (no signature)"
            )
            with resolving(resolver):
                header = authheaders.authenticate_message(
                    data,
                    self.authserv_id,
                    prev=previous,
                    spf=True,
                    dkim=True,
                    dmarc=True,
                    ip=client_ip,
                    mail_from=envelope.mail_from,
                    helo=envelope.helo,
                    dnsfunc=dnsfunc,
                )
                # Parsed and written again by authres: one line, values quoted as they must
                # be, and the header says exactly what the verdict is based on.
                return _results(str(header), dnsfunc)

        return await run_blocking(authenticate, limiter=self.limiter, deadline=self.deadline)

    async def on_data(
        self, context: ConnectionContext, envelope: Envelope, message: Message
    ) -> Verdict:
        try:
            result = await self.evaluate(context, envelope, message)
        except (DNSTempError, trio.TooSlowError) as exc:
            log.info("dmarc=temperror sender=<%s>: %s", envelope.mail_from, exc)
            return Verdict.tempfail(
                "DMARC check failed temporarily (DNS), try again later", status="4.4.3"
            )
        except Exception:
            # A bug in the libraries or here; the message must not pass unchecked.
            log.exception("DMARC check of a message from <%s> failed", envelope.mail_from)
            return Verdict.tempfail("DMARC check failed, try again later", status="4.3.0")
        log.info(
            "dmarc=%s domain=%s policy=%s spf=%s dkim=%s",
            result.dmarc,
            result.domain,
            result.policy,
            result.spf,
            result.dkim,
        )
        headers = [result.header]
        flags = {f"dmarc:{result.dmarc}"}
        if result.dmarc == "fail" and self.enforce and result.policy in ("reject", "quarantine"):
            if result.temperror:
                return Verdict.tempfail(
                    f"DMARC check of {result.domain} failed temporarily (DNS), try again later",
                    status="4.4.3",
                )
            if result.policy == "reject":
                return Verdict.reject(
                    f"DMARC policy of {result.domain} rejects this message", status="5.7.1"
                )
            flags.add("quarantine")
        return Verdict.accept(headers=headers, flags=frozenset(flags))
