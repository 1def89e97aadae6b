"""The syntax of the names and codes that mail protocols exchange, written once.

A DNS host name (this server's own name, in a banner, a ``Received`` header, a Received-SPF
``receiver`` or an Authentication-Results authserv-id) and an RFC 3463 enhanced status code
(in SMTP replies). Each goes into protocol text unquoted, so each is checked with one rule.
"""

from __future__ import annotations

import re

__all__ = ["ENHANCED_STATUS", "HOSTNAME", "MAX_HOSTNAME_LENGTH", "is_hostname"]

# RFC 1035 2.3.4: a name is at most 255 octets on the wire, which leaves 253 characters in
# its dotted text form (without the optional final dot).
MAX_HOSTNAME_LENGTH = 253

# RFC 1123 2.1: a label is letters, digits and hyphens, starts and ends with a letter or
# digit, and (RFC 1035 2.3.4) is at most 63 octets.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# A DNS host name: labels joined by single dots, with an optional final dot (the absolute
# form), at most MAX_HOSTNAME_LENGTH characters before that dot. Use with ``fullmatch``.
HOSTNAME = re.compile(rf"(?=[^.].{{0,{MAX_HOSTNAME_LENGTH - 1}}}\.?\Z){_LABEL}(?:\.{_LABEL})*\.?")

# RFC 3463 2: an enhanced status code, class.subject.detail; use with ``fullmatch``.
ENHANCED_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


def is_hostname(text: str) -> bool:
    """True when ``text`` is a DNS host name by :data:`HOSTNAME`'s rule."""
    return HOSTNAME.fullmatch(text) is not None
