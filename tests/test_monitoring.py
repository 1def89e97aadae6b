"""The Grafana dashboard and the Prometheus alert rules in monitoring/ use only real metrics.

The metric names come from a real example server's ``/metrics``, scraped over a socket, so a
renamed or removed metric fails here before a dashboard goes blank in production. The server
keeps its limits and bans in a real ``redis-server``, so the store's metrics are there too.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
from functools import partial

import pytest
import trio
from interop_support import require_binary
from mailedge_examples import mailserver
from mailserver_support import scrape_metrics
from prometheus_client.parser import text_string_to_metric_families
from redis_support import RedisServer

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

[Store]
backend = "redis"
url = "{redis}"
"""


async def exported_names(
    nursery: trio.Nursery, tmp_path: pathlib.Path, redis: RedisServer
) -> set[str]:
    """Every sample name a running example server's /metrics can carry."""
    document = loads_document(
        CONFIG.format(state=tmp_path, redis=redis.url), format="toml", extra_sections=["Example"]
    )
    example = mailserver.ExampleSettings.from_table(document.extra["Example"])
    server: Server = await nursery.start(partial(mailserver.run, document, example))
    host, port = server.addresses["http"][0]

    text = await trio.to_thread.run_sync(scrape_metrics, (host, port))
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
    nursery: trio.Nursery, tmp_path: pathlib.Path, redis_server: RedisServer, source: str
) -> None:
    exported = await exported_names(nursery, tmp_path, redis_server)
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
        # Issue 11: the Redis store's failure policy, round trips and slots.
        "mailedge_store_breaker_open",
        "mailedge_store_errors_total",
        "mailedge_store_fallbacks_total",
        "mailedge_store_calls_total",
        "mailedge_store_decisions_total",
        "mailedge_store_connection_slots",
    } <= used


# promtool's rule unit test: one instance's breaker open for three minutes from minute 2,
# another's never. The alert fires a minute after it opened, for that instance only.
BREAKER_RULE_TEST = """\
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'mailedge_store_breaker_open{{instance="a"}}'
        values: '0 0 1 1 1 1 0 0'
      - series: 'mailedge_store_breaker_open{{instance="b"}}'
        values: '0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 2m
        alertname: MailedgeStoreBreakerOpen
        exp_alerts: []
      - eval_time: 4m
        alertname: MailedgeStoreBreakerOpen
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a}}
            exp_annotations:
              summary: "a: the Redis store's circuit breaker has been open for a minute"
              description: {description}
      - eval_time: 7m
        alertname: MailedgeStoreBreakerOpen
        exp_alerts: []
"""


def test_promtool_fires_the_breaker_alert_only_while_it_is_open(tmp_path: pathlib.Path) -> None:
    promtool = require_binary(
        "promtool", "the Debian package prometheus (apt-get install -y prometheus)"
    )
    rules = MONITORING / "mailedge-alerts.yml"
    # The description as the rule file folds it (">-": one line, single spaces).
    text = rules.read_text()
    block = text[text.index("alert: MailedgeStoreBreakerOpen") :]
    folded = block[block.index("description: >-") + len("description: >-") :]
    description = " ".join(folded.split())
    test = tmp_path / "breaker-test.yml"
    test.write_text(
        BREAKER_RULE_TEST.format(rules=json.dumps(str(rules)), description=json.dumps(description))
    )
    result = subprocess.run(
        [promtool, "test", "rules", str(test)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
    assert "SUCCESS: 4 rules found" in result.stdout
