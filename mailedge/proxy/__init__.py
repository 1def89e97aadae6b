"""The PROXY protocol codec (v1 and v2), sans-IO: no trio, no sockets."""

from __future__ import annotations

from mailedge.proxy.errors import (
    AddressBlockTooShortError,
    ChecksumError,
    DisallowedFamilyError,
    HeaderTooLongError,
    IncompleteHeaderError,
    InvalidAddressError,
    InvalidCommandError,
    InvalidFamilyError,
    InvalidPortError,
    InvalidTLVError,
    InvalidVersionError,
    NotProxyHeaderError,
    ProxyProtocolError,
    SSLTLVError,
    V1SyntaxError,
)
from mailedge.proxy.header import (
    TLV,
    Address,
    ClientFlags,
    Command,
    Family,
    InetAddress,
    ProxyHeader,
    SSLInfo,
    SSLSubType,
    TLVType,
    Transport,
    UnixAddress,
)

__all__ = [
    # values
    "TLV",
    "Address",
    "ClientFlags",
    "Command",
    "Family",
    "InetAddress",
    "ProxyHeader",
    "SSLInfo",
    "SSLSubType",
    "TLVType",
    "Transport",
    "UnixAddress",
    # errors
    "AddressBlockTooShortError",
    "ChecksumError",
    "DisallowedFamilyError",
    "HeaderTooLongError",
    "IncompleteHeaderError",
    "InvalidAddressError",
    "InvalidCommandError",
    "InvalidFamilyError",
    "InvalidPortError",
    "InvalidTLVError",
    "InvalidVersionError",
    "NotProxyHeaderError",
    "ProxyProtocolError",
    "SSLTLVError",
    "V1SyntaxError",
]
