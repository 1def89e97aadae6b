"""Gate events: escaping, fields, log levels and counters."""

from __future__ import annotations

import ipaddress
import logging

import attrs
import pytest

from mailedge.events import (
    EventCounters,
    EventName,
    GateEvent,
    GateReason,
    LogLimiter,
    escape_bytes,
)
from mailedge.proxy import ProxyProtocolError


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
    assert escape_bytes(b"a\\b\r\n\t\x00\x7f\xff ~'\"") == "a\\\\b\\r\\n\\t\\x00\\x7f\\xff ~'\""
    every = escape_bytes(bytes(range(256)), limit=None)
    assert every.isascii() and every.isprintable()
    assert every.startswith("\\x00\\x01") and every.endswith("\\xfe\\xff")


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


def limited_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailedge.gate"]


def test_a_storm_of_one_kind_is_logged_in_part_and_then_summed_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailedge")
    limiter = LogLimiter(burst=3, window=10.0)
    for i in range(10):
        limiter.log(event(EventName.TIMEOUT, reason="timeout", connection_id=i), now=float(i) / 10)
    lines = limited_messages(caplog)
    assert len(lines) == 4  # three events, then the notice
    assert all(line.startswith("proxy.timeout listener=smtp peer=") for line in lines[:3])
    assert "3 such events within 10 s; further ones are counted, not logged" in lines[3]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()
    # The next window opens with the count of what was held back, then logs again.
    limiter.log(event(EventName.TIMEOUT, reason="timeout"), now=10.5)
    summary, line = limited_messages(caplog)
    assert "proxy.timeout listener=smtp reason=timeout: 7 more such events" in summary
    assert line.startswith("proxy.timeout listener=smtp peer=")


def test_kinds_are_limited_separately(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailedge")
    limiter = LogLimiter(burst=1, window=10.0)
    for reason in ("timeout", "v1_syntax"):
        limiter.log(event(reason=reason), now=0.0)
    limiter.log(event(reason="timeout", listener="imap"), now=0.0)
    assert sum("peer=" in line for line in limited_messages(caplog)) == 3


def test_debug_events_are_never_held_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mailedge")
    limiter = LogLimiter(burst=1, window=10.0)
    for _ in range(5):
        limiter.log(event(EventName.ACCEPTED, reason="header"), now=0.0)
    assert len(limited_messages(caplog)) == 5


def test_nothing_is_logged_below_the_loggers_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="mailedge")
    limiter = LogLimiter(burst=1, window=10.0)
    for _ in range(3):
        limiter.log(event(), now=0.0)
    assert limited_messages(caplog) == []


def _subclasses(cls: type[ProxyProtocolError]) -> list[type[ProxyProtocolError]]:
    direct: list[type[ProxyProtocolError]] = cls.__subclasses__()
    return [cls, *(sub for child in direct for sub in _subclasses(child))]


def test_every_codec_reason_is_a_gate_reason() -> None:
    reasons = {error.reason for error in _subclasses(ProxyProtocolError)}
    assert len(reasons) >= 14
    assert reasons <= {str(reason) for reason in GateReason}


def test_an_event_takes_its_reason_as_text() -> None:
    event = GateEvent(
        name=EventName.REJECTED,
        listener="smtp",
        connection_id=1,
        peer_ip=ipaddress.ip_address("10.0.0.1"),
        peer_port=1234,
        reason="v1_syntax",
        message="m",
        elapsed=0.0,
    )
    assert event.reason is GateReason.V1_SYNTAX
    with pytest.raises(ValueError, match="not_a_reason"):
        attrs.evolve(event, reason="not_a_reason")
