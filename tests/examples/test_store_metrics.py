"""The Redis store on the example server's ``/metrics``, against a real ``redis-server``.

The server runs in the test's nursery (or, for ``--workers``, as the script); ``/metrics`` is
scraped with http.client in a worker thread. Redis is paused with SIGSTOP until the circuit
breaker opens, which the scrape must show, and resumed until it closes. These tests wait on
the wall clock: the outage is a real process's, like the store's own outage tests.
"""

from __future__ import annotations

import pathlib
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial

import trio
from mailedge_examples import mailserver
from mailserver_support import CLIENT_TIMEOUT, Script, scrape_metrics
from prometheus_client.parser import text_string_to_metric_families
from redis_support import RedisServer

from mailedge.config import loads_document
from mailedge.server import Server

# [Store] timeout: five timeouts in a row open the breaker (DEFAULT_BREAKER_THRESHOLD), so
# 0.25 s opens it within seconds, and a loaded machine's ordinary replies stay well inside it.
STORE_TIMEOUT = 0.25
# The outage and the recovery each take a few seconds (five timeouts; one probe every 2 s);
# this bounds each wait, well inside the 120 s per test.
OUTAGE_TIMEOUT = 30.0

CONFIG = """\
[[NetworkListener]]
name = "http"
protocol = "http"
bind = ["127.0.0.1:0"]
overrideProxyTrustedNetworks = []
rateLimitConnections = "1000/1m"

[Example]
stateDir = "{state}"
"""

STORE = '\n[Store]\nbackend = "redis"\nurl = "{url}"\ntimeout = {timeout}\n'

# Samples by name and sorted labels.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """The samples of a scrape, and every family's type by name."""
    samples: Samples = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples, types


def sources() -> Iterator[str]:
    """Loopback addresses the server has not seen: each client's first connection asks Redis
    for a shared slot (a returning one reuses the slot it kept)."""
    for n in range(2, 250):
        yield f"127.0.0.{n}"


def wait_until(check: Callable[[Samples], bool], scrape_from: Callable[[str], str]) -> Samples:
    """Scrape, each time from a new client, until ``check`` holds; bounded in time and count."""
    deadline = time.monotonic() + OUTAGE_TIMEOUT
    for source in sources():
        samples, _ = parse(scrape_from(source))
        if check(samples):
            return samples
        assert time.monotonic() < deadline, samples
        time.sleep(0.05)
    raise AssertionError("ran out of client addresses")


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


async def start(
    nursery: trio.Nursery, tmp_path: pathlib.Path, redis: RedisServer | None
) -> tuple[str, int]:
    text = CONFIG.format(state=tmp_path)
    if redis is not None:
        text += STORE.format(url=redis.url, timeout=STORE_TIMEOUT)
    document = loads_document(text, format="toml", extra_sections=["Example"])
    example = mailserver.ExampleSettings.from_table(document.extra["Example"])
    server: Server = await nursery.start(partial(mailserver.run, document, example))
    return server.addresses["http"][0]


STORE_METRICS = {
    "mailedge_store_errors": "counter",
    "mailedge_store_fallbacks": "counter",
    "mailedge_store_breaker_open": "gauge",
    "mailedge_store_breaker_transitions": "counter",
    "mailedge_store_calls": "counter",
    "mailedge_store_operations": "counter",
    "mailedge_store_dropped_operations": "counter",
    "mailedge_store_decisions": "counter",
    "mailedge_store_messages": "counter",
    "mailedge_store_view_resyncs": "counter",
    "mailedge_store_replayed": "counter",
    "mailedge_store_connection_slots": "gauge",
}


