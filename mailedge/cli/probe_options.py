"""What ``mailedge probe`` sends: its options, its target and its addresses, and the header.

:class:`ProbeOptions` says what to send and where; :func:`parse_target` and
:func:`parse_inet_address` read the addresses a person types; :func:`build_header` writes the
header the options ask for. :mod:`mailedge.cli.probe` sends it and records the reply.
"""

from __future__ import annotations

import enum
import ipaddress
import math

import attrs

from mailedge.names import is_hostname
from mailedge.networks import (
    EndpointProblem,
    EndpointSyntaxError,
    HostPort,
    format_endpoint,
    normalize_ip,
    split_host_port,
)
from mailedge.proxy import (
    TLV,
    ClientFlags,
    Command,
    Family,
    InetAddress,
    IPAddress,
    SSLInfo,
    TLVType,
    encode_v1,
    encode_v2,
)
from mailedge.settings import ListenerProtocol

__all__ = [
    "DEFAULT_CLIENT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TLS_VERSION",
    "HeaderMode",
    "ProbeOptions",
    "ProbeUsageError",
    "Target",
    "build_header",
    "parse_inet_address",
    "parse_target",
]

# A documentation address (RFC 5737, TEST-NET-3): never a real client, so easy to spot.
DEFAULT_CLIENT = InetAddress(ipaddress.IPv4Address("203.0.113.7"), 40000)
DEFAULT_TIMEOUT = 10.0
DEFAULT_TLS_VERSION = "TLSv1.3"
# The spec's bound on PP2_TYPE_UNIQUE_ID; a mailedge listener rejects longer ones.
_UNIQUE_ID_MAX = 128


class ProbeUsageError(ValueError):
    """Options that cannot make a probe (exit status 2). The message says which and why."""


class HeaderMode(enum.StrEnum):
    """What the probe sends before speaking the protocol."""

    V1 = "v1"
    V2 = "v2"
    # A v2 LOCAL header, as HAProxy's health checks send: no client address.
    LOCAL = "local"
    # No header at all: a direct client.
    NONE = "none"

    @property
    def claims_client(self) -> bool:
        """True when the header names a client (v1 and v2 PROXY)."""
        return self in (HeaderMode.V1, HeaderMode.V2)


def _split_host_port(text: str, what: str, *, allow_zero: bool) -> HostPort:
    """``HOST:PORT`` or ``[IPv6]:PORT`` split, each problem in the probe's own words."""
    example = "such as 127.0.0.1:25 or [::1]:25"
    low = 0 if allow_zero else 1
    try:
        split = split_host_port(text)
    except EndpointSyntaxError as error:
        message = {
            EndpointProblem.MALFORMED: f"{text!r} is not an address and port {example}",
            EndpointProblem.NO_PORT: f"{text!r} has no port; write it {example}",
            EndpointProblem.NEEDS_BRACKETS: f"{text!r}: put an IPv6 address in brackets, {example}",
            EndpointProblem.BAD_PORT: (
                f"{text!r} has an invalid port {error.port_text!r} ({low} to 65535)"
            ),
        }[error.problem]
        raise ProbeUsageError(f"{what} {message}") from None
    if split.port < low:
        raise ProbeUsageError(
            f"{what} {text!r} has an invalid port {str(split.port)!r} ({low} to 65535)"
        )
    return split


