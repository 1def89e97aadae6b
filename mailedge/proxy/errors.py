"""The codec's error hierarchy.

Everything the parser rejects raises a subclass of :class:`ProxyProtocolError`; nothing
else (no ``struct.error``, ``IndexError``, ``ValueError`` or ``UnicodeError``) escapes it.
Each class carries a stable, machine-readable ``reason`` for events and metrics; each
instance carries a human message that names the offending field.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
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


class ProxyProtocolError(Exception):
    """The bytes cannot be, or cannot become, a valid PROXY protocol header."""

    reason: ClassVar[str] = "invalid_header"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, {self.message!r})"


class NotProxyHeaderError(ProxyProtocolError):
    """The first bytes match neither the v1 nor the v2 signature."""

    reason = "not_proxy_header"


class IncompleteHeaderError(ProxyProtocolError):
    """The stream ended (EOF or half-close) before the header was complete.

    The sans-IO parser never raises this itself, since it cannot know that no more bytes
    will come; the I/O layer raises it when the peer closes mid-header.
    """

    reason = "truncated"


class HeaderTooLongError(ProxyProtocolError):
    """A v1 line with no CRLF within 107 bytes, or a v2 length over the configured cap."""

    reason = "too_long"


class V1SyntaxError(ProxyProtocolError):
    """A v1 line that breaks the grammar: spacing, case, line ending or protocol token."""

    reason = "v1_syntax"


class InvalidAddressError(ProxyProtocolError):
    """An address that is not valid for the announced family."""

    reason = "bad_address"


class InvalidPortError(ProxyProtocolError):
    """A port that is not a plain decimal 0-65535 without leading zeros."""

    reason = "bad_port"


class InvalidVersionError(ProxyProtocolError):
    """A v2 version nibble other than 2."""

    reason = "bad_version"


class InvalidCommandError(ProxyProtocolError):
    """A v2 command nibble other than LOCAL (0) or PROXY (1)."""

    reason = "bad_command"


class InvalidFamilyError(ProxyProtocolError):
    """A v2 family/transport byte outside the seven values the spec defines."""

    reason = "bad_family"


class DisallowedFamilyError(ProxyProtocolError):
    """A valid family that this receiver's policy refuses (AF_UNIX, DGRAM, mixed v1)."""

    reason = "family_not_allowed"


class AddressBlockTooShortError(ProxyProtocolError):
    """A v2 length shorter than the address block its family requires."""

    reason = "short_address_block"


class InvalidTLVError(ProxyProtocolError):
    """A TLV that overruns the header, or whose value breaks its type's rules."""

    reason = "bad_tlv"


class SSLTLVError(InvalidTLVError):
    """A malformed PP2_TYPE_SSL TLV or one of its sub-TLVs."""

    reason = "bad_ssl_tlv"


class ChecksumError(ProxyProtocolError):
    """The PP2_TYPE_CRC32C value does not match the header as received."""

    reason = "crc_mismatch"
