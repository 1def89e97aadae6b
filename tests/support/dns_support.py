"""A small authoritative DNS server on 127.0.0.1 for the SPF, DMARC and resolver tests.

The hooks resolve through dnspython, so their tests need a real server on a real socket, not a
patched lookup function: :func:`serve_zone` starts a dnslib ``DNSServer`` on an ephemeral port
of 127.0.0.1, UDP and TCP on the same port number, answering from a :class:`Zone` built in the
test. It runs in dnslib's own threads (socketserver); the context manager stops and closes
both servers in ``finally``, so a failing test leaves no thread or socket behind.

A zone maps names to records, answers NXDOMAIN for names it does not hold and NODATA for types
a name lacks, and can make chosen names fail: ``servfail`` answers SERVFAIL (a broken
authoritative server: the resolver's temperror), ``silent`` never answers (a timeout). A test
that expects an answer uses :meth:`ZoneServer.settings` (bounds generous enough for a loaded
machine); one that expects a timeout asks a silent name with :meth:`ZoneServer.silent_settings`
(short bounds: no answer comes however long it waits).

DKIM keys are made in the test (:func:`dkim_key`, RSA 2048 with ``cryptography``) and exist
only in memory: no private key is ever written to disk or committed. :func:`standard_zone` is
the zone the SPF and DMARC tests share, :func:`message` and :func:`sign_message` the mail.

For the end-to-end tests, :func:`running_smtp` runs ``mailedge.server.serve`` in-process on
127.0.0.1 port 0 with two SMTP listeners, one trusting 127.0.0.0/8 to send PROXY headers and
one direct, and :func:`send_mail` drives a real ``smtplib`` client (in a worker thread, with
a socket timeout) that first sends a PROXY v2 header claiming the client's address.

Imported by name (``import dns_support``): pytest's ``pythonpath`` and mypy's ``mypy_path``
include ``tests/support``. There is deliberately no conftest.py.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import ipaddress
import logging
import smtplib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence

import attrs
import dkim
import dnslib
import dnslib.server
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailedge.context import AddressSource, ConnectionContext
from mailedge.hooks.dns import ResolverSettings
from mailedge.networks import TrustedNetworks
from mailedge.proxy import Command, InetAddress, encode_v2
from mailedge.server import Handler, Server, serve
from mailedge.settings import (
    BindAddress,
    ListenerProtocol,
    NetworkListener,
    Settings,
    SystemSettings,
)

__all__ = [
    "CLIENT_TIMEOUT",
    "DIRECT_LISTENER",
    "FORBIDDEN_IP",
    "PERMITTED_IP",
    "PROXY_IP",
    "PROXY_LISTENER",
    "DKIMKey",
    "Query",
    "Zone",
    "ZoneServer",
    "deliver",
    "make_context",
    "connect",
    "dkim_key",
    "message",
    "proxy_header",
    "running_smtp",
    "send_mail",
    "serve_zone",
    "sign_message",
    "standard_zone",
]

log = logging.getLogger("tests.dns_support")

# How many ephemeral UDP ports to try before giving up on finding one whose TCP twin is free.
PORT_ATTEMPTS = 20
# A stuck server thread must not hang the test run; stopping one takes milliseconds.
STOP_TIMEOUT = 5.0
# How often a server thread looks for the stop request: socketserver's 0.5 s default would
# add a second to every test's teardown.
POLL_INTERVAL = 0.02
# RFC 1035 3.3.14: one character-string of a TXT record holds at most 255 octets.
TXT_CHUNK = 255
# RFC 1035 4.2.1: a UDP answer over 512 octets is truncated (TC set), and the resolver asks
# again over TCP; a record that long exercises the TCP half of the server.
UDP_LIMIT = 512
# The resolver bounds of a test that expects an answer. The server is local and answers in
# milliseconds, but in dnslib's threads: on a loaded machine (a full test run beside other
# work) a thread can wait its turn for over a second, and a 1 s timeout once failed a test
# that way. Generous, then, and well inside the 120 s test timeout; a hung server still
# fails the test.
TEST_TIMEOUT = 10.0
TEST_LIFETIME = 20.0
# The bounds of a test that expects a timeout: it asks a ``silent`` name (no answer ever
# comes, however loaded the machine), so short bounds cannot flake, and keep the test quick
# rather than waiting out the 5 s/10 s production bounds.
SILENT_TIMEOUT = 0.2
SILENT_LIFETIME = 0.5


def _key(name: str) -> str:
    return name.lower().rstrip(".")


def _records(
    records: Mapping[str, Mapping[str, Sequence[str]]],
) -> dict[str, dict[str, Sequence[str]]]:
    return {_key(name): dict(types) for name, types in records.items()}


def _names(names: Iterable[str]) -> frozenset[str]:
    return frozenset(map(_key, names))


@attrs.frozen
class Zone:
    """Records by name and type; names are case-insensitive, without the trailing dot.

    ``records`` maps a name to ``{type: [values]}``: TXT values are text (split into
    255-octet strings on the wire), A and AAAA addresses, MX ``"10 mx.example.test"``.
    """

    records: Mapping[str, Mapping[str, Sequence[str]]] = attrs.field(
        factory=dict, converter=_records
    )
    servfail: frozenset[str] = attrs.field(factory=frozenset, converter=_names)
    silent: frozenset[str] = attrs.field(factory=frozenset, converter=_names)
    # Seconds every answer waits before it is sent: what a loaded machine can do to the
    # server's threads (for the test that the bounds of TEST_TIMEOUT allow for it).
    delay: float = 0.0

    def with_records(self, name: str, rtype: str, *values: str) -> Zone:
        """A copy with ``values`` as the ``rtype`` records of ``name`` (replacing any)."""
        records = {n: dict(v) for n, v in self.records.items()}
        records.setdefault(_key(name), {})[rtype.upper()] = list(values)
        return attrs.evolve(self, records=records)


def _rdata(rtype: str, value: str) -> dnslib.RD:
    if rtype == "TXT":
        data = value.encode()
        return dnslib.TXT(
            [data[i : i + TXT_CHUNK] for i in range(0, len(data), TXT_CHUNK)] or [b""]
        )
    if rtype == "A":
        return dnslib.A(value)
    if rtype == "AAAA":
        return dnslib.AAAA(value)
    if rtype == "MX":
        preference, _, exchange = value.partition(" ")
        return dnslib.MX(exchange, int(preference))
    raise ValueError(f"unsupported record type {rtype}")


@attrs.frozen
class Query:
    """One question the server was asked, and over which transport."""

    name: str
    rtype: str
    protocol: str


class _ZoneResolver(dnslib.server.BaseResolver):  # type: ignore[misc]
    """Answers from a Zone; called from dnslib's handler threads."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.lock = threading.Lock()
        self.queries: list[Query] = []

    def resolve(
        self, request: dnslib.DNSRecord, handler: dnslib.server.DNSHandler
    ) -> dnslib.DNSRecord:
        name = _key(str(request.q.qname))
        rtype = dnslib.QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append(Query(name, rtype, handler.protocol))
        reply = request.reply()
        if name in self.zone.servfail:
            reply.header.rcode = dnslib.RCODE.SERVFAIL
            return reply
        types = self.zone.records.get(name)
        if types is None:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
            return reply
        for value in types.get(rtype, ()):
            reply.add_answer(
                dnslib.RR(
                    request.q.qname,
                    getattr(dnslib.QTYPE, rtype),
                    rdata=_rdata(rtype, value),
                    ttl=60,
                )
            )
        return reply


