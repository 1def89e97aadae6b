"""The Grafana dashboard and the Prometheus alert rules in monitoring/ use only real metrics.

The metric names come from a real example server's ``/metrics``, scraped over a socket, so a
renamed or removed metric fails here before a dashboard goes blank in production.
"""

from __future__ import annotations

import http.client
import json
import pathlib
import re
import subprocess
from functools import partial

import pytest
import trio
from interop_support import require_binary
from mailedge_examples import mailserver
from prometheus_client.parser import text_string_to_metric_families

from mailedge.config import loads_document
from mailedge.server import Server

MONITORING = pathlib.Path(__file__).parents[1] / "monitoring"
DASHBOARD = MONITORING / "mailedge-dashboard.json"
RULES = sorted(MONITORING.glob("*.yml"))
# A metric name as PromQL writes it; every one mailedge exports starts so.
METRIC = re.compile(r"\bmailedge_[a-z0-9_]+\b")

CONFIG = """\
[[NetworkListener]]
name = "http"
protocol = "http"
bind = ["127.0.0.1:0"]
overrideProxyTrustedNetworks = []

[Example]
stateDir = "{state}"
"""


async def exported_names(nursery: trio.Nursery, tmp_path: pathlib.Path) -> set[str]:
    """Every sample name a running example server's /metrics can carry."""
    document = loads_document(
        CONFIG.format(state=tmp_path), format="toml", extra_sections=["Example"]
    )
    example = mailserver.ExampleSettings.from_table(document.extra["Example"])
    server: Server = await nursery.start(partial(mailserver.run, document, example))
    host, port = server.addresses["http"][0]

    def scrape() -> str:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        try:
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            assert response.status == 200
            return response.read().decode()
        finally:
            connection.close()

    text = await trio.to_thread.run_sync(scrape)
    server.shutdown()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        # A counter's samples are NAME_total; a family with no samples yet still has a TYPE.
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    expressions += [v["definition"] for v in dashboard["templating"]["list"]]
    return expressions


def rule_expressions() -> list[str]:
    # The rules' YAML holds each expression as a block after "expr:"; the names are all we
    # need, and promtool (below) checks the YAML itself.
    return [path.read_text() for path in RULES]


def test_there_is_a_dashboard_and_rules() -> None:
    assert DASHBOARD.is_file()
    assert RULES


@pytest.mark.parametrize("source", ["dashboard", "rules"])
async def test_every_metric_used_is_exported(
    nursery: trio.Nursery, tmp_path: pathlib.Path, source: str
) -> None:
    exported = await exported_names(nursery, tmp_path)
    texts = dashboard_expressions() if source == "dashboard" else rule_expressions()
    used = {name for text in texts for name in METRIC.findall(text)}
    assert used, "no metric names found"
    assert used <= exported, f"not exported: {sorted(used - exported)}"


def test_the_dashboard_covers_what_the_issue_lists() -> None:
    used = {name for text in dashboard_expressions() for name in METRIC.findall(text)}
    assert {
        "mailedge_gate_decisions_total",
        "mailedge_untrusted_headers_total",
        "mailedge_bans",
        "mailedge_rate_limit_refusals_total",
        "mailedge_connections_open",
        "mailedge_refused_total",
    } <= used


def test_promtool_checks_the_rules() -> None:
    promtool = require_binary(
        "promtool", "the Debian package prometheus (apt-get install -y prometheus)"
    )
    result = subprocess.run(
        [promtool, "check", "rules", *map(str, RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout
