"""The values the codec produces and consumes: enums, addresses, TLVs and SSL details.

All are immutable ``attrs`` values or enums, and none of them reads the wire format: the
header (:mod:`mailedge.proxy.header`) reads them from its bytes, and the encoders write
them.
"""

from __future__ import annotations

import enum
import ipaddress

import attrs

__all__ = [
    # the header's kind
    "Command",
    "Family",
    "Transport",
    # addresses
    "Address",
    "IPAddress",
    "InetAddress",
    "UnixAddress",
    # TLVs and SSL details
    "TLV",
    "TLVType",
    "SSLInfo",
    "SSLSubType",
    "ClientFlags",
]

# An IPv4 or IPv6 address: the one spelling of this alias, for the whole package.
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Command(enum.IntEnum):
    """The v2 command nibble; a v1 header is always PROXY."""

    LOCAL = 0x0
    PROXY = 0x1


class Family(enum.IntEnum):
    """The v2 address family (high nibble of byte 13). v1 TCP4/TCP6/UNKNOWN map to these."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    """The v2 transport protocol (low nibble of byte 13)."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


class TLVType(enum.IntEnum):
    """The TLV types the spec names. Others (custom 0xE0-0xEF and so on) are kept raw."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


class SSLSubType(enum.IntEnum):
    """The sub-TLVs carried inside a PP2_TYPE_SSL value."""

    VERSION = 0x21
    CN = 0x22
    CIPHER = 0x23
    SIG_ALG = 0x24
    KEY_ALG = 0x25
    GROUP = 0x26
    SIG_SCHEME = 0x27
    CLIENT_CERT = 0x28


class ClientFlags(enum.IntFlag):
    """The ``client`` byte of the SSL TLV."""

    SSL = 0x01
    CERT_CONN = 0x02
    CERT_SESS = 0x04


@attrs.frozen(repr=False)
class InetAddress:
    """An IPv4 or IPv6 endpoint. v4-mapped IPv6 is normalised to IPv4 by the parser."""

    ip: IPAddress
    port: int

    def __repr__(self) -> str:
        if self.ip.version == 6:
            return f"InetAddress([{self.ip}]:{self.port})"
        return f"InetAddress({self.ip}:{self.port})"


@attrs.frozen
class UnixAddress:
    """An AF_UNIX endpoint: the path with its NUL padding removed."""

    path: bytes


Address = InetAddress | UnixAddress


@attrs.frozen
class TLV:
    """One type-length-value entry, raw, as it appeared on the wire."""

    type: int
    value: bytes


@attrs.frozen
class SSLInfo:
    """The decoded PP2_TYPE_SSL TLV: what the proxy knows of the client's TLS session."""

    client: ClientFlags
    # 0 means the client certificate verified; only meaningful when a CERT bit is set.
    verify: int
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    group: str | None = None
    sig_scheme: str | None = None
    client_cert: bytes | None = attrs.field(default=None, repr=False)
    # Every sub-TLV raw, in wire order, including ones this version does not decode.
    tlvs: tuple[TLV, ...] = attrs.field(default=(), repr=False)

    @property
    def client_ssl(self) -> bool:
        """True when the client reached the proxy over TLS (the CLIENT_SSL bit)."""
        return bool(self.client & ClientFlags.SSL)

    @property
    def cert_presented(self) -> bool:
        """True when the client presented a certificate, on this connection or session."""
        return bool(self.client & (ClientFlags.CERT_CONN | ClientFlags.CERT_SESS))

    @property
    def verified(self) -> bool:
        """True only when a certificate was presented *and* the proxy verified it.

        HAProxy sends verify 0 when no certificate was presented, so verify alone says nothing.
        """
        return self.cert_presented and self.verify == 0
