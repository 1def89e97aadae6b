"""Gate events: escaping, fields, log levels and counters."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from mailedge.events import EventCounters, EventName, GateEvent, escape_bytes


def event(name: EventName = EventName.REJECTED, **kw: object) -> GateEvent:
    fields: dict[str, object] = {
        "name": name,
        "listener": "smtp",
        "connection_id": 1,
        "peer_ip": ipaddress.ip_address("2001:db8::9"),
        "peer_port": 4000,
        "reason": "v1_syntax",
        "message": "bad",
        "elapsed": 0.0,
    }
    fields.update(kw)
    return GateEvent(**fields)  # type: ignore[arg-type]


def test_escape_bytes_keeps_logs_printable_and_short() -> None:
    assert escape_bytes(b"PROXY TCP4\r\n\x00\xff") == "PROXY TCP4\\r\\n\\x00\\xff"
    assert escape_bytes(b"a" * 100, limit=8) == "aaaaaaaa..."
    assert escape_bytes(b"") == ""


def test_peer_and_client_are_formatted_as_endpoints() -> None:
    e = event(client_ip=ipaddress.ip_address("198.51.100.1"), client_port=25)
    assert e.peer == "[2001:db8::9]:4000"
    assert e.client == "198.51.100.1:25"
    assert event().client is None


@pytest.mark.parametrize(
    ("name", "level"),
    [
        (EventName.ACCEPTED, logging.DEBUG),
        (EventName.LOCAL, logging.DEBUG),
        (EventName.DIRECT, logging.DEBUG),
        (EventName.REJECTED, logging.WARNING),
        (EventName.UNTRUSTED_HEADER, logging.WARNING),
        (EventName.TIMEOUT, logging.WARNING),
    ],
)
def test_levels(name: EventName, level: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mailedge")
    event(name).log()
    (record,) = caplog.records
    assert record.levelno == level
    assert record.getMessage().startswith(f"{name} listener=smtp peer=[2001:db8::9]:4000")


def test_counters() -> None:
    counters = EventCounters()
    counters.add(event())
    counters.add(event())
    counters.add(event(reason="bad_port"))
    counters.add(event(listener="imap"))
    assert counters.get("smtp", EventName.REJECTED, "v1_syntax") == 2
    assert counters.get("smtp", EventName.REJECTED) == 3
    assert counters.get("imap", "proxy.rejected") == 1
    assert next(iter(counters)) == (("imap", "proxy.rejected", "v1_syntax"), 1)
    assert repr(counters) == "<EventCounters total=4>"
