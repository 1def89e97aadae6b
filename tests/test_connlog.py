"""The per-connection log prefix."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import hook_support
import pytest

from mailedge.connlog import ConnectionLogger, connection_prefix
from mailedge.context import ConnectionContext


def make_context(**changes: Any) -> ConnectionContext:
    """A proxied client on listener smtp-proxy, connection 25."""
    return hook_support.context(
        "198.51.100.7", listener="smtp-proxy", connection_id=25, client_port=40123, **changes
    )


def test_the_prefix_names_the_connection_and_the_real_client() -> None:
    assert connection_prefix(make_context()) == "#25 smtp-proxy client=198.51.100.7:40123"
    v6 = make_context(client_ip=ipaddress.ip_address("2001:db8::7"))
    assert connection_prefix(v6) == "#25 smtp-proxy client=[2001:db8::7]:40123"


def test_every_line_carries_the_prefix_and_the_callers_origin(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.connlog")
    log = ConnectionLogger(logging.getLogger("test.connlog"), make_context())
    log.info("delivered %s to %d recipients", "abc", 2)
    log.warning("100% plain")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("delivery failed")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "#25 smtp-proxy client=198.51.100.7:40123: delivered abc to 2 recipients",
        "#25 smtp-proxy client=198.51.100.7:40123: 100% plain",
        "#25 smtp-proxy client=198.51.100.7:40123: delivery failed",
    ]
    assert {record.funcName for record in caplog.records} == {
        "test_every_line_carries_the_prefix_and_the_callers_origin"
    }
    assert caplog.records[2].exc_info is not None


def test_a_percent_in_the_address_is_not_a_format_directive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.connlog")
    scoped = make_context(client_ip=ipaddress.ip_address("fe80::1%eth0"))
    log = ConnectionLogger(logging.getLogger("test.connlog"), scoped)
    log.info("said %s", "hi")
    assert caplog.records[0].getMessage() == "#25 smtp-proxy client=[fe80::1%eth0]:40123: said hi"


def test_disabled_levels_cost_nothing_and_the_repr_is_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="test.connlog")
    log = ConnectionLogger(logging.getLogger("test.connlog"), make_context())
    log.debug("%s", object())
    assert caplog.records == []
    assert repr(log) == "<ConnectionLogger test.connlog #25 smtp-proxy client=198.51.100.7:40123>"