class _Handler(dnslib.server.DNSHandler):  # type: ignore[misc]
    """dnslib's handler, except that a ``silent`` name gets no answer at all, and a truncated
    answer keeps its question (dnslib's own drops it, and resolvers discard such a reply)."""

    def handle(self) -> None:
        delay = self.server.resolver.zone.delay
        if delay:
            time.sleep(delay)  # in the server's thread: a stand-in for a loaded machine
        if self.server.socket_type == socket.SOCK_DGRAM:
            with contextlib.suppress(Exception):
                request = dnslib.DNSRecord.parse(self.request[0])
                if _key(str(request.q.qname)) in self.server.resolver.zone.silent:
                    return
        super().handle()

    def get_reply(self, data: bytes) -> bytes:
        request = dnslib.DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        packed: bytes = reply.pack()
        if self.protocol == "udp" and len(packed) > UDP_LIMIT:
            truncated = request.reply()
            truncated.header.tc = 1
            packed = truncated.pack()
        return packed


def _quiet_logger() -> dnslib.server.DNSLogger:
    # dnslib prints every request by default; keep only errors, at debug level.
    return dnslib.server.DNSLogger("-request,-reply,-truncated", prefix=False, logf=log.debug)


@attrs.define(repr=False)
class ZoneServer:
    """A running :func:`serve_zone` server: where it listens and what it was asked."""

    host: str
    port: int
    _resolver: _ZoneResolver

    def __repr__(self) -> str:
        return f"<ZoneServer {self.host}:{self.port} queries={len(self.queries)}>"

    @property
    def queries(self) -> list[Query]:
        """Every question asked so far, in order, over UDP and TCP."""
        with self._resolver.lock:
            return list(self._resolver.queries)

    def asked(self, name: str, rtype: str = "TXT") -> bool:
        """True when ``name`` was asked for ``rtype`` records."""
        return any(q.name == _key(name) and q.rtype == rtype for q in self.queries)

    @property
    def zone(self) -> Zone:
        return self._resolver.zone

    @zone.setter
    def zone(self, zone: Zone) -> None:
        self._resolver.zone = zone

    def settings(
        self, *, timeout: float = TEST_TIMEOUT, lifetime: float = TEST_LIFETIME
    ) -> ResolverSettings:
        """Resolver settings that ask this server only, with bounds for a test that expects
        an answer (``silent_settings`` for one that expects a timeout)."""
        return ResolverSettings(
            nameservers=((self.host, self.port),), timeout=timeout, lifetime=lifetime
        )

    def silent_settings(self) -> ResolverSettings:
        """Settings that give up on a ``silent`` name quickly: for a test expecting a timeout."""
        return self.settings(timeout=SILENT_TIMEOUT, lifetime=SILENT_LIFETIME)


