"""The shared store's state on ``/metrics``: the Redis store's failure policy, calls and slots.

:class:`StoreCollector` reads a :class:`~mailedge.hooks.redis.RedisStore`'s counters (plain
attributes and properties, kept by the library, which knows nothing of Prometheus) at scrape
time. The example server registers it on the HTTP handler's registry when ``[Store]`` is
Redis; with the memory store there is nothing shared to report. With ``--workers`` the
counters are summed over workers and ``mailedge_store_breaker_open`` is the largest worker's
(``MetricsMirror`` in :mod:`mailedge_examples.mailserver`).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from prometheus_client import Metric
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mailedge.hooks.redis import RedisStore

__all__ = ["BREAKER_OPEN", "StoreCollector"]

# The gauge a --workers /metrics takes the maximum of, not the sum: 1 when any worker's
# breaker is open.
BREAKER_OPEN = "mailedge_store_breaker_open"


# eq=False keeps identity hashing: the registry keys its collectors by the object.
@attrs.define(eq=False, repr=False)
class StoreCollector(Collector):
    """The Redis store's counters and state, read at each scrape."""

    store: RedisStore

    def _families(self) -> list[CounterMetricFamily | GaugeMetricFamily]:
        return [
            CounterMetricFamily(
                "mailedge_store_errors", "Calls to Redis that failed or timed out."
            ),
            CounterMetricFamily(
                "mailedge_store_fallbacks",
                "Decisions answered without Redis, by [Store] onFailure (an outage, or the "
                "breaker open).",
            ),
            GaugeMetricFamily(
                BREAKER_OPEN, "1 while the circuit breaker is open (Redis not called), else 0."
            ),
            CounterMetricFamily(
                "mailedge_store_breaker_transitions",
                "Circuit breaker transitions, by the state it went to (open, closed).",
                labels=["to"],
            ),
            CounterMetricFamily(
                "mailedge_store_calls",
                "Round trips to Redis for decisions and records: BATCH script calls (each "
                "carrying every decision and background operation queued at the time) and the "
                "single calls (hits, ban writes, listings); the view's re-reads apart.",
            ),
            CounterMetricFamily(
                "mailedge_store_operations", "Operations (decisions and background) sent in them."
            ),
            CounterMetricFamily(
                "mailedge_store_dropped_operations",
                "Background operations dropped while Redis was away (each expires by itself).",
            ),
            CounterMetricFamily(
                "mailedge_store_decisions",
                "Rate-limit decisions made without a round trip, by how: lease (a token granted "
                "ahead), credit (a rested client, recorded on the way).",
                labels=["how"],
            ),
            CounterMetricFamily(
                "mailedge_store_messages", "Ban changes received over pub/sub and applied."
            ),
            CounterMetricFamily(
                "mailedge_store_view_resyncs", "Full re-reads of the local ban view."
            ),
            CounterMetricFamily(
                "mailedge_store_replayed",
                "Ban writes made during an outage, sent to Redis once it was back.",
            ),
            GaugeMetricFamily(
                "mailedge_store_connection_slots",
                "Shared maxConnectionsPerIp slots held: open (for open connections), spare "
                "(kept for a client's next connection).",
                labels=["state"],
            ),
        ]

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        store = self.store
        families = self._families()
        (
            errors,
            fallbacks,
            breaker_open,
            transitions,
            calls,
            operations,
            dropped,
            decisions,
            messages,
            resyncs,
            replayed,
            slots,
        ) = families
        errors.add_metric([], store.errors)
        fallbacks.add_metric([], store.fallbacks)
        breaker_open.add_metric([], int(store.breaker.is_open))
        transitions.add_metric(["open"], store.breaker.opened)
        transitions.add_metric(["closed"], store.breaker.closed)
        calls.add_metric([], store.calls)
        operations.add_metric([], store.operations)
        dropped.add_metric([], store.dropped_operations)
        decisions.add_metric(["lease"], store.leases.spent)
        decisions.add_metric(["credit"], store.leases.credited)
        messages.add_metric([], store.messages)
        resyncs.add_metric([], store.view.resyncs)
        replayed.add_metric([], store.replayed)
        slots.add_metric(["open"], store.connection_slots)
        slots.add_metric(["spare"], store.spare_slots)
        return families
