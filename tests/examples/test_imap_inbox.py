"""The read-only INBOX's parsing: sequence sets and FETCH items."""

from __future__ import annotations

import os
import pathlib

import pytest
from mailedge_examples.imap_inbox import (
    RequestError,
    parse_fetch_items,
    parse_sequence_set,
    scan,
)


@pytest.mark.parametrize(
    ("text", "largest", "numbers"),
    [
        ("1", 3, {1}),
        ("2:3", 3, {2, 3}),
        ("3:1", 3, {1, 2, 3}),
        ("1:*", 3, {1, 2, 3}),
        ("*", 3, {3}),
        ("1,3", 3, {1, 3}),
        ("5", 3, {5}),
        ("2:9", 3, {2, 3}),
    ],
)
def test_sequence_sets(text: str, largest: int, numbers: set[int]) -> None:
    assert parse_sequence_set(text, largest) == numbers


@pytest.mark.parametrize("text", ["", "0", "a", "1:", "1,,2", "1:2:3"])
def test_bad_sequence_sets(text: str) -> None:
    with pytest.raises(RequestError):
        parse_sequence_set(text, 3)


def test_fetch_items() -> None:
    assert parse_fetch_items("(uid body.peek[])") == ["UID", "BODY.PEEK[]"]
    assert parse_fetch_items("FAST") == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    with pytest.raises(RequestError, match="not ENVELOPE"):
        parse_fetch_items("(ENVELOPE)")


def test_scan_orders_by_delivery_and_reads_maildir_flags(tmp_path: pathlib.Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "cur" / "1.a:2,SF").write_bytes(b"one")
    (tmp_path / "new" / "2.b").write_bytes(b"two!")
    (tmp_path / "tmp" / "3.c").write_bytes(b"not delivered yet")

    os.utime(tmp_path / "cur" / "1.a:2,SF", (1, 1))
    inbox = scan(tmp_path)
    assert [(m.uid, m.size, m.flags) for m in inbox.messages] == [
        (1, 3, ("\\Flagged", "\\Seen")),
        (2, 4, ()),
    ]
    assert inbox.uid_next == 3