def _start(resolver: _ZoneResolver, host: str) -> tuple[dnslib.server.DNSServer, ...]:
    for _ in range(PORT_ATTEMPTS):
        udp = dnslib.server.DNSServer(
            resolver, address=host, port=0, logger=_quiet_logger(), handler=_Handler
        )
        port = udp.server.server_address[1]
        try:
            tcp = dnslib.server.DNSServer(
                resolver,
                address=host,
                port=port,
                tcp=True,
                logger=_quiet_logger(),
                handler=_Handler,
            )
        except OSError as exc:
            udp.server.server_close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return udp, tcp
    raise RuntimeError(f"no port free for both UDP and TCP after {PORT_ATTEMPTS} attempts")


@contextlib.contextmanager
def serve_zone(zone: Zone, host: str = "127.0.0.1") -> Iterator[ZoneServer]:
    """Serve ``zone`` on an ephemeral UDP+TCP port of ``host`` until the block ends."""
    resolver = _ZoneResolver(zone)
    servers = _start(resolver, host)
    threads: list[tuple[dnslib.server.DNSServer, threading.Thread]] = []
    try:
        for server in servers:
            thread = threading.Thread(
                target=server.server.serve_forever,
                kwargs={"poll_interval": POLL_INTERVAL},
                name=f"dns_support {server.server.socket_type.name}",
                daemon=True,
            )
            thread.start()
            threads.append((server, thread))
        yield ZoneServer(host, servers[0].server.server_address[1], resolver)
    finally:
        for server, thread in threads:
            server.server.shutdown()
            thread.join(STOP_TIMEOUT)
        for server in servers:
            server.server.server_close()


@attrs.frozen(repr=False)
class DKIMKey:
    """An RSA key pair for DKIM: the PEM private key and the key record's text."""

    private_pem: bytes
    record: str

    def __repr__(self) -> str:
        return "<DKIMKey rsa-2048>"


