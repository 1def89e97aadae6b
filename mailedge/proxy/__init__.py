"""The PROXY protocol codec (v1 and v2), sans-IO: no trio, no sockets."""

from __future__ import annotations

from mailedge.proxy.encoder import encode_v1, encode_v2
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
    IPAddress,
    ProxyHeader,
    SSLInfo,
    SSLSubType,
    TLVType,
    Transport,
    UnixAddress,
)
from mailedge.proxy.parser import parse_header
from mailedge.proxy.sniff import Sniff, sniff
from mailedge.proxy.v1 import V1_MAX_LENGTH
from mailedge.proxy.v2 import DEFAULT_MAX_V2_LENGTH, V2_SIGNATURE

__all__ = [
    # parsing
    "parse_header",
    "Sniff",
    "sniff",
    "DEFAULT_MAX_V2_LENGTH",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    # encoding
    "encode_v1",
    "encode_v2",
    # values
    "TLV",
    "Address",
    "ClientFlags",
    "Command",
    "Family",
    "InetAddress",
    "IPAddress",
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