@attrs.frozen
class Target:
    """Where the probe connects: an IP address or a host name, and a port."""

    host: str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        """The host as an address, when it is one (not a name)."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def header_address(self) -> InetAddress | None:
        """The target as a header's server address; None for a host name.

        A header cannot carry a zone id (``fe80::1%eth0``), so the address goes without it.
        """
        ip = self.ip
        if ip is None:
            return None
        return InetAddress(normalize_ip(ipaddress.ip_address(str(ip).partition("%")[0])), self.port)

    def __str__(self) -> str:
        return format_endpoint(self.host, self.port)


def parse_target(text: str) -> Target:
    """``127.0.0.1:3525``, ``[::1]:3525`` or ``mx.example:25``; raises ProbeUsageError."""
    split = _split_host_port(text, "HOST:PORT", allow_zero=False)
    host = split.host
    if split.bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ProbeUsageError(f"HOST:PORT {text!r}: {host!r} is not an IPv6 address") from None
    elif not is_hostname(host):
        raise ProbeUsageError(f"HOST:PORT {text!r}: {host!r} is neither an address nor a name")
    return Target(host, split.port)


def parse_inet_address(text: str, what: str = "address") -> InetAddress:
    """An ``IP:PORT`` or ``[IPv6]:PORT`` for a header; raises ProbeUsageError."""
    split = _split_host_port(text, what, allow_zero=True)
    host = split.host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ProbeUsageError(f"{what} {text!r}: {host!r} is not an IP address") from None
    if split.bracketed != (ip.version == 6):
        raise ProbeUsageError(f"{what} {text!r}: only IPv6 addresses go in brackets")
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ProbeUsageError(f"{what} {text!r}: a PROXY header cannot carry a zone id")
    return InetAddress(ip, split.port)


def _check_timeout(_instance: object, _attribute: object, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ProbeUsageError(f"--timeout must be a number of seconds above 0, got {value!r}")


@attrs.frozen
class ProbeOptions:
    """One probe: the listener, the header to send and what it carries.

    ``client`` and ``server`` are the header's addresses: None means the default client
    (:data:`DEFAULT_CLIENT`) and the address the probe actually connected to. The TLV
    options need a v2 header (``V2`` or ``LOCAL``); the SSL details need ``ssl``.
    Inconsistent options raise :class:`ProbeUsageError`.
    """

    protocol: ListenerProtocol
    target: Target
    mode: HeaderMode = HeaderMode.V2
    client: InetAddress | None = None
    server: InetAddress | None = None
    # The SSL TLV: the client reached the proxy over TLS (CLIENT_SSL, verify 0).
    ssl: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    cn: str | None = None
    # Sets CERT_CONN: the client presented a certificate, which (verify 0) was verified.
    cert_verified: bool = False
    authority: str | None = None
    alpn: str | None = None
    unique_id: str | None = None
    crc32c: bool = False
    timeout: float = attrs.field(default=DEFAULT_TIMEOUT, validator=_check_timeout)
    # The local address to connect from (None: the system's choice), to probe as a proxy
    # the listener trusts.
    source: IPAddress | None = None

    def __attrs_post_init__(self) -> None:
        if not self.mode.claims_client:
            pairs = (("--client", self.client), ("--server", self.server))
            given = [option for option, value in pairs if value is not None]
            if given:
                sent = (
                    "a LOCAL header carries"
                    if self.mode is HeaderMode.LOCAL
                    else "without a header the probe sends"
                )
                raise ProbeUsageError(f"{' and '.join(given)}: {sent} no addresses")
        v2_only = [
            option
            for option, value in (
                ("--ssl", self.ssl),
                ("--authority", self.authority is not None),
                ("--alpn", self.alpn is not None),
                ("--unique-id", self.unique_id is not None),
                ("--crc32c", self.crc32c),
            )
            if value
        ]
        if v2_only and self.mode in (HeaderMode.V1, HeaderMode.NONE):
            sent = "a v1 header has no TLVs" if self.mode is HeaderMode.V1 else "no header is sent"
            raise ProbeUsageError(f"{', '.join(v2_only)}: {sent}; use --v2 or --local")
        ssl_only = [
            option
            for option, value in (
                ("--tls-version", self.tls_version is not None),
                ("--cipher", self.cipher is not None),
                ("--cn", self.cn is not None),
                ("--cert-verified", self.cert_verified),
            )
            if value
        ]
        if ssl_only and not self.ssl:
            raise ProbeUsageError(f"{', '.join(ssl_only)}: these describe the SSL TLV; add --ssl")
        if self.unique_id is not None and len(self.unique_id.encode()) > _UNIQUE_ID_MAX:
            raise ProbeUsageError(
                f"--unique-id is {len(self.unique_id.encode())} bytes; the spec allows "
                f"{_UNIQUE_ID_MAX} and a listener rejects more"
            )
        if self.alpn is not None and not self.alpn.isascii():
            raise ProbeUsageError(f"--alpn {self.alpn!r}: a protocol id is ASCII, such as h2")

    @property
    def claimed_client(self) -> InetAddress | None:
        """The client the header names; None for LOCAL and no header."""
        if not self.mode.claims_client:
            return None
        return DEFAULT_CLIENT if self.client is None else self.client


def build_header(options: ProbeOptions, server: InetAddress) -> bytes:
    """The header the probe sends (``b""`` for none); ``server`` is the default destination.

    Addresses of different families are written as HAProxy writes them: IPv6, with the
    IPv4 one v4-mapped (``::ffff:203.0.113.7``); a receiver turns it back into IPv4.
    Raises ProbeUsageError when the values do not fit in a header.
    """
    try:
        return _build_header(options, server)
    except ValueError as error:
        raise ProbeUsageError(f"the header cannot be built: {error}") from None


def _build_header(options: ProbeOptions, server: InetAddress) -> bytes:
    if options.mode is HeaderMode.NONE:
        return b""
    client = options.claimed_client
    destination = options.server or server
    if options.mode is HeaderMode.V1:
        assert client is not None
        if client.ip.version != destination.ip.version:
            # HAProxy's form for a mixed pair: TCP6, the IPv4 one written ::ffff:a.b.c.d.
            return encode_v1(client, destination, family=Family.INET6)
        return encode_v1(client, destination)
    tlvs: list[TLV] = []
    if options.alpn is not None:
        tlvs.append(TLV(TLVType.ALPN, options.alpn.encode("ascii")))
    if options.authority is not None:
        tlvs.append(TLV(TLVType.AUTHORITY, options.authority.encode()))
    if options.unique_id is not None:
        tlvs.append(TLV(TLVType.UNIQUE_ID, options.unique_id.encode()))
    ssl = None
    if options.ssl:
        flags = ClientFlags.SSL | (ClientFlags.CERT_CONN if options.cert_verified else 0)
        ssl = SSLInfo(
            client=ClientFlags(flags),
            verify=0,
            version=options.tls_version or DEFAULT_TLS_VERSION,
            cn=options.cn,
            cipher=options.cipher,
        )
    if options.mode is HeaderMode.LOCAL:
        return encode_v2(Command.LOCAL, tlvs=tlvs, ssl=ssl, crc32c=options.crc32c)
    assert client is not None
    mixed = client.ip.version != destination.ip.version
    return encode_v2(
        Command.PROXY,
        client,
        destination,
        tlvs=tlvs,
        ssl=ssl,
        crc32c=options.crc32c,
        family=Family.INET6 if mixed else None,
    )


# --- the result --------------------------------------------------------------------------
