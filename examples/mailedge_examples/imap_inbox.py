"""The example IMAP handler's one mailbox: the SMTP handler's Maildir, as a read-only INBOX.

Just enough IMAP4rev1 for a newcomer to read back what they sent with swaks: SELECT and
EXAMINE (both read-only), FETCH and UID FETCH of ``FLAGS``, ``UID``, ``RFC822.SIZE``,
``INTERNALDATE``, ``RFC822``, ``BODY[]`` and ``BODY.PEEK[]``, ``SEARCH ALL`` and
``UID SEARCH ALL``, LIST, CLOSE and UNSELECT. Nothing is ever written: no flags are set, and
STORE, COPY, EXPUNGE and the like are refused.

Maildir has no UIDs, so a mailbox's UIDs are the messages' positions in delivery order
(modification time, then file name) when it is selected; delivery only appends, so they stay
valid as long as nobody deletes a file. UIDVALIDITY is the Maildir's inode number, which
changes when the directory is made anew.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import re
from collections.abc import Sequence

import attrs

__all__ = [
    "FETCH_ITEMS",
    "INBOX",
    "Inbox",
    "Message",
    "RequestError",
    "parse_fetch_items",
    "parse_sequence_set",
    "scan",
]

INBOX = "INBOX"

# Maildir's info flags (the letters after ":2,") and the IMAP system flags they stand for.
_MAILDIR_FLAGS = {
    "D": "\\Draft",
    "F": "\\Flagged",
    "R": "\\Answered",
    "S": "\\Seen",
    "T": "\\Deleted",
}

# The data items FETCH answers; FAST is RFC 3501's macro for the first three.
FETCH_ITEMS = frozenset(
    {"FLAGS", "INTERNALDATE", "RFC822.SIZE", "UID", "RFC822", "BODY[]", "BODY.PEEK[]"}
)
_FAST = ("FLAGS", "INTERNALDATE", "RFC822.SIZE")

_SEQUENCE_RANGE = re.compile(r"(\d+|\*)(?::(\d+|\*))?")


class RequestError(ValueError):
    """A mailbox command this INBOX cannot answer; the message is the BAD reply's text."""


@attrs.frozen
class Message:
    """One delivered message, as the INBOX shows it."""

    uid: int
    path: pathlib.Path
    size: int
    # Seconds since the epoch: the delivery time, for INTERNALDATE.
    delivered: float
    flags: tuple[str, ...] = ()

    def internal_date(self) -> str:
        moment = datetime.datetime.fromtimestamp(self.delivered, datetime.UTC)
        return moment.strftime("%d-%b-%Y %H:%M:%S +0000")


@attrs.frozen
class Inbox:
    """A snapshot of the Maildir, taken at SELECT or EXAMINE."""

    uid_validity: int
    messages: tuple[Message, ...]

    @property
    def uid_next(self) -> int:
        return len(self.messages) + 1

    def by_sequence(self, numbers: set[int]) -> list[tuple[int, Message]]:
        return [(n, m) for n, m in enumerate(self.messages, 1) if n in numbers]

    def by_uid(self, uids: set[int]) -> list[tuple[int, Message]]:
        return [(n, m) for n, m in enumerate(self.messages, 1) if m.uid in uids]


def _flags(name: str) -> tuple[str, ...]:
    _, _, info = name.partition(":2,")
    return tuple(_MAILDIR_FLAGS[c] for c in sorted(set(info)) if c in _MAILDIR_FLAGS)


def scan(maildir: pathlib.Path) -> Inbox:
    """The Maildir's messages in delivery order (blocking: run it in a thread)."""
    found: list[tuple[float, str, pathlib.Path, int]] = []
    for sub in ("new", "cur"):
        try:
            entries = list(os.scandir(maildir / sub))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            stat = entry.stat()
            found.append((stat.st_mtime, entry.name, pathlib.Path(entry.path), stat.st_size))
    found.sort(key=lambda item: (item[0], item[1]))
    try:
        # Kept within IMAP's nz-number range (1 to 2**32 - 1).
        validity = os.stat(maildir).st_ino % 0xFFFFFFFF or 1
    except FileNotFoundError:
        validity = 1
    messages = tuple(
        Message(uid, path, size, mtime, _flags(name))
        for uid, (mtime, name, path, size) in enumerate(found, 1)
    )
    return Inbox(validity, messages)


def parse_sequence_set(text: str, largest: int) -> set[int]:
    """The numbers in an IMAP sequence set (``1``, ``2:4``, ``3:*``, ``1,5``); ``*`` is ``largest``.

    Numbers beyond ``largest`` are kept: a UID set may name messages that do not exist.
    """
    numbers: set[int] = set()
    for part in text.split(","):
        match = _SEQUENCE_RANGE.fullmatch(part)
        if match is None:
            raise RequestError(f"Invalid sequence set {text!r}")
        low, high = (largest if v == "*" else int(v) for v in (match[1], match[2] or match[1]))
        if low == 0 or high == 0:
            raise RequestError("Sequence numbers start at 1")
        low, high = min(low, high), max(low, high)
        # A range past the mailbox's end names nothing more: bound the set by what exists.
        numbers.update(range(low, min(high, max(largest, low)) + 1))
    return numbers


def parse_fetch_items(text: str) -> list[str]:
    """FETCH's data items: one item, ``FAST``, or a parenthesized list, upper-cased."""
    text = text.strip().upper()
    if text == "FAST":
        return list(_FAST)
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    items = text.split()
    if not items:
        raise RequestError("FETCH needs data items")
    unknown = [item for item in items if item not in FETCH_ITEMS]
    if unknown:
        supported = ", ".join(sorted(FETCH_ITEMS))
        raise RequestError(f"This example server fetches only {supported}; not {unknown[0]}")
    return items


def fetch_response(
    number: int, message: Message, items: Sequence[str], *, uid: bool, body: bytes | None
) -> tuple[str, bytes | None]:
    """One FETCH response: the text before the literal, and the literal (the message) if any.

    The response is ``* N FETCH (... BODY[] {size}`` CRLF, the bytes, then ``)`` CRLF.
    """
    wanted = list(items)
    if uid and "UID" not in wanted:
        wanted.insert(0, "UID")
    parts: list[str] = []
    literal_name: str | None = None
    for item in wanted:
        if item == "UID":
            parts.append(f"UID {message.uid}")
        elif item == "FLAGS":
            parts.append(f"FLAGS ({' '.join(message.flags)})")
        elif item == "RFC822.SIZE":
            parts.append(f"RFC822.SIZE {message.size}")
        elif item == "INTERNALDATE":
            parts.append(f'INTERNALDATE "{message.internal_date()}"')
        else:
            # RFC822, BODY[] and BODY.PEEK[] (answered as BODY[]): the whole message, once.
            literal_name = "RFC822" if item == "RFC822" else "BODY[]"
    head = f"* {number} FETCH ({' '.join(parts)}"
    if literal_name is None or body is None:
        return head + ")", None
    separator = " " if parts else ""
    return f"{head}{separator}{literal_name} {{{len(body)}}}", body