@functools.cache
def dkim_key() -> DKIMKey:
    """A fresh RSA 2048 key, made once per test run and kept only in memory."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DKIMKey(pem, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}")


# The headers a signature covers in these tests: enough for DMARC's alignment (From) to hold.
SIGNED_HEADERS = (b"from", b"to", b"subject", b"date", b"message-id")


def sign_message(message: bytes, *, domain: str, selector: str = "sel", key: DKIMKey) -> bytes:
    """``message`` (CRLF line endings) with a DKIM-Signature for ``domain`` prepended."""
    signature: bytes = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        key.private_pem,
        include_headers=list(SIGNED_HEADERS),
    )
    return signature + message


# -- the test zone -----------------------------------------------------------------------------

# The client a trusted proxy claims, which example.test's SPF record permits, and one it does
# not permit; the proxy itself is 127.0.0.1, which no record permits.
PERMITTED_IP = "198.51.100.7"
FORBIDDEN_IP = "203.0.113.9"


def standard_zone(key: DKIMKey) -> Zone:
    """The zone the SPF and DMARC tests share.

    - ``example.test``: SPF permits only 198.51.100.7 (``-all``); DMARC ``p=reject``; DKIM
      key ``sel._domainkey``; ``mail.example.test`` has the same SPF (for HELO checks).
    - ``quarantine.test``: the same SPF, DMARC ``p=quarantine``; ``monitor.test``: ``p=none``;
      ``malformed.test``: a DMARC record with a tag that has no value (permerror).
    - ``soft.test`` ``~all``, ``neutral.test`` ``?all``, ``bad.test`` a syntax error
      (permerror), ``nospf.test`` an A record but no SPF, ``v6.test`` an ip6 mechanism.
    - ``broken.test`` and ``_dmarc.broken.test`` answer SERVFAIL; ``slow.test`` never answers.

    Organizational domains (DMARC's relaxed alignment, ``sp=``, ``np=``) come from the public
    suffix list, which does not know ``.test`` (it would make all of ``.test`` one
    organization), so those tests use RFC 2606's example.org, .net and .com:

    - ``example.org``: the same SPF, ``p=reject; sp=quarantine``, keys for ``example.org``
      and ``mail.example.org``;
    - ``example.net``: ``p=reject; sp=none``;
    - ``example.com``: ``p=none; sp=none; np=reject``, and ``real.example.com`` exists.
    """
    spf = "v=spf1 ip4:198.51.100.7 -all"
    return Zone(
        {
            "example.test": {"TXT": [spf]},
            "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]},
            "sel._domainkey.example.test": {"TXT": [key.record]},
            "mail.example.test": {"TXT": [spf], "A": [PERMITTED_IP]},
            "quarantine.test": {"TXT": [spf]},
            "_dmarc.quarantine.test": {"TXT": ["v=DMARC1; p=quarantine"]},
            "monitor.test": {"TXT": [spf]},
            "_dmarc.monitor.test": {"TXT": ["v=DMARC1; p=none"]},
            "malformed.test": {"TXT": [spf]},
            "_dmarc.malformed.test": {"TXT": ["v=DMARC1; p=reject; bogus"]},
            "soft.test": {"TXT": ["v=spf1 ip4:198.51.100.7 ~all"]},
            "neutral.test": {"TXT": ["v=spf1 ?all"]},
            "bad.test": {"TXT": ["v=spf1 ip4:198.51.100.7 frobnicate -all"]},
            "nospf.test": {"A": ["192.0.2.1"]},
            "v6.test": {"TXT": ["v=spf1 ip6:2001:db8::7 -all"]},
            "example.org": {"TXT": [spf]},
            "_dmarc.example.org": {"TXT": ["v=DMARC1; p=reject; sp=quarantine"]},
            "sel._domainkey.example.org": {"TXT": [key.record]},
            "sel._domainkey.mail.example.org": {"TXT": [key.record]},
            "example.net": {"TXT": [spf]},
            "_dmarc.example.net": {"TXT": ["v=DMARC1; p=reject; sp=none"]},
            "_dmarc.example.com": {"TXT": ["v=DMARC1; p=none; sp=none; np=reject"]},
            "real.example.com": {"A": ["192.0.2.80"]},
        },
        servfail=["broken.test", "_dmarc.broken.test"],
        silent=["slow.test"],
    )


def message(
    sender: str = "alice@example.test", subject: str = "hello", body: str = "Hi Bob.\r\n"
) -> bytes:
    """A small RFC 5322 message with CRLF line endings, as a client sends it."""
    headers = [
        f"From: Alice <{sender}>",
        "To: Bob <bob@example.net>",
        f"Subject: {subject}",
        "Date: Mon, 01 Jan 2024 12:00:00 +0000",
        f"Message-ID: <{subject.replace(' ', '.')}@{sender.rpartition('@')[2]}>",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


# The trusted proxy's address, which stands in for the client when there is none.
PROXY_IP = "127.0.0.1"


def make_context(
    client_ip: str = PERMITTED_IP, *, source: AddressSource = AddressSource.HEADER
) -> ConnectionContext:
    """A connection a trusted proxy at 127.0.0.1 forwarded for ``client_ip``. With a LOCAL or
    UNKNOWN ``source`` the client is not known and ``client_ip`` is the proxy's, as the gate
    leaves it."""
    known = source in (AddressSource.HEADER, AddressSource.SOCKET)
    return ConnectionContext(
        connection_id=25,
        listener=PROXY_LISTENER,
        protocol=ListenerProtocol.SMTP,
        client_ip=ipaddress.ip_address(client_ip if known else PROXY_IP),
        client_port=40000,
        server_ip=SERVER_ADDRESS.ip,
        server_port=SERVER_ADDRESS.port,
        peer_ip=ipaddress.ip_address(PROXY_IP),
        peer_port=51000,
        local_ip=ipaddress.ip_address("127.0.0.1"),
        local_port=2525,
        proxied=source is not AddressSource.SOCKET,
        address_source=source,
    )


# -- SMTP through the PROXY path ----------------------------------------------------------------

# The listener names in :func:`running_smtp`: one trusting 127.0.0.0/8 to send PROXY headers,
# one direct (no proxy trusted, the socket peer is the client).
PROXY_LISTENER = "smtp-proxy"
DIRECT_LISTENER = "smtp"
# Every blocking client call has this bound, so a hung server fails a test instead of hanging.
CLIENT_TIMEOUT = 10.0
# The server address a proxy would name in its header (where the client connected).
SERVER_ADDRESS = InetAddress(ipaddress.ip_address("192.0.2.25"), 25)


def proxy_header(client_ip: str, client_port: int = 40000) -> bytes:
    """A PROXY v2 header in which the proxy says the client is ``client_ip``."""
    return encode_v2(
        Command.PROXY,
        InetAddress(ipaddress.ip_address(client_ip), client_port),
        SERVER_ADDRESS,
    )


@contextlib.asynccontextmanager
async def running_smtp(handler: Handler) -> AsyncIterator[dict[str, tuple[str, int]]]:
    """``mailedge.server.serve`` on 127.0.0.1 port 0 with ``handler`` for SMTP, until the
    block ends; yields each listener's bound address by name (PROXY_/DIRECT_LISTENER)."""
    settings = Settings(
        system=SystemSettings(proxy_trusted_networks=TrustedNetworks(["127.0.0.0/8"])),
        listeners=(
            NetworkListener(
                name=PROXY_LISTENER,
                protocol=ListenerProtocol.SMTP,
                bind=(BindAddress.parse("127.0.0.1:0"),),
            ),
            NetworkListener(
                name=DIRECT_LISTENER,
                protocol=ListenerProtocol.SMTP,
                bind=(BindAddress.parse("127.0.0.1:0"),),
                override_proxy_trusted_networks=TrustedNetworks([]),
            ),
        ),
    )
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            functools.partial(serve, settings, {ListenerProtocol.SMTP: handler})
        )
        yield {name: endpoints[0] for name, endpoints in server.addresses.items()}
        nursery.cancel_scope.cancel()


