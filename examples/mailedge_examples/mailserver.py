"""The mailedge example mail server: SMTP, IMAP and HTTP behind one shared ProxyGate.

Run it with ``make serve`` or ``python examples/mailserver.py [--config FILE]`` (a launcher
for :func:`main`). Without
``--config`` it uses the embedded default below: loopback only, one direct and one
PROXY-trusting listener per protocol, and prints a command to try each one.

Signals: SIGHUP reloads the config file (new trusted networks apply to new connections; an
invalid file keeps the running settings); SIGTERM and SIGINT stop accepting and let open
sessions finish within the drain deadline.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import errno
import ipaddress
import logging
import os
import pathlib
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mailedge.config import (
    ConfigError,
    Document,
    load_document,
    loads_document,
    require_listeners,
)
from mailedge.decisions import fan_out
from mailedge.gate import ProxyGate
from mailedge.hooks import HookChain, Hooks
from mailedge.hooks.autoban import AutoBan
from mailedge.hooks.dmarc import DMARCHook
from mailedge.hooks.dns import ResolverSettings
from mailedge.hooks.ratelimit import RateLimiter
from mailedge.hooks.redis import RedisStore, open_store
from mailedge.hooks.spf import SPFHook
from mailedge.hooks.store import MemoryStore, RateStore
from mailedge.networks import TrustedNetworks, format_endpoint
from mailedge.server import BindError, Handler, Server, handle_signals
from mailedge.settings import ListenerProtocol, NetworkListener
from mailedge.store_settings import StoreBackend
from mailedge.tls import server_ssl_context
from mailedge.workers import Supervisor, bind_listeners, inherited, watch_parent
from mailedge_examples.console import Console, CountedRateLimits
from mailedge_examples.http_handler import HTTPHandler
from mailedge_examples.imap_handler import IMAPHandler
from mailedge_examples.smtp_handler import SMTPHandler
from mailedge_examples.store_metrics import BREAKER_OPEN, StoreCollector

log = logging.getLogger("mailedge.examples.mailserver")

# The example's own table in the config file, next to SystemSettings and NetworkListener.
EXAMPLE_SECTION = "Example"


def _demo_listener(protocol: str, port: int, *, proxy: bool) -> str:
    """One [[NetworkListener]] table of the embedded default, on loopback's both families."""
    name = f"{protocol}-proxy" if proxy else protocol
    table = (
        f'[[NetworkListener]]\nname = "{name}"\nprotocol = "{protocol}"\n'
        f'bind = ["127.0.0.1:{port}", "[::1]:{port}"]\n'
    )
    return table if proxy else table + "overrideProxyTrustedNetworks = []\n"


# The demo ports less their thousands: 2xxx listeners are direct, 3xxx behind a proxy.
_DEMO_PORTS = {"smtp": 525, "imap": 143, "http": 80}

DEFAULT_CONFIG = "\n".join(
    [
        """\
# The embedded default: loopback only. Direct listeners turn PROXY off with an empty
# override; the proxy listeners trust loopback, as a local HAProxy or nginx would be.
[SystemSettings]
proxyTrustedNetworks = ["127.0.0.0/8", "::1"]
""",
        *(
            _demo_listener(protocol, base + port, proxy=proxy)
            for proxy, base in ((False, 2000), (True, 3000))
            for protocol, port in _DEMO_PORTS.items()
        ),
        """\
[Example]
hostname = "mx.mailedge.test"
users = { demo = "demo-password" }
""",
    ]
)


# The name the demo greets with and puts in its certificate and Received headers.
DEFAULT_HOSTNAME = "mx.mailedge.test"
# Where delivered mail, the demo certificate and its key live; relative to the cwd.
DEFAULT_STATE_DIR = ".mailedge-demo"


# An admin token is a password anyone who can reach the port may guess at: 16 characters at
# the least (`openssl rand -hex 16` gives 32).
MIN_ADMIN_TOKEN = 16


