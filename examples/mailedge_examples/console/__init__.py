"""The operator's console: what ``/admin/`` shows and changes, and the metrics behind it.

The HTTP handler (:mod:`mailedge_examples.http_handler`) serves the routes; this package holds
the state they read (:class:`Console`), the JSON they answer, the static page (``index.html``,
``console.css``, ``console.js``: no build step, nothing loaded from elsewhere) and the
Prometheus collectors the dashboard in ``monitoring/`` graphs.
"""

from __future__ import annotations

import collections
import importlib.resources
import secrets
from collections.abc import Callable, Iterable

import attrs
from prometheus_client import Metric
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mailedge.config import rebind_problem
from mailedge.config_edit import EditRefused, edit_trusted_networks
from mailedge.context import ConnectionContext
from mailedge.decisions import DecisionRing
from mailedge.hooks.ratelimit import RateLimitHooks
from mailedge.policy import Verdict
from mailedge.server import Server
from mailedge.settings import Settings

__all__ = [
    "DEFAULT_HEARTBEAT",
    "Console",
    "ConsoleCollector",
    "CountedRateLimits",
    "EditRefused",
    "static_file",
]

# Seconds between two comment lines on an idle event stream: well under any proxy's or
# browser's idle timeout (and the listener's idleTimeout), so the stream stays open, and a
# client that went away is noticed within this long.
DEFAULT_HEARTBEAT = 15.0

# The page's files, by the name the route uses, with their content types.
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}


def static_file(name: str) -> bytes:
    """One of the page's files, read from the installed package."""
    return (importlib.resources.files(__name__) / name).read_bytes()


@attrs.define(eq=False)
class CountedRateLimits(RateLimitHooks):
    """The rate limits, counting their refusals by (listener, stage) for ``/metrics``."""

    refusals: collections.Counter[tuple[str, str]] = attrs.field(
        factory=collections.Counter, init=False, repr=False
    )

    def _tally(self, context: ConnectionContext, stage: str, verdict: Verdict) -> Verdict:
        if not verdict.accepted:
            self.refusals[context.listener, stage] += 1
        return verdict

    async def on_connect(self, context: ConnectionContext) -> Verdict:
        return self._tally(context, "connect", await super().on_connect(context))

    async def on_mail_from(self, context: ConnectionContext, helo: str, mail_from: str) -> Verdict:
        return self._tally(context, "message", await super().on_mail_from(context, helo, mail_from))


@attrs.define(eq=False, repr=False)
class Console:
    """What the console reads and changes.

    ``server`` is set once the server runs. ``config_path`` is the file the server was started
    with (None: the embedded default, which cannot be edited). ``admin_token``, when set, lets
    a request from anywhere in (``Authorization: Bearer``, or the cookie ``/admin/?token=``
    sets). ``csrf_token`` is this process's: the page carries it, and every state-changing
    request from a browser must send it back.
    """

    decisions: DecisionRing = attrs.field(factory=DecisionRing)
    config_path: str | None = None
    extra_sections: tuple[str, ...] = ()
    admin_token: str | None = None
    server: Server | None = None
    rate_limits: CountedRateLimits | None = None
    heartbeat: float = DEFAULT_HEARTBEAT
    csrf_token: str = attrs.field(factory=lambda: secrets.token_urlsafe(32))

    def __repr__(self) -> str:
        return f"<Console config={self.config_path!r} {self.decisions!r}>"

    def listeners(self) -> list[dict[str, object]]:
        """Every listener as the console's table shows it."""
        if self.server is None:
            return []
        settings = self.server.gate.settings
        counts = self.decisions.counts()
        rows = []
        for conf in settings.listeners:
            override = conf.override_proxy_trusted_networks
            if override is None:
                source = "server-wide"
            elif override:
                source = "override"
            else:
                source = "[] (PROXY off)"
            networks = conf.effective_proxy_trusted_networks(settings.system)
            rows.append(
                {
                    "name": conf.name,
                    "protocol": str(conf.protocol),
                    "addresses": [
                        f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                        for h, p in self.server.addresses.get(conf.name, [])
                    ],
                    "tls": conf.tls,
                    "proxy": bool(networks),
                    "trusted": [str(n) for n in networks],
                    "override": None if override is None else [str(n) for n in override],
                    "trusted_from": source,
                    "header_mode": str(conf.proxy_header_mode),
                    "header_timeout": conf.proxy_header_timeout,
                    "idle_timeout": conf.idle_timeout,
                    "open": self.server.limits.open_on(conf.name),
                    "recent": {
                        event: n for (listener, event), n in counts.items() if listener == conf.name
                    },
                }
            )
        return rows

    def state(self) -> dict[str, object]:
        settings = self.server.gate.settings if self.server is not None else Settings()
        return {
            "listeners": self.listeners(),
            "server_wide": [str(n) for n in settings.system.proxy_trusted_networks],
            "config": self.config_path,
            "editable": self.edit_refusal(),
        }

    def edit_refusal(self) -> str | None:
        """Why the trusted networks cannot be edited from the page, or None when they can."""
        if self.config_path is None:
            return "running on the embedded default settings: there is no file to edit"
        if self.server is None:
            return "the server is not running yet"
        return None

    def edit(self, listener: str | None, networks: list[str] | None) -> str:
        """Edit the file, then reload it as SIGHUP does; the message to show. Raises EditRefused."""
        refusal = self.edit_refusal()
        if refusal is not None:
            raise EditRefused(refusal)
        server = self.server
        assert self.config_path is not None
        assert server is not None
        edit_trusted_networks(
            self.config_path,
            listener=listener,
            networks=networks,
            extra_sections=self.extra_sections,
            check=_reload_check(server),
        )
        if not server.reload_from(self.config_path, extra_sections=self.extra_sections):
            raise EditRefused("written, but the reload failed; see the server's log")
        where = "the server-wide list" if listener is None else f"listener {listener!r}"
        return f"{where} saved to {self.config_path} and reloaded"


