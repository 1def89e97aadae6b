"""DNS for the SPF and DMARC hooks: one resolver configuration, and the adapters that plug it
into pyspf, dkimpy and authheaders.

**Threads.** pyspf, dkimpy and authheaders evaluate synchronously and call their DNS function
from deep inside that evaluation, so an asynchronous resolver (dnspython's trio backend
included) cannot be awaited there without rewriting the libraries. The hooks therefore run
each whole evaluation in a worker thread with :func:`run_blocking`, behind a
``trio.CapacityLimiter`` so a burst of connections cannot start a thread each, and under a
deadline after which the hook answers "try again later" (the thread is abandoned; its own DNS
bounds end it soon after, and it keeps its limiter token until then).

**pyspf** looks up every name through its module-level ``spf.DNSLookup`` function and offers
no per-query hook. :func:`resolving` installs (once, idempotently) a dispatcher there that uses
the resolver set in a context variable for the current evaluation; outside :func:`resolving`
it calls whatever ``spf.DNSLookup`` was before, so other users of pyspf in the process see no
change. The context variable is per thread evaluation (trio runs each worker in a copy of the
caller's context), so concurrent checks with different resolvers do not mix.

**dkimpy and authheaders** take a ``dnsfunc``; :class:`AuthDNS` is one for both conventions:
dkimpy asks for a key record by a ``bytes`` name and wants ``bytes`` back, authheaders asks for
the DMARC record by a ``str`` name and wants the record text back.

**Failures.** A lookup that may work later (SERVFAIL, timeout, no server answering) raises
:class:`DNSTempError` (a ``dns.exception.DNSException``, which authheaders reports as
``temperror``) or pyspf's ``TempError``; the hooks map both to a 4xx reply, never to an
accepted message. NXDOMAIN and NODATA are answers: "no record".
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import attrs
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf
import trio

from mailedge.networks import (
    EndpointProblem,
    EndpointSyntaxError,
    format_endpoint,
    split_host_port,
)

__all__ = [
    "DEFAULT_DNS_THREADS",
    "DEFAULT_LIFETIME",
    "DEFAULT_TIMEOUT",
    "AuthDNS",
    "DNSTempError",
    "ResolverSettings",
    "make_resolver",
    "resolving",
    "run_blocking",
    "txt_records",
]

T = TypeVar("T")

# One attempt at one server: a nameserver that has not answered in 5 s is not going to
# (dkimpy uses the same default for key lookups).
DEFAULT_TIMEOUT = 5.0
# One whole query, across servers and retries: two attempts' worth, and well inside RFC 7208
# 4.6.4's 20 s budget for a whole SPF check, so one stuck name cannot use all of it.
DEFAULT_LIFETIME = 10.0
# Concurrent SPF/DMARC evaluations (each one a blocked thread): ample for a mail server's
# arrival rate at DNS latencies, and a burst queues here instead of growing threads.
DEFAULT_DNS_THREADS = 16
# Ports are 16 bits (RFC 793); 53 is DNS's (RFC 1035 4.2).
_MAX_PORT = 65535
_DNS_PORT = 53


def _nameservers(value: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    return tuple((str(host), int(port)) for host, port in value)


def _check_nameservers(
    _: object,
    attribute: attrs.Attribute[tuple[tuple[str, int], ...]],
    value: tuple[tuple[str, int], ...],
) -> None:
    for host, port in value:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{attribute.name}: {host!r} is not an IP address (a resolver cannot be "
                "named by a host name it would need itself to resolve)"
            ) from None
        if not 0 < port <= _MAX_PORT:
            raise ValueError(f"{attribute.name}: port {port} of {host} is not 1-{_MAX_PORT}")


def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


@attrs.frozen(repr=False)
class ResolverSettings:
    """Which nameservers the SPF and DMARC hooks ask, and how long they wait.

    ``nameservers`` holds ``(ip, port)`` pairs, each with its own port (dnspython 2.4+ keeps
    one per nameserver); empty means the system resolver (``/etc/resolv.conf``).
    ``timeout`` bounds one attempt at one server, ``lifetime`` one whole query.
    """

    nameservers: tuple[tuple[str, int], ...] = attrs.field(
        default=(), converter=_nameservers, validator=_check_nameservers
    )
    timeout: float = attrs.field(default=DEFAULT_TIMEOUT, converter=float, validator=_positive)
    lifetime: float = attrs.field(default=DEFAULT_LIFETIME, converter=float, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.lifetime < self.timeout:
            raise ValueError(
                f"lifetime ({self.lifetime}) is shorter than one attempt's timeout ({self.timeout})"
            )

    def __repr__(self) -> str:
        servers = ",".join(format_endpoint(*server) for server in self.nameservers) or "system"
        return f"<ResolverSettings {servers} timeout={self.timeout:g} lifetime={self.lifetime:g}>"

    @classmethod
    def parse(
        cls,
        nameservers: Iterable[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        lifetime: float = DEFAULT_LIFETIME,
    ) -> ResolverSettings:
        """Settings from ``"192.0.2.53"``, ``"192.0.2.53:5353"`` or ``"[2001:db8::53]:53"``."""
        return cls(tuple(map(_parse_nameserver, nameservers)), timeout=timeout, lifetime=lifetime)


def _parse_nameserver(text: str) -> tuple[str, int]:
    text = text.strip()
    try:
        split = split_host_port(text, default_port=_DNS_PORT)
    except EndpointSyntaxError as error:
        port = error.port_text
        if error.problem is EndpointProblem.BAD_PORT and port.isdigit():
            raise ValueError(f"nameserver {text!r}: port {port} is not 1-{_MAX_PORT}") from None
        if error.problem is EndpointProblem.BAD_PORT:
            raise ValueError(f"nameserver {text!r}: port {port!r} is not a number") from None
        raise ValueError(f"nameserver {text!r}: expected [IPv6] or [IPv6]:port") from None
    return split.host, split.port


def make_resolver(settings: ResolverSettings) -> dns.resolver.Resolver:
    """A dnspython resolver for ``settings``: its nameservers (or the system's), its bounds.

    It has no cache: each SPF or DMARC evaluation asks afresh, as pyspf assumes (it keeps its
    own per-check cache and honours no TTLs). Safe to share between threads.
    """
    resolver = dns.resolver.Resolver(configure=not settings.nameservers)
    if settings.nameservers:
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in settings.nameservers
        ]
    resolver.timeout = settings.timeout
    resolver.lifetime = settings.lifetime
    return resolver


class DNSTempError(dns.exception.DNSException):
    """A lookup that failed in a way that may not last: SERVFAIL, a timeout, no server.

    A ``DNSException``, so that authheaders reports a DKIM key lookup that raises it as
    ``dkim=temperror`` rather than ``fail``.
    """

    def __init__(self, message: str) -> None:
        # dnspython's DNSException.__init__ takes untyped *args and **kwargs.
        super().__init__(message)  # type: ignore[no-untyped-call]


# NXDOMAIN and NODATA are answers; everything else dnspython raises is a failure to get one.
_NO_RECORD = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)


def _raise_if_abandoned() -> None:
    """End an abandoned evaluation at its next lookup instead of after all of them.

    In a worker whose trio caller was cancelled (the hook's deadline passed), trio raises
    Cancelled here; the caller has already moved on, so it becomes a temporary error that the
    libraries report and nobody reads. Outside a trio worker thread there is nothing to check.
    """
    try:
        trio.from_thread.check_cancelled()
    except RuntimeError:
        return
    except trio.Cancelled:
        raise DNSTempError("the evaluation was abandoned") from None


def _resolve(
    resolver: dns.resolver.Resolver, name: str, rdtype: str, lifetime: float | None = None
) -> dns.resolver.Answer | None:
    """The answer, or None for NXDOMAIN/NODATA; raises DNSTempError for anything else."""
    _raise_if_abandoned()
    try:
        return resolver.resolve(
            name,
            rdtype,
            search=False,
            lifetime=min(resolver.lifetime, lifetime or resolver.lifetime),
        )
    except _NO_RECORD:
        return None
    except dns.exception.DNSException as exc:
        raise DNSTempError(f"{name} {rdtype}: {exc}") from exc


def txt_records(resolver: dns.resolver.Resolver, name: str) -> list[bytes]:
    """Every TXT record at ``name``, each one's strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
    answer = _resolve(resolver, name, "TXT")
    if answer is None:
        return []
    return [b"".join(rdata.strings) for rdata in answer]


class AuthDNS:
    """The ``dnsfunc`` for dkimpy and authheaders, asking one resolver.

    - dkimpy: ``dnsfunc(b"sel._domainkey.example.", timeout=5)`` -> the key record as bytes,
      or None;
    - authheaders: ``dnsfunc("_dmarc.example")`` -> the one ``v=DMARC1`` record as text, or
      None when there is none or more than one (RFC 7489 6.6.3: then there is no policy);
    - authheaders' ``np=`` check calls ``dnsfunc(domain)`` to learn whether the domain exists:
      answered from A, AAAA and MX, as RFC 9091 defines "non-existent".
    """

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.resolver = resolver

    def __repr__(self) -> str:
        return f"<AuthDNS {len(self.resolver.nameservers)} nameserver(s)>"

    def __call__(self, name: str | bytes, timeout: float | None = None) -> str | bytes | None:
        if isinstance(name, bytes):
            records = txt_records(self.resolver, name.decode("ascii", "replace"))
            return records[0] if records else None
        if name.lower().startswith("_dmarc."):
            policies = [
                record.decode("utf-8", "replace")
                for record in txt_records(self.resolver, name)
                if record.startswith(b"v=DMARC1")  # RFC 7489 6.4: exactly this
            ]
            return policies[0] if len(policies) == 1 else None
        for rdtype in ("A", "AAAA", "MX"):
            if _resolve(self.resolver, name, rdtype) is not None:
                return "exists"
        return None


# The resolver of the pyspf evaluation running in this context; None outside resolving().
_current: contextvars.ContextVar[dns.resolver.Resolver | None] = contextvars.ContextVar(
    "mailedge_spf_resolver", default=None
)
_install_lock = threading.Lock()
# What spf.DNSLookup was before ours: used outside resolving(), so other callers see no change.
_previous: Callable[..., Any] | None = None


def _pyspf_lookup(
    name: str, qtype: str, strict: object = True, timeout: float = DEFAULT_LIFETIME
) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's ``DNSLookup`` interface: ``[((name, qtype), value), ...]``; raises TempError.

    Values are shaped as pyspf's own dnspython driver shapes them: addresses as text, MX as
    ``(preference, exchange)``, PTR as a name without the final dot, TXT/SPF as the tuple of
    strings. ``timeout`` is what is left of pyspf's budget for the whole check.
    """
    resolver = _current.get()
    if resolver is None:
        assert _previous is not None
        result: list[tuple[tuple[str, str], Any]] = _previous(name, qtype, strict, timeout)
        return result
    try:
        answer = _resolve(resolver, name, qtype, lifetime=max(timeout, 0.001))
    except DNSTempError as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    if answer is None:
        return []
    results: list[tuple[tuple[str, str], Any]] = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            results.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            results.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            results.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            results.append(((name, qtype), rdata.strings))
    return results


def _install_pyspf_lookup() -> None:
    global _previous
    with _install_lock:
        if spf.DNSLookup is not _pyspf_lookup:
            _previous = spf.DNSLookup
            spf.DNSLookup = _pyspf_lookup


@contextlib.contextmanager
def resolving(resolver: dns.resolver.Resolver) -> Iterator[None]:
    """Within the block, pyspf (also when authheaders calls it) asks ``resolver``.

    Meant for the worker thread of one evaluation; it sets a context variable, so it affects
    nothing outside the current context.
    """
    _install_pyspf_lookup()
    token = _current.set(resolver)
    try:
        yield
    finally:
        _current.reset(token)


async def run_blocking(fn: Callable[[], T], *, limiter: trio.CapacityLimiter, deadline: float) -> T:
    """``fn()`` in a worker thread behind ``limiter``; raises ``trio.TooSlowError`` after
    ``deadline`` seconds, abandoning the thread (which ends at its next lookup)."""
    with trio.fail_after(deadline):
        return await trio.to_thread.run_sync(fn, limiter=limiter, abandon_on_cancel=True)
