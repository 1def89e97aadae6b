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
import pathlib
import shutil
import ssl
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import attrs
import trio

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
from mailedge.hooks.spf import SPFHook
from mailedge.hooks.store import MemoryStore
from mailedge.networks import TrustedNetworks, format_endpoint
from mailedge.server import BindError, Handler, Server, handle_signals
from mailedge.settings import ListenerProtocol, NetworkListener
from mailedge.tls import server_ssl_context
from mailedge_examples.console import Console, CountedRateLimits
from mailedge_examples.http_handler import HTTPHandler
from mailedge_examples.imap_handler import IMAPHandler
from mailedge_examples.smtp_handler import SMTPHandler

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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        document, example = load(args.config)
    except (ConfigError, OSError) as exc:
        parser.exit(2, f"mailserver: {exc}\n")

    failed: BindError | None = None
    try:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(run, document, example, config_path=args.config))
            # Signals are caught before "ready": a SIGHUP right after it reloads, not kills.
            await nursery.start(
                partial(handle_signals, server, args.config, extra_sections=[EXAMPLE_SECTION])
            )
            announce(server, example)
    except* BindError as group:
        failed = next(e for e in group.exceptions if isinstance(e, BindError))
    if failed is not None:
        print(bind_failure(failed), file=sys.stderr)
        return 2
    return 0


@attrs.frozen
class Parts:
    """What the example server is made of, for ``run`` and for tests."""

    gate: ProxyGate
    handlers: dict[ListenerProtocol, Handler]
    ssl_context: ssl.SSLContext
    hooks: HookChain
    autoban: AutoBan
    console: Console


def build(document: Document, example: ExampleSettings, config_path: str | None = None) -> Parts:
    """The gate, the policy hooks, one handler per protocol, and the demo TLS context."""
    cert, key = demo_certificate(example.state_dir, example.hostname)
    tls = server_ssl_context(str(cert), str(key))
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
    return Parts(gate, handlers, tls, hooks, autoban, console)


async def run(
    document: Document,
    example: ExampleSettings,
    *,
    config_path: str | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the example until cancelled or shut down; reports the running Server.

    ``config_path`` is the file ``document`` came from: the console edits it.
    """
    parts = build(document, example, config_path)
    # serve(), written out, so that the console knows the server before it accepts anything.
    server = Server(
        settings=document.settings,
        handlers=parts.handlers,
        ssl_context=parts.ssl_context,
        gate=parts.gate,
        hooks=parts.hooks,
    )
    parts.console.server = server
    await server.run(task_status=task_status)


if __name__ == "__main__":
    sys.exit(trio.run(main))