async def test_metrics_show_the_redis_store(
    nursery: trio.Nursery, tmp_path: pathlib.Path, redis_server: RedisServer
) -> None:
    address = await start(nursery, tmp_path, redis_server)
    first, types = parse(await trio.to_thread.run_sync(scrape_metrics, address))
    assert {name: types.get(name) for name in STORE_METRICS} == STORE_METRICS
    # The first client was rested: allowed at once, its decision recorded on the way.
    assert value(first, "mailedge_store_decisions_total", how="credit") == 1
    assert value(first, "mailedge_store_decisions_total", how="lease") == 0
    # The scrape's own connection holds a shared slot while it is answered.
    assert value(first, "mailedge_store_connection_slots", state="open") == 1
    assert value(first, "mailedge_store_breaker_open") == 0
    assert value(first, "mailedge_store_view_resyncs_total") >= 1
    second, _ = parse(await trio.to_thread.run_sync(scrape_metrics, address))
    # The first connection's slot was taken in a round trip and is now kept as a spare,
    # which the second reuses.
    assert value(second, "mailedge_store_calls_total") >= 1
    assert value(second, "mailedge_store_operations_total") >= value(
        second, "mailedge_store_calls_total"
    )
    assert value(second, "mailedge_store_connection_slots", state="open") == 1
    for to in ("open", "closed"):
        assert value(second, "mailedge_store_breaker_transitions_total", to=to) == 0
    assert value(second, "mailedge_store_errors_total") == 0
    assert value(second, "mailedge_store_fallbacks_total") == 0


async def test_the_memory_store_exports_no_store_metrics(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    address = await start(nursery, tmp_path, None)
    text = await trio.to_thread.run_sync(scrape_metrics, address)
    assert "mailedge_gate_decisions_total" in text
    assert "mailedge_store_" not in text


async def test_the_breaker_opening_and_closing_shows_on_metrics(
    nursery: trio.Nursery, tmp_path: pathlib.Path, redis_server: RedisServer
) -> None:
    address = await start(nursery, tmp_path, redis_server)
    scrape_from = partial(scrape_metrics, address)

    def opened(samples: Samples) -> bool:
        return value(samples, "mailedge_store_breaker_open") == 1

    def closed(samples: Samples) -> bool:
        return value(samples, "mailedge_store_breaker_open") == 0

    redis_server.pause()
    try:
        during = await trio.to_thread.run_sync(wait_until, opened, scrape_from)
    finally:
        redis_server.resume()
    assert value(during, "mailedge_store_breaker_transitions_total", to="open") == 1
    assert value(during, "mailedge_store_breaker_transitions_total", to="closed") == 0
    # Five failures in a row opened it; the connections meanwhile were answered without Redis.
    assert value(during, "mailedge_store_errors_total") >= 5
    assert value(during, "mailedge_store_fallbacks_total") >= 1
    after = await trio.to_thread.run_sync(wait_until, closed, scrape_from)
    assert value(after, "mailedge_store_breaker_transitions_total", to="open") == 1
    assert value(after, "mailedge_store_breaker_transitions_total", to="closed") == 1


def test_workers_sum_the_store_counters_and_report_one_breaker(
    tmp_path: pathlib.Path, redis_server: RedisServer
) -> None:
    config = tmp_path / "workers.toml"
    config.write_text(
        CONFIG.format(state=tmp_path) + STORE.format(url=redis_server.url, timeout=STORE_TIMEOUT)
    )
    script = Script(tmp_path, "--config", str(config), "--workers", "2")
    try:
        address = script.address("http")
        _, types = parse(scrape_metrics(address))
        assert {name: types.get(name) for name in STORE_METRICS} == STORE_METRICS
        redis_server.pause()
        try:
            # Both workers take turns at the socket, so both meet the outage; the counter is
            # the sum of their transitions (each copied into the shared files within 1 s).
            during = wait_until(
                lambda s: value(s, "mailedge_store_breaker_transitions_total", to="open") == 2,
                partial(scrape_metrics, address),
            )
        finally:
            redis_server.resume()
        # Both breakers are open: the gauge is the largest worker's, one sample, not their sum.
        breaker = [
            sample
            for (name, _labels), sample in during.items()
            if name == "mailedge_store_breaker_open"
        ]
        assert breaker == [1.0], script.log.read_text()
        script.process.send_signal(signal.SIGTERM)
        assert script.process.wait(timeout=CLIENT_TIMEOUT) == 0
    finally:
        script.close()
