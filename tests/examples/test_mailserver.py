"""The example mail server, end to end: real stdlib clients behind a header the test sends.

In-process tests run ``mailserver.run`` in the test's nursery on port-0 listeners, and the
blocking clients in a worker thread. The signal tests run the real script in a subprocess.
"""

from __future__ import annotations

import email
import errno
import http.client
import imaplib
import importlib.util
import ipaddress
import json
import mailbox
import os
import pathlib
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from functools import partial
from typing import TypeVar

import attrs
import pytest
import trio
from mailedge_examples import mailserver
from mailserver_support import CLIENT_TIMEOUT, EXAMPLES, Script, scrape_metrics
from proxied_clients import ProxiedHTTPConnection, ProxiedIMAP4, ProxiedSMTP
from redis_support import RedisServer

from mailedge.config import ConfigError, loads_document
from mailedge.proxy import (
    TLV,
    ClientFlags,
    Command,
    InetAddress,
    SSLInfo,
    TLVType,
    encode_v1,
    encode_v2,
)
from mailedge.server import Server, serve
from mailedge.settings import ListenerProtocol


def load_script(name: str) -> types.ModuleType:
    """An example script (not part of the mailedge_examples package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


embed = load_script("embed")

CLIENT = InetAddress(ipaddress.ip_address("198.51.100.7"), 40123)
CLIENT6 = InetAddress(ipaddress.ip_address("2001:db8::7"), 40123)
SERVER = InetAddress(ipaddress.ip_address("192.0.2.25"), 25)
SERVER6 = InetAddress(ipaddress.ip_address("2001:db8::25"), 25)

T = TypeVar("T")

CONFIG = """\
[SystemSettings]
proxyTrustedNetworks = ["127.0.0.0/8", "::1"]

[[NetworkListener]]
name = "smtp"
protocol = "smtp"
bind = ["127.0.0.1:0", "[::1]:0"]

[[NetworkListener]]
name = "imap"
protocol = "imap"
bind = ["127.0.0.1:0"]

[[NetworkListener]]
name = "http"
protocol = "http"
bind = ["127.0.0.1:0"]

[[NetworkListener]]
name = "smtps"
protocol = "smtp"
bind = ["127.0.0.1:0"]
tls = true