@attrs.frozen
class ExampleSettings:
    """The example server's own settings, from the config file's ``[Example]`` table."""

    hostname: str = DEFAULT_HOSTNAME
    state_dir: pathlib.Path = pathlib.Path(DEFAULT_STATE_DIR)
    users: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    # SPF and DMARC need DNS the demo cannot assume, so they are opt-in: with them on and no
    # resolver reachable, every message would get a 451 temperror.
    spf: bool = False
    dmarc: bool = False
    # "ip" or "ip:port" entries; empty means the system resolver.
    dns_servers: tuple[str, ...] = ()
    # Lets the console (/admin/) answer from other hosts too, to whoever presents it; unset,
    # only direct loopback connections get in.
    admin_token: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> ExampleSettings:
        known = ["hostname", "stateDir", "users", "spf", "dmarc", "dnsServers", "adminToken"]
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown key {key!r}{hint}", path=EXAMPLE_SECTION)
        hostname = table.get("hostname", DEFAULT_HOSTNAME)
        if not isinstance(hostname, str) or not hostname:
            raise ConfigError(f"expected a host name, got {hostname!r}", path="Example.hostname")
        state_dir = table.get("stateDir", DEFAULT_STATE_DIR)
        if not isinstance(state_dir, str):
            raise ConfigError(f"expected a path, got {state_dir!r}", path="Example.stateDir")
        users = table.get("users", {})
        if not isinstance(users, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in users.items()
        ):
            raise ConfigError("expected a table of user = password", path="Example.users")
        flags = {}
        for key in ("spf", "dmarc"):
            flags[key] = table.get(key, False)
            if not isinstance(flags[key], bool):
                raise ConfigError(f"expected a boolean, got {flags[key]!r}", path=f"Example.{key}")
        servers = table.get("dnsServers", [])
        if not isinstance(servers, list) or not all(isinstance(x, str) for x in servers):
            raise ConfigError("expected a list of 'ip' or 'ip:port'", path="Example.dnsServers")
        token = table.get("adminToken")
        if token is not None and (not isinstance(token, str) or len(token) < MIN_ADMIN_TOKEN):
            raise ConfigError(
                f"expected a string of at least {MIN_ADMIN_TOKEN} characters",
                path="Example.adminToken",
            )
        return cls(
            admin_token=token,
            hostname=hostname,
            state_dir=pathlib.Path(state_dir),
            users=users,
            spf=flags["spf"],
            dmarc=flags["dmarc"],
            dns_servers=tuple(servers),
        )


def load(config: str | None) -> tuple[Document, ExampleSettings]:
    """The config file's settings, or the embedded default's."""
    if config is None:
        document = loads_document(DEFAULT_CONFIG, format="toml", extra_sections=[EXAMPLE_SECTION])
    else:
        document = load_document(config, extra_sections=[EXAMPLE_SECTION])
    try:
        require_listeners(document.settings)
        example = ExampleSettings.from_table(document.extra.get(EXAMPLE_SECTION, {}))
    except ConfigError as error:
        # Named like mailedge's own sections' errors: the file first.
        raise (error if config is None else error.in_file(config)) from None
    return document, example