def _reload_check(server: Server) -> Callable[[Settings], None]:
    """Refuse, before writing, an edit that a reload would refuse (listeners rebound)."""

    def check(settings: Settings) -> None:
        problem = rebind_problem(server.settings, settings)
        if problem is not None:
            raise ValueError(f"a reload cannot apply this file ({problem})")

    return check


# eq=False keeps identity hashing: the registry keys its collectors by the object.
@attrs.define(eq=False, repr=False)
class ConsoleCollector(Collector):
    """The dashboard's metrics beyond the gate's decisions, read at scrape time.

    ``bans`` is the ban count the handler read (asynchronously) just before the scrape.
    """

    console: Console
    bans: int | None = None

    def _families(self) -> list[CounterMetricFamily | GaugeMetricFamily]:
        return [
            CounterMetricFamily(
                "mailedge_untrusted_headers",
                "PROXY headers from untrusted peers, by listener and peer (the first "
                "peers seen have a label each; later ones are 'other').",
                labels=["listener", "peer"],
            ),
            GaugeMetricFamily(
                "mailedge_connections_open", "Open connections, by listener.", labels=["listener"]
            ),
            CounterMetricFamily(
                "mailedge_refused",
                "Connections refused after accept, by listener and why.",
                labels=["listener", "refusal"],
            ),
            CounterMetricFamily(
                "mailedge_rate_limit_refusals",
                "Rate-limit refusals, by listener and stage (connect, message).",
                labels=["listener", "stage"],
            ),
            GaugeMetricFamily("mailedge_bans", "Active auto-bans."),
            GaugeMetricFamily(
                "mailedge_listener_proxy_enabled",
                "1 when the listener trusts some network's PROXY headers, 0 when PROXY is off.",
                labels=["listener"],
            ),
        ]

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        peers, opened, refused, limited, bans, proxy = self._families()
        console = self.console
        for (listener, peer), count in console.decisions.untrusted_peers:
            peers.add_metric([listener, peer], count)
        server = console.server
        if server is not None:
            settings = server.gate.settings
            for conf in settings.listeners:
                opened.add_metric([conf.name], server.limits.open_on(conf.name))
                enabled = bool(conf.effective_proxy_trusted_networks(settings.system))
                proxy.add_metric([conf.name], int(enabled))
            for (listener, kind), count in sorted(server.refused.items()):
                refused.add_metric([listener, str(kind)], count)
        if console.rate_limits is not None:
            for (listener, stage), count in sorted(console.rate_limits.refusals.items()):
                limited.add_metric([listener, stage], count)
        if self.bans is not None:
            bans.add_metric([], self.bans)
        return [peers, opened, refused, limited, bans, proxy]