def connect(address: tuple[str, int], header: bytes | None, helo: str) -> smtplib.SMTP:
    """An smtplib client on a socket that first carries ``header``, as a proxy in front of
    mailedge would send it (None: a direct connection); the banner is read and checked."""
    client = smtplib.SMTP(local_hostname=helo, timeout=CLIENT_TIMEOUT)
    sock = socket.create_connection(address, timeout=CLIENT_TIMEOUT)
    try:
        if header is not None:
            sock.sendall(header)
        client.sock = sock
        code, banner = client.getreply()
    except BaseException:
        client.close()
        sock.close()
        raise
    if code != 220:
        client.close()
        raise smtplib.SMTPConnectError(code, banner)
    return client


def send_mail(
    address: tuple[str, int],
    data: bytes,
    *,
    mail_from: str,
    client_ip: str | None,
    helo: str = "client.example",
    rcpt: str = "bob@example.net",
) -> None:
    """One message through smtplib (blocking: run it in a thread). ``client_ip`` is the
    client the PROXY header claims; None connects directly. Refusals raise smtplib's errors."""
    header = None if client_ip is None else proxy_header(client_ip)
    with connect(address, header, helo) as client:
        client.sendmail(mail_from, [rcpt], data)


async def deliver(
    address: tuple[str, int],
    data: bytes,
    *,
    mail_from: str,
    client_ip: str | None,
    helo: str = "client.example",
) -> None:
    """:func:`send_mail` in a worker thread, from the test's trio task."""
    await trio.to_thread.run_sync(
        functools.partial(
            send_mail, address, data, mail_from=mail_from, client_ip=client_ip, helo=helo
        )
    )