[Example]
hostname = "mx.mailedge.test"
stateDir = "{state}"
users = {{ demo = "demo-password" }}
"""


async def blocking(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: pathlib.Path) -> Server:
    document = loads_document(
        CONFIG.format(state=tmp_path), format="toml", extra_sections=["Example"]
    )
    example = mailserver.ExampleSettings.from_table(document.extra["Example"])
    started: Server = await nursery.start(partial(mailserver.run, document, example))
    return started


def address(server: Server, name: str, family: int = 4) -> tuple[str, int]:
    return next((h, p) for h, p in server.addresses[name] if (":" in h) == (family == 6))


def maildir(tmp_path: pathlib.Path) -> list[email.message.Message]:
    box = mailbox.Maildir(tmp_path / "Maildir", create=False)
    return [email.message_from_bytes(box.get_bytes(key)) for key in box.iterkeys()]


def trust_demo_cert(tmp_path: pathlib.Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tmp_path / "demo-cert.pem"))
    context.check_hostname = False  # the demo certificate names mx.mailedge.test, not 127.0.0.1
    return context


MESSAGE = b"From: a@example.org\r\nTo: demo@mailedge.test\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.mark.parametrize(
    ("header", "family", "client"),
    [
        (encode_v1(CLIENT, SERVER), 4, "198.51.100.7"),
        (encode_v2(Command.PROXY, CLIENT, SERVER), 4, "198.51.100.7"),
        (encode_v2(Command.PROXY, CLIENT6, SERVER6), 6, "2001:db8::7"),
    ],
)
async def test_smtplib_sees_the_recovered_client(
    server: Server, tmp_path: pathlib.Path, header: bytes, family: int, client: str
) -> None:
    host, port = address(server, "smtp", family)

    def session() -> tuple[int, bytes]:
        with ProxiedSMTP(header, host, port, timeout=CLIENT_TIMEOUT) as smtp:
            code, text = smtp.ehlo("client.example")
            smtp.sendmail("a@example.org", ["demo@mailedge.test"], MESSAGE)
            return code, text

    code, text = await blocking(session)
    assert code == 250
    assert text.splitlines()[0] == f"mx.mailedge.test Hello client.example [{client}]".encode()
    (message,) = maildir(tmp_path)
    assert f"[{client}]" in message["Received"]
    assert "127.0.0.1" not in message["Received"] and "::1" not in message["Received"]


async def test_smtplib_starttls_puts_the_version_in_received(
    server: Server, tmp_path: pathlib.Path
) -> None:
    host, port = address(server, "smtp")
    tls = trust_demo_cert(tmp_path)

    def session() -> None:
        with ProxiedSMTP(encode_v1(CLIENT, SERVER), host, port, timeout=CLIENT_TIMEOUT) as smtp:
            smtp.starttls(context=tls)
            smtp.ehlo("client.example")
            smtp.sendmail("a@example.org", ["demo@mailedge.test"], MESSAGE)

    await blocking(session)
    (message,) = maildir(tmp_path)
    received = " ".join(message["Received"].split())
    assert "[198.51.100.7]" in received
    assert "version=TLSv1.3" in received and "ESMTPS" in received


async def test_implicit_tls_after_the_header(server: Server, tmp_path: pathlib.Path) -> None:
    host, port = address(server, "smtps")
    tls = trust_demo_cert(tmp_path)

    def session() -> bytes:
        with socket.create_connection((host, port), CLIENT_TIMEOUT) as raw:
            raw.sendall(encode_v2(Command.PROXY, CLIENT, SERVER))
            with tls.wrap_socket(raw, server_hostname="mx.mailedge.test") as sock:
                banner = sock.recv(1024)
                sock.sendall(b"EHLO x\r\n")
                reply = b""
                while not reply.endswith(b"250 SMTPUTF8\r\n") and len(reply) < 4096:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                return banner + reply

    text = await blocking(session)
    assert text.startswith(b"220 mx.mailedge.test")
    assert b"Hello x [198.51.100.7]" in text
    assert b"STARTTLS" not in text  # already TLS, terminated by this server


async def test_imaplib_login_needs_tls_unless_the_proxy_terminated_it(server: Server) -> None:
    host, port = address(server, "imap")

    def plain() -> tuple[tuple[object, ...], str]:
        imap = ProxiedIMAP4(encode_v2(Command.PROXY, CLIENT, SERVER), host, port)
        try:
            caps = imap.capabilities
            try:
                imap.login("demo", "demo-password")
            except imaplib.IMAP4.error as exc:
                return caps, str(exc)
            return caps, "logged in"
        finally:
            imap.logout()

    def via_tls_proxy() -> str:
        ssl_info = SSLInfo(client=ClientFlags.SSL, verify=0, version="TLSv1.3")
        header = encode_v2(Command.PROXY, CLIENT, SERVER, ssl=ssl_info)
        imap = ProxiedIMAP4(header, host, port)
        try:
            typ, _ = imap.login("demo", "demo-password")
            return str(typ)
        finally:
            imap.logout()

    caps, outcome = await blocking(plain)
    assert "LOGINDISABLED" in caps
    assert "PRIVACYREQUIRED" in outcome
    assert await blocking(via_tls_proxy) == "OK"


async def test_whoami_over_http_client(server: Server) -> None:
    host, port = address(server, "http")
    header = encode_v2(
        Command.PROXY,
        CLIENT,
        SERVER,
        tlvs=[TLV(TLVType.AUTHORITY, b"mail.example.org")],
        ssl=SSLInfo(client=ClientFlags.SSL, verify=0, version="TLSv1.2", cipher="AES128-SHA"),
    )

    def get() -> dict[str, object]:
        conn = ProxiedHTTPConnection(header, host, port)
        try:
            conn.request("GET", "/whoami")
            response = conn.getresponse()
            assert response.status == 200
            data: dict[str, object] = json.loads(response.read())
            return data
        finally:
            conn.close()

    whoami = await blocking(get)
    assert whoami["client_ip"] == "198.51.100.7"
    assert whoami["client_port"] == 40123
    assert whoami["proxied"] is True
    assert whoami["tls"] is True
    assert whoami["tls_terminated_by"] == "proxy"
    assert whoami["sni"] == "mail.example.org"
    assert whoami["listener"] == "http"


def test_embedded_default_loads_and_announces_what_to_try() -> None:
    document, example = mailserver.load(None)
    names = [conf.name for conf in document.settings.listeners]
    assert names == ["smtp", "imap", "http", "smtp-proxy", "imap-proxy", "http-proxy"]
    for conf in document.settings.listeners:
        for bind in conf.bind:
            assert ipaddress.ip_address(bind.host).is_loopback
    assert example.users == {"demo": "demo-password"}


# -- the real script, with real signals ------------------------------------------------------


@pytest.fixture
def script_config(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "mailserver.toml"
    path.write_text(
        '[SystemSettings]\nproxyTrustedNetworks = ["10.0.0.0/8"]\n\n'
        '[[NetworkListener]]\nname = "smtp"\nprotocol = "smtp"\nbind = ["127.0.0.1:0"]\n\n'
        f'[Example]\nstateDir = "{tmp_path}"\n'
    )
    return path


@pytest.fixture
def script(tmp_path: pathlib.Path, script_config: pathlib.Path) -> Iterator[Script]:
    running = Script(tmp_path, "--config", str(script_config))
    try:
        yield running
    finally:
        running.close()


def ehlo_line(address: tuple[str, int]) -> bytes:
    with ProxiedSMTP(encode_v1(CLIENT, SERVER), *address, timeout=CLIENT_TIMEOUT) as smtp:
        return smtp.ehlo("client.example")[1].splitlines()[0]


def test_sighup_reloads_trusted_networks(script: Script, script_config: pathlib.Path) -> None:
    smtp = script.address("smtp")
    # 127.0.0.1 is not trusted yet: the header is refused, never honoured.
    with pytest.raises(smtplib.SMTPServerDisconnected):
        ehlo_line(smtp)
    script.wait_for_log("proxy.untrusted_header")

    # A broken file keeps the running settings, and says why.
    good = script_config.read_text()
    script_config.write_text(good.replace('"10.0.0.0/8"', '"10.0.0.300/8"'))
    script.process.send_signal(signal.SIGHUP)
    script.wait_for_log("reload of")
    assert "10.0.0.300/8" in script.log.read_text()

    script_config.write_text(good.replace('"10.0.0.0/8"', '"127.0.0.0/8"'))
    script.process.send_signal(signal.SIGHUP)
    script.wait_for_log("reloaded settings")
    assert ehlo_line(smtp).endswith(b"[198.51.100.7]")


def test_sigterm_drains_an_open_session_and_delivers_it(
    tmp_path: pathlib.Path, script_config: pathlib.Path
) -> None:
    script_config.write_text(script_config.read_text().replace("10.0.0.0/8", "127.0.0.0/8"))
    script = Script(tmp_path, "--config", str(script_config))
    try:
        address = script.address("smtp")
        with ProxiedSMTP(encode_v1(CLIENT, SERVER), *address, timeout=CLIENT_TIMEOUT) as smtp:
            smtp.ehlo("client.example")
            smtp.mail("a@example.org")
            smtp.rcpt("demo@mailedge.test")
            code, _ = smtp.docmd("DATA")
            assert code == 354
            script.process.send_signal(signal.SIGTERM)
            script.wait_for_log("draining open sessions")
            # New connections are refused while the open one finishes.
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(address, CLIENT_TIMEOUT).close()
            smtp.send(MESSAGE + b".\r\n")
            code, text = smtp.getreply()
            assert code == 250, text
            smtp.quit()
        assert script.process.wait(timeout=CLIENT_TIMEOUT) == 0
    finally:
        script.close()
    (message,) = maildir(tmp_path)
    assert message["Subject"] == "hi"


def busy(addresses: list[tuple[str, str, int]]) -> list[str]:
    """Which of ``addresses`` (listener, host, port) another process listens on, as
    ``"smtp 127.0.0.1:2525"``. Bound as the server binds (``SO_REUSEADDR``, so a closed
    connection's TIME_WAIT does not count), and closed at once."""
    taken = []
    for name, host, port in addresses:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                taken.append(
                    f"{name} {host}:{port}"
                    if family == socket.AF_INET
                    else f"{name} [{host}]:{port}"
                )
    return taken


def embedded_default_addresses() -> list[tuple[str, str, int]]:
    document, _ = mailserver.load(None)
    return [
        (conf.name, str(bind.host), bind.port)
        for conf in document.settings.listeners
        for bind in conf.bind
    ]


def test_a_busy_port_is_named() -> None:
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        assert busy([("smtp", "127.0.0.1", port)]) == [f"smtp 127.0.0.1:{port}"]
    assert busy([("smtp", "127.0.0.1", port)]) == []


def test_embedded_default_starts_and_answers(tmp_path: pathlib.Path) -> None:
    # The embedded default's fixed ports, as `make serve` binds them: a server already on
    # one (a stray `make serve`) would make this fail for a reason that is not the code's.
    taken = busy(embedded_default_addresses())
    if taken:
        pytest.fail(
            f"the embedded default's ports are in use: {', '.join(taken)}. This test runs "
            "examples/mailserver.py on them, as `make serve` does; stop the server that "
            "holds them (`ss -ltnp` names it) and run the test again."
        )
    script = Script(tmp_path)
    try:
        assert sorted(script.listeners) == sorted(
            ["smtp", "imap", "http", "smtp-proxy", "imap-proxy", "http-proxy"]
        )
        # The direct listener greets a direct client, whose address is the socket's.
        with smtplib.SMTP(*script.address("smtp"), timeout=CLIENT_TIMEOUT) as smtp:
            assert smtp.ehlo("x")[1].splitlines()[0].endswith(b"[127.0.0.1]")
        # The proxy listener believes a header from loopback.
        assert ehlo_line(script.address("smtp-proxy")).endswith(b"[198.51.100.7]")
        assert os.path.exists(tmp_path / ".mailedge-demo" / "demo-cert.pem")
        tries = [line.strip() for line in script.announced if line.strip().startswith("try:")]
        assert len(tries) == 6
        # Run from tmp_path, the venv's mailedge is named by its path (issue 13, item 1).
        assert any(
            t.startswith("try: ")
            and t.endswith("probe smtp 127.0.0.1:3525 --client 203.0.113.7:40000")
            for t in tries
        ), tries
        # Where mail goes and how to log in, for the newcomer (issue 13, item 5).
        announced = "".join(script.announced)
        assert "mail is delivered to .mailedge-demo/Maildir" in announced
        assert "demo / demo-password" in announced
    finally:
        script.close()


async def test_the_embedding_example_serves_its_handler(nursery: trio.Nursery) -> None:
    settings = embed.SETTINGS
    listener = settings.listeners[0]
    port0 = attrs.evolve(listener, bind=(attrs.evolve(listener.bind[0], port=0),))
    running: Server = await nursery.start(
        partial(
            serve, attrs.evolve(settings, listeners=(port0,)), {ListenerProtocol.SMTP: embed.hello}
        )
    )
    stream = await trio.open_tcp_stream(*running.addresses["smtp"][0])
    async with stream:
        await stream.send_all(encode_v1(CLIENT, SERVER) + b"QUIT\r\n")
        replies = b""
        while chunk := await stream.receive_some():
            replies += chunk
    assert replies == b"220 you are 198.51.100.7 (header)\r\n221 bye\r\n"
    nursery.cancel_scope.cancel()


BAN_CONFIG = """\
[SystemSettings]
proxyTrustedNetworks = ["10.0.0.0/8"]

[AutoBan]
failures = 2

[[NetworkListener]]
name = "smtp"
protocol = "smtp"
bind = ["127.0.0.1:0"]

[[NetworkListener]]
name = "http"
protocol = "http"
bind = ["127.0.0.1:0"]

[Example]
stateDir = "{state}"
"""


async def test_spoofing_peers_are_banned_and_the_ban_can_be_lifted(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    """The example wires auto-ban to the gate: untrusted PROXY headers earn a ban."""
    document = loads_document(
        BAN_CONFIG.format(state=tmp_path), format="toml", extra_sections=["Example"]
    )
    example = mailserver.ExampleSettings.from_table(document.extra["Example"])
    running: Server = await nursery.start(partial(mailserver.run, document, example))
    smtp = address(running, "smtp")

    async def spoof() -> bytes:
        # From 127.0.0.2, so that the admin calls below, from 127.0.0.1, are not banned too.
        stream = await trio.open_tcp_stream(*smtp, local_address="127.0.0.2")
        async with stream:
            banner = await stream.receive_some()
            await stream.send_all(encode_v1(CLIENT, SERVER))
            while await stream.receive_some():
                pass
        return bytes(banner)

    # 127.0.0.2 is not a trusted proxy here: its headers are refused, and counted.
    assert (await spoof()).startswith(b"220 ")
    assert (await spoof()).startswith(b"220 ")
    assert (await spoof()).startswith(b"421 4.7.0 ")  # banned, refused right after the gate

    def admin(method: str, path: str) -> tuple[int, object]:
        conn = http.client.HTTPConnection(*address(running, "http"), timeout=CLIENT_TIMEOUT)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    status, bans = await blocking(partial(admin, "GET", "/admin/bans"))
    assert status == 200
    assert isinstance(bans, list) and [ban["key"] for ban in bans] == ["127.0.0.2"]
    status, _ = await blocking(partial(admin, "POST", "/admin/bans/lift?ip=127.0.0.2"))
    assert status == 200
    assert (await spoof()).startswith(b"220 ")


# -- the first hour (issue 13): what a newcomer sees and pastes ------------------------------

ROOT = EXAMPLES.parent


def fresh_shell_env() -> dict[str, str]:
    """The environment of a shell where the venv was never activated: no .venv/bin on PATH."""
    venv_bin = str(pathlib.Path(sys.prefix) / "bin")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(path or ["/usr/bin", "/bin"])
    return env


def proxy_config(tmp_path: pathlib.Path, trusted: str = "127.0.0.0/8") -> pathlib.Path:
    path = tmp_path / "proxy.toml"
    path.write_text(
        f'[SystemSettings]\nproxyTrustedNetworks = ["{trusted}"]\n\n'
        '[[NetworkListener]]\nname = "smtp-proxy"\nprotocol = "smtp"\nbind = ["127.0.0.1:0"]\n\n'
        f'[Example]\nstateDir = "{tmp_path}"\n'
    )
    return path


def try_lines(script: Script) -> list[str]:
    return [
        line.strip().removeprefix("try: ")
        for line in script.announced
        if line.strip().startswith("try:")
    ]


def test_the_printed_probe_runs_as_pasted_in_the_project_directory(
    tmp_path: pathlib.Path,
) -> None:
    env = fresh_shell_env()
    script = Script(tmp_path, "--config", str(proxy_config(tmp_path)), cwd=ROOT, env=env)
    try:
        (command,) = try_lines(script)
        assert " probe smtp 127.0.0.1:" in command
        pasted = subprocess.run(
            ["bash", "-c", command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert pasted.returncode == 0, pasted.stdout + pasted.stderr
        assert "MATCH" in pasted.stdout
    finally:
        script.close()


def test_a_listener_trusting_other_networks_gets_no_loopback_probe(script: Script) -> None:
    (line,) = try_lines(script)
    assert "PROXY only from 10.0.0.0/8" in line
    assert "--source" in line
    assert not line.startswith(("mailedge probe", "/", ".venv"))


def occupied_port() -> Iterator[tuple[socket.socket, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("bind", "error", "hint"),
    [
        ("127.0.0.1:{port}", "Address already in use", "ss -ltnp"),
        ("192.0.2.1:2525", "Cannot assign requested address", "ip -brief address"),
    ],
)
def test_a_bind_failure_is_one_line_and_status_2(
    tmp_path: pathlib.Path, bind: str, error: str, hint: str
) -> None:
    for _, port in occupied_port():
        config = tmp_path / "bind.toml"
        address = bind.format(port=port)
        config.write_text(
            f'[[NetworkListener]]\nname = "mx"\nprotocol = "smtp"\nbind = ["{address}"]\n\n'
            f'[Example]\nstateDir = "{tmp_path}"\n'
        )
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / "mailserver.py"), "--config", str(config)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "'mx'" in lines[0] and address in lines[0]
        assert error in lines[0] and hint in lines[0]


def proxied_smtp(address: tuple[str, int]) -> ProxiedSMTP:
    return ProxiedSMTP(encode_v1(CLIENT, SERVER), *address, timeout=CLIENT_TIMEOUT)


def test_sigterm_tells_an_idle_session_421_and_stops_at_once(tmp_path: pathlib.Path) -> None:
    script = Script(tmp_path, "--config", str(proxy_config(tmp_path)))
    try:
        with proxied_smtp(script.address("smtp-proxy")) as smtp:
            smtp.ehlo("client.example")
            script.process.send_signal(signal.SIGTERM)
            code, text = smtp.getreply()
            assert code == 421, text
            assert text.startswith(b"4.3.2 ") and b"shutting down" in text
        started = time.monotonic()
        assert script.process.wait(timeout=CLIENT_TIMEOUT) == 0
        # Nothing waited for the 30 s drain.
        assert time.monotonic() - started < 5
        assert script.log.read_text().rstrip().endswith("stopped")
    finally:
        script.close()


def test_a_second_signal_closes_a_draining_session(tmp_path: pathlib.Path) -> None:
    script = Script(tmp_path, "--config", str(proxy_config(tmp_path)))
    try:
        with proxied_smtp(script.address("smtp-proxy")) as smtp:
            smtp.ehlo("client.example")
            smtp.mail("a@example.org")  # mid-transaction: it gets the drain time
            script.process.send_signal(signal.SIGINT)
            script.wait_for_log("draining 1 session(s) until ")
            log = script.log.read_text()
            assert "ending" not in log  # the transaction was not cut
            assert re.search(r"until \d\d:\d\d:\d\d", log)
            script.process.send_signal(signal.SIGINT)
            assert script.process.wait(timeout=CLIENT_TIMEOUT) == 0
            with pytest.raises(smtplib.SMTPServerDisconnected):
                smtp.rcpt("demo@mailedge.test")
        log = script.log.read_text()
        assert "SIGINT again" in log and "closing 1 open session(s) now" in log
        assert log.rstrip().endswith("stopped")
    finally:
        script.close()


def test_an_idle_imap_session_gets_bye_at_shutdown(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "imap.toml"
    config.write_text(
        '[[NetworkListener]]\nname = "imap"\nprotocol = "imap"\nbind = ["127.0.0.1:0"]\n'
        "overrideProxyTrustedNetworks = []\n\n"
        f'[Example]\nstateDir = "{tmp_path}"\n'
    )
    script = Script(tmp_path, "--config", str(config))
    try:
        with socket.create_connection(script.address("imap"), CLIENT_TIMEOUT) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"* OK")
            script.process.send_signal(signal.SIGTERM)
            assert reader.readline().startswith(b"* BYE mx.mailedge.test shutting down")
        assert script.process.wait(timeout=CLIENT_TIMEOUT) == 0
    finally:
        script.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log-level", "verbose"], "invalid choice: 'VERBOSE'"),
        (["--config", "missing.toml"], "missing.toml: there is no such config file (relative to"),
    ],
)
def test_bad_arguments_are_one_sentence_not_a_traceback(
    tmp_path: pathlib.Path, args: list[str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "mailserver.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_example_table_errors_name_the_file_and_suggest(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text(
        '[[NetworkListener]]\nname = "smtp"\nprotocol = "smtp"\nbind = ["127.0.0.1:0"]\n\n'
        '[Example]\nhostnme = "mx.example"\n'
    )
    with pytest.raises(ConfigError) as caught:
        mailserver.load(str(config))
    assert str(caught.value) == (
        f"{config}: Example: unknown key 'hostnme' (did you mean 'hostname'?)"
    )


def test_send_with_swaks_and_read_it_back_with_imaplib(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "demo.toml"
    config.write_text(
        '[[NetworkListener]]\nname = "smtp"\nprotocol = "smtp"\nbind = ["127.0.0.1:0"]\n'
        "overrideProxyTrustedNetworks = []\n\n"
        '[[NetworkListener]]\nname = "imap"\nprotocol = "imap"\nbind = ["127.0.0.1:0"]\n'
        "overrideProxyTrustedNetworks = []\n\n"
        f'[Example]\nstateDir = "{tmp_path}"\nusers = {{ demo = "demo-password" }}\n'
    )
    script = Script(tmp_path, "--config", str(config))
    try:
        for subject in ("first", "second"):
            sent = subprocess.run(
                [
                    "swaks",
                    "--server",
                    "{}:{}".format(*script.address("smtp")),
                    "--from",
                    "newcomer@example.org",
                    "--to",
                    "demo@mailedge.test",
                    "--header",
                    f"Subject: {subject}",
                    "--body",
                    f"the {subject} message",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert sent.returncode == 0, sent.stdout + sent.stderr

        imap = imaplib.IMAP4(*script.address("imap"), timeout=CLIENT_TIMEOUT)
        try:
            imap.starttls(trust_demo_cert(tmp_path))
            imap.login("demo", "demo-password")
            # SELECT works too, but says READ-ONLY, which imaplib reports as an error.
            with pytest.raises(imaplib.IMAP4.readonly):
                imap.select("INBOX")
            typ, count = imap.select("INBOX", readonly=True)
            assert (typ, count) == ("OK", [b"2"])
            typ, found = imap.search(None, "ALL")
            assert found == [b"1 2"]
            typ, data = imap.fetch("1", "(RFC822)")
            first = data[0]
            assert isinstance(first, tuple)
            assert email.message_from_bytes(first[1])["Subject"] == "first"
            typ, data = imap.uid("FETCH", "2", "(FLAGS RFC822.SIZE BODY.PEEK[])")
            second = data[0]
            assert isinstance(second, tuple)
            assert b"UID 2" in second[0] and b"FLAGS ()" in second[0]
            size = int(re.search(rb"RFC822.SIZE (\d+)", second[0])[1])  # type: ignore[index]
            assert size == len(second[1])
            assert b"the second message" in second[1]
            # Read-only: nothing can change the Maildir.
            typ, data = imap.store("1", "+FLAGS", "\\Deleted")
            assert typ == "NO" and b"read-only" in data[0]  # type: ignore[operator]
        finally:
            imap.logout()
        assert len(maildir(tmp_path)) == 2
    finally:
        script.close()


def test_sighup_logs_what_changed_and_which_listener_cannot_rebind(
    script: Script, script_config: pathlib.Path
) -> None:
    good = script_config.read_text()
    script_config.write_text(good.replace('"10.0.0.0/8"', '"127.0.0.0/8"'))
    script.process.send_signal(signal.SIGHUP)
    script.wait_for_log("reloaded settings")
    assert "reload: listener smtp: trusted networks [10.0.0.0/8] -> [127.0.0.0/8]" in (
        script.log.read_text()
    )
    script_config.write_text(good.replace('"127.0.0.1:0"', '"127.0.0.1:1"'))
    script.process.send_signal(signal.SIGHUP)
    script.wait_for_log("reload of")
    assert "listener 'smtp' binds 127.0.0.1:1 instead of 127.0.0.1:0" in script.log.read_text()


def test_a_config_without_listeners_is_refused(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "empty.toml"
    config.write_text('[SystemSettings]\nproxyTrustedNetworks = ["10.0.0.0/8"]\n')
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "mailserver.py"), "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"{config}: there are no [[NetworkListener]] tables" in done.stderr


# -- scale-out (issue 11): [Store], --workers ----------------------------------------------------


def store_config(tmp_path: pathlib.Path, redis: RedisServer, name: str) -> pathlib.Path:
    path = tmp_path / f"{name}.toml"
    (tmp_path / name).mkdir(exist_ok=True)
    path.write_text(
        BAN_CONFIG.format(state=tmp_path / name)
        + f'\n[Store]\nbackend = "redis"\nurl = "{redis.url}"\ntimeout = 1\n'
    )
    return path


def spoof(address: tuple[str, int]) -> bytes:
    """An untrusted PROXY header from 127.0.0.2 (a failure towards a ban); the first reply."""
    with socket.create_connection(
        address, timeout=CLIENT_TIMEOUT, source_address=("127.0.0.2", 0)
    ) as sock:
        banner = sock.recv(200)
        if banner.startswith(b"220 "):
            sock.sendall(encode_v1(CLIENT, SERVER))
            while sock.recv(200):
                pass
        return banner


def test_two_example_servers_share_a_ban_through_redis(
    tmp_path: pathlib.Path, redis_server: RedisServer
) -> None:
    one = Script(tmp_path / "one", "--config", str(store_config(tmp_path, redis_server, "one")))
    try:
        two = Script(tmp_path / "two", "--config", str(store_config(tmp_path, redis_server, "two")))
        try:
            # Two failures on the first server ban 127.0.0.2 there ...
            assert spoof(one.address("smtp")).startswith(b"220 ")
            assert spoof(one.address("smtp")).startswith(b"220 ")
            assert spoof(one.address("smtp")).startswith(b"421 4.7.0 ")
            # ... and on the second, which saw none: connections that send nothing (no
            # failure of their own) are refused once the ban has arrived, within ms.
            deadline = time.monotonic() + CLIENT_TIMEOUT
            while not banner_from(two.address("smtp"), "127.0.0.2").startswith(b"421 4.7.0 "):
                assert time.monotonic() < deadline, two.log.read_text()
                time.sleep(0.05)
        finally:
            two.close()
    finally:
        one.close()


def test_more_than_one_worker_with_the_memory_store_is_refused(tmp_path: pathlib.Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "mailserver.py"), "--workers", "2"],
        cwd=tmp_path,
        capture_output=True,
        timeout=CLIENT_TIMEOUT,
    )
    assert done.returncode == 2
    assert done.stdout == b""
    assert done.stderr.decode() == (
        'mailserver: --workers 2 needs a shared store ([Store] backend = "redis"): with the '
        "memory store every rate limit, ban and per-IP count would be per worker, 2 times "
        "looser than configured\n"
    )


def test_workers_serve_one_port_and_metrics_count_every_worker(
    tmp_path: pathlib.Path, redis_server: RedisServer
) -> None:
    config = store_config(tmp_path, redis_server, "workers")
    script = Script(tmp_path, "--config", str(config), "--workers", "2")
    try:
        assert any(line.startswith("workers: 2, pids [") for line in script.announced)
        http_address = script.address("http")
        for _ in range(20):
            assert ehlo_banner(script.address("smtp")).startswith(b"220 ")

        def decisions() -> float:
            text = scrape_metrics(http_address)
            return sum(
                float(line.rpartition(" ")[2])
                for line in text.splitlines()
                if line.startswith("mailedge_gate_decisions_total{") and 'listener="smtp"' in line
            )

        # Each worker copies its counts into the shared files within a second: every
        # connection, whichever worker took it, is in the total.
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while decisions() < 20:
            assert time.monotonic() < deadline, script.log.read_text()
            time.sleep(0.1)
        assert decisions() == 20
        # A gauge every worker reports alike is reported once, not once per worker.
        text = scrape_metrics(http_address)
        proxy_on = [
            line
            for line in text.splitlines()
            if line.startswith("mailedge_listener_proxy_enabled{") and 'listener="smtp"' in line
        ]
        assert [float(line.rpartition(" ")[2]) for line in proxy_on] == [1.0]
        script.process.send_signal(signal.SIGTERM)
        assert script.process.wait(timeout=CLIENT_TIMEOUT) == 0
        assert script.log.read_text().count(") exited: 0") == 2
    finally:
        script.close()


def ehlo_banner(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as sock:
        return sock.recv(200)


def banner_from(address: tuple[str, int], source: str) -> bytes:
    """The first reply to a connection from ``source`` that then closes, sending nothing."""
    with socket.create_connection(
        address, timeout=CLIENT_TIMEOUT, source_address=(source, 0)
    ) as sock:
        return sock.recv(200)