def demo_certificate(state_dir: pathlib.Path, hostname: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed certificate for STARTTLS and implicit TLS, made once at first start."""
    cert, key = state_dir / "demo-cert.pem", state_dir / "demo-key.pem"
    if cert.exists() and key.exists():
        return cert, key
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        # A demo certificate: a year, regenerated by deleting the files.
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(private, hashes.SHA256())
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    key.touch(mode=0o600)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert, key


# The client the suggested probe claims: TEST-NET-3, so it is never a real one.
PROBE_CLIENT = "203.0.113.7:40000"


def mailedge_command() -> str:
    """``mailedge`` as it runs from the current directory in a fresh shell.

    The bare name when this interpreter's ``mailedge`` is on the PATH; else its script's path
    (``.venv/bin/mailedge`` from the project directory after ``make serve``).
    """
    script = pathlib.Path(sys.prefix) / "bin" / "mailedge"
    found = shutil.which("mailedge")
    if not script.exists() or (found and pathlib.Path(found).resolve() == script.resolve()):
        return "mailedge"
    try:
        return str(script.absolute().relative_to(pathlib.Path.cwd()))
    except ValueError:
        return str(script)


def _local_source(host: str) -> str:
    """The address this host's connection to ``host`` comes from: ``host`` itself, since it
    is one of ours, or loopback for a wildcard."""
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return host


def try_it(
    conf: NetworkListener, endpoints: Sequence[tuple[str, int]], trusted: TrustedNetworks
) -> str:
    """A ready-to-paste command that exercises one listener from this host.

    A PROXY listener gets a probe only when this host reaches it from an address it trusts;
    otherwise the line says which addresses it trusts and how to probe from one.
    """
    probe = f"{mailedge_command()} probe {conf.protocol}"
    host, port = endpoints[0]
    if trusted:
        for host, port in endpoints:
            source = _local_source(host)
            if ipaddress.ip_address(source) in trusted:
                return f"{probe} {format_endpoint(source, port)} --client {PROBE_CLIENT}"
        host, port = endpoints[0]
        shown = ", ".join(map(str, trusted))
        return (
            f"PROXY only from {shown}, which this host does not connect from; from an "
            f"address in them: {probe} {format_endpoint(host, port)} --client {PROBE_CLIENT} "
            "--source ADDRESS"
        )
    target = format_endpoint(host, port)
    if conf.protocol is ListenerProtocol.SMTP:
        return f"swaks --server {target} --to demo@mailedge.test"
    if conf.protocol is ListenerProtocol.IMAP:
        # -crlf: IMAP lines end with CRLF, and the handler's reader takes nothing else.
        return f"openssl s_client -crlf -starttls imap -connect {target} -quiet"
    return f"curl http://{target}/whoami"


def announce(server: Server, example: ExampleSettings | None = None, out: Any = sys.stdout) -> None:
    """Print every listener's addresses and a command to try it, then where mail goes."""
    settings = server.settings
    for conf in settings.listeners:
        networks = conf.effective_proxy_trusted_networks(settings.system)
        kind = f"PROXY from {', '.join(map(str, networks))}" if networks else "direct"
        for host, port in server.addresses[conf.name]:
            print(
                f"{conf.name:<11} {conf.protocol:<4} {format_endpoint(host, port):<16} {kind}",
                file=out,
            )
        print(f"  try: {try_it(conf, server.addresses[conf.name], networks)}", file=out)
    if example is not None:
        print(f"mail is delivered to {example.state_dir / 'Maildir'} (new/ and cur/)", file=out)
        for user, password in example.users.items():
            print(f"IMAP login (after STARTTLS): {user} / {password}", file=out)
    print("ready", file=out, flush=True)


def bind_failure(error: BindError) -> str:
    """The one line a bind failure prints, with what to do about it."""
    hint = (
        "is another server on it? `ss -ltnp` names it; or pick another port"
        if error.errno == errno.EADDRINUSE
        else "is that address one of this host's? `ip -brief address` lists them"
        if error.errno == errno.EADDRNOTAVAIL
        else "a port below 1024 needs root; or pick another port"
        if error.errno == errno.EACCES
        else "pick another address or port"
    )
    return f"mailserver: {error} ({hint})"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def workers_refusal(count: int, backend: StoreBackend) -> str | None:
    """Why ``--workers count`` cannot run on ``backend``, or None when it can."""
    if count > 1 and backend is StoreBackend.MEMORY:
        return (
            f'--workers {count} needs a shared store ([Store] backend = "redis"): with the '
            f"memory store every rate limit, ban and per-IP count would be per worker, "
            f"{count} times looser than configured"
        )
    return None


async def main(argv: Sequence[str] | None = None) -> int:
    """The example server's command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", help="a TOML or JSON file; default: the embedded one")
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="DEBUG shows every gate decision (default: INFO)",
    )
    parser.add_argument(
        "--workers",
        default=1,
        type=int,
        metavar="N",
        help="serve with N worker processes on the same sockets (needs [Store] backend = redis)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="with --workers: one SO_REUSEPORT socket per worker instead of shared ones",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.exit(2, f"mailserver: --workers must be at least 1, not {args.workers}\n")
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        document, example = load(args.config)
    except (ConfigError, OSError) as exc:
        parser.exit(2, f"mailserver: {exc}\n")
    given = inherited()
    if given is None and args.workers > 1:
        refusal = workers_refusal(args.workers, document.settings.store.backend)
        if refusal is not None:
            parser.exit(2, f"mailserver: {refusal}\n")
        return await supervise(args, document, example)

    failed: BindError | None = None
    try:
        async with trio.open_nursery() as nursery:
            sockets = given.sockets if given is not None else None
            server = await nursery.start(
                partial(run, document, example, config_path=args.config, sockets=sockets)
            )
            # Signals are caught before "ready": a SIGHUP right after it reloads, not kills.
            await nursery.start(
                partial(handle_signals, server, args.config, extra_sections=[EXAMPLE_SECTION])
            )
            if given is not None:
                # A worker: the parent announced; it stops when the parent is gone.
                nursery.start_soon(_watch_parent, server, given.parent_fd)
                given.ready()
            else:
                announce(server, example)
    except* BindError as group:
        # The store's and the server's nurseries may each wrap it in a group of its own.
        failed = _first_bind_error(group)
    if failed is not None:
        print(bind_failure(failed), file=sys.stderr)
        return 2
    return 0


def _first_bind_error(group: BaseExceptionGroup[BaseException]) -> BindError | None:
    for error in group.exceptions:
        if isinstance(error, BindError):
            return error
        if isinstance(error, BaseExceptionGroup):
            found = _first_bind_error(error)
            if found is not None:
                return found
    return None


async def _watch_parent(server: Server, fd: int) -> None:
    """A worker shuts down when its parent is gone; the watch ends when the server stops."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_parent, fd, server.shutdown)
        await server.wait_stopped()
        nursery.cancel_scope.cancel()


async def supervise(args: argparse.Namespace, document: Document, example: ExampleSettings) -> int:
    """The parent of ``--workers N``: bind every listener, run the workers, announce, wait."""
    try:
        sockets = bind_listeners(document.settings, args.workers, reuse_port=args.reuse_port)
    except BindError as error:
        print(bind_failure(error), file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "mailedge_examples.mailserver", "--log-level", args.log_level]
    if args.config is not None:
        command += ["--config", str(await trio.Path(args.config).absolute())]
    # One /metrics for the whole server: prometheus-client's multiprocess mode, in a fresh
    # directory per run (docs/scale-out.md, "Metrics").
    with tempfile.TemporaryDirectory(prefix="mailedge-metrics-") as metrics:
        supervisor = Supervisor(
            command,
            sockets,
            env={"PROMETHEUS_MULTIPROC_DIR": metrics},
            on_exit=_mark_process_dead(metrics),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            addresses = {
                name: [_endpoint_of(sock) for sock in socks] for name, socks in sockets[0].items()
            }
            _announce_bound(document, addresses, example)
            print(f"workers: {args.workers}, pids {supervisor.pids}", flush=True)
            print("ready", flush=True)
    for worker_sockets in sockets:
        for socks in worker_sockets.values():
            for sock in socks:
                sock.close()
    return 1 if supervisor.failed else 0


# Set by the parent of --workers: prometheus-client's multiprocess mode writes there.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How often a worker copies its in-memory metrics into the shared files: a scrape that lands
# on another worker sees this one's counts at most a second old.
METRICS_SYNC_INTERVAL = 1.0
# Gauges every worker reports alike (the bans in the shared store, the listeners' PROXY
# switch from the one config): summing them would count each once per worker.
SHARED_GAUGES = frozenset({"mailedge_bans", "mailedge_listener_proxy_enabled"})
# Gauges a scrape reports as their largest worker's value: the shared ones above, and whether
# any worker's circuit breaker is open (a sum would say 2 for two workers cut off from Redis).
MAX_GAUGES = SHARED_GAUGES | {BREAKER_OPEN}


@attrs.define(repr=False)
class MetricsMirror:
    """A worker's in-memory metrics (the HTTP handler's collectors) in multiprocess files.

    prometheus-client's multiprocess mode sums what every process wrote into the directory, but
    only for its own ``Counter`` and ``Gauge`` objects; the handler's collectors read counters
    the gate keeps in memory. Every second, and on each scrape of this worker, each counter
    sample's growth is added to a multiprocess ``Counter`` of the same name and labels (summed
    over every process that ever ran, so a restart never makes a total go down), and each
    gauge sample is set on a ``livesum`` ``Gauge`` (dead workers' are dropped), or a
    ``livemax`` one for the gauges in :data:`MAX_GAUGES`.
    """

    source: CollectorRegistry
    _metrics: dict[str, Any] = attrs.field(factory=dict, init=False)
    _seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = attrs.field(
        factory=dict, init=False
    )

    @classmethod
    def for_handler(cls, handlers: Mapping[ListenerProtocol, Handler]) -> MetricsMirror:
        http = handlers.get(ListenerProtocol.HTTP)
        assert isinstance(http, HTTPHandler)
        mirror = cls(http.registry)
        exposed = CollectorRegistry()
        # /metrics syncs this worker first (collectors run in registration order), then
        # reads every worker's files.
        exposed.register(_SyncFirst(mirror))
        MultiProcessCollector(exposed)  # type: ignore[no-untyped-call]
        http.exposed = exposed
        return mirror

    async def run(self) -> None:
        while True:
            self.sync()
            await trio.sleep(METRICS_SYNC_INTERVAL)

    def sync(self) -> None:
        for family in self.source.collect():
            for sample in family.samples:
                if family.type == "counter" and not sample.name.endswith("_total"):
                    continue  # a counter's _created sample
                labels = tuple(sorted(sample.labels.items()))
                metric = self._metric(family.type, family.name, family.documentation, labels)
                if metric is None:
                    continue
                child = metric.labels(**sample.labels) if labels else metric
                if family.type == "counter":
                    key = (sample.name, labels)
                    delta = sample.value - self._seen.get(key, 0.0)
                    if delta > 0:
                        child.inc(delta)
                        self._seen[key] = sample.value
                else:
                    child.set(sample.value)

    def _metric(
        self, kind: str, name: str, documentation: str, labels: tuple[tuple[str, str], ...]
    ) -> Any:
        metric = self._metrics.get(name)
        if metric is None and kind in ("counter", "gauge"):
            names = [label for label, _ in labels]
            metric = (
                Counter(name, documentation, names, registry=None)
                if kind == "counter"
                else Gauge(
                    name,
                    documentation,
                    names,
                    registry=None,
                    multiprocess_mode="livemax" if name in MAX_GAUGES else "livesum",
                )
            )
            self._metrics[name] = metric
        return metric


@attrs.define(eq=False)
class _SyncFirst(Collector):
    """Syncs the scraped worker's mirror; contributes no metrics of its own."""

    mirror: MetricsMirror

    def collect(self) -> list[Metric]:
        self.mirror.sync()
        return []


def _mark_process_dead(directory: str) -> Callable[[int], None]:
    def mark(pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]

    return mark


def _endpoint_of(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def _announce_bound(
    document: Document, addresses: Mapping[str, Sequence[tuple[str, int]]], example: ExampleSettings
) -> None:
    """``announce``'s lines for listeners bound by the parent of ``--workers``."""
    settings = document.settings
    for conf in settings.listeners:
        networks = conf.effective_proxy_trusted_networks(settings.system)
        kind = f"PROXY from {', '.join(map(str, networks))}" if networks else "direct"
        for host, port in addresses[conf.name]:
            print(f"{conf.name:<11} {conf.protocol:<4} {format_endpoint(host, port):<16} {kind}")
        print(f"  try: {try_it(conf, addresses[conf.name], networks)}")
    print(f"mail is delivered to {example.state_dir / 'Maildir'} (new/ and cur/)")


@attrs.frozen
class Parts:
    """What the example server is made of, for ``run`` and for tests."""

    gate: ProxyGate
    handlers: dict[ListenerProtocol, Handler]
    ssl_context: ssl.SSLContext
    hooks: HookChain
    autoban: AutoBan
    console: Console


def build(
    document: Document,
    example: ExampleSettings,
    store: RateStore | None = None,
    config_path: str | None = None,
) -> Parts:
    """The gate, the policy hooks, one handler per protocol, and the demo TLS context.

    ``store`` holds the limits and bans (``[Store]``, opened by ``run``); a fresh
    ``MemoryStore`` when not given. ``config_path`` is the file the console edits.
    """
    cert, key = demo_certificate(example.state_dir, example.hostname)
    tls = server_ssl_context(str(cert), str(key))
    if store is None:
        store = MemoryStore()
    # The hooks read the gate's settings at call time, so a SIGHUP reload applies to them too.
    autoban = AutoBan(lambda: gate.settings, store)
    # The console's recent decisions; the editor writes back to the file it was started with.
    rate_limits = CountedRateLimits(lambda: gate.settings, RateLimiter(store))
    console = Console(
        config_path=config_path,
        extra_sections=(EXAMPLE_SECTION,),
        admin_token=example.admin_token,
        rate_limits=rate_limits,
    )
    # Untrusted PROXY headers count as failures towards a ban of the peer that sent them.
    # The console's ring sees every decision, so the gate builds even routine ones into events.
    gate = ProxyGate(
        document.settings, on_event=fan_out(autoban.on_gate_event, console.decisions.record)
    )
    policy: list[Hooks] = [
        # First, so a banned client is refused before it spends any rate budget.
        autoban,
        rate_limits,
    ]
    resolver = ResolverSettings.parse(example.dns_servers)
    if example.spf:
        policy.append(SPFHook(receiver=example.hostname, resolver=resolver))
    if example.dmarc:
        policy.append(DMARCHook(authserv_id=example.hostname, resolver=resolver))
    hooks = HookChain(policy)
    handlers: dict[ListenerProtocol, Handler] = {
        ListenerProtocol.SMTP: SMTPHandler(
            hostname=example.hostname,
            maildir=example.state_dir / "Maildir",
            ssl_context=tls,
            hooks=hooks,
            # AUTH PLAIN over TLS, with the same users as IMAP; bans are checked first.
            users=example.users,
            # STARTTLS's handshake honours the listener's tlsHandshakeTimeout, reloads too.
            settings=lambda: gate.settings,
        ),
        ListenerProtocol.IMAP: IMAPHandler(
            hostname=example.hostname,
            users=example.users,
            ssl_context=tls,
            hooks=hooks,
            settings=lambda: gate.settings,
            # The SMTP handler's deliveries, read-only, as every user's INBOX.
            maildir=example.state_dir / "Maildir",
        ),
        # /metrics reports the gate's decisions; /admin/ is the console (loopback, or token).
        ListenerProtocol.HTTP: HTTPHandler(
            counters_source=lambda: gate.counters, autoban=autoban, console=console
        ),
    }
    if isinstance(store, RedisStore):
        # /metrics shows the shared store too: its failure policy, round trips and slots.
        http = handlers[ListenerProtocol.HTTP]
        assert isinstance(http, HTTPHandler)
        http.registry.register(StoreCollector(store))
    return Parts(gate, handlers, tls, hooks, autoban, console)


async def run(
    document: Document,
    example: ExampleSettings,
    *,
    config_path: str | None = None,
    sockets: Mapping[str, Sequence[socket.socket]] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the example until cancelled or shut down; reports the running Server.

    ``config_path`` is the file ``document`` came from: the console edits it. The store is
    ``[Store]``'s (memory by default), open for the whole run. ``sockets``: listening sockets a
    ``--workers`` parent bound, by listener name.
    """
    async with open_store(document.settings.store) as store, trio.open_nursery() as nursery:
        parts = build(document, example, store, config_path)
        if sockets is not None and os.environ.get(MULTIPROC_ENV):
            nursery.start_soon(MetricsMirror.for_handler(parts.handlers).run)
        # serve(), written out, so that the console knows the server before it accepts anything.
        server = Server(
            settings=document.settings,
            handlers=parts.handlers,
            ssl_context=parts.ssl_context,
            gate=parts.gate,
            hooks=parts.hooks,
            sockets=sockets if sockets is not None else {},
            # With Redis, maxConnectionsPerIp counts every worker's and host's connections.
            shared_counts=store if isinstance(store, RedisStore) else None,
        )
        parts.console.server = server
        await server.run(task_status=task_status)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    sys.exit(trio.run(main))
