"""Misconfigurations with real proxies: what the client sees, and what mailedge says about it.

Each test takes a documented config from docs/proxies/ and breaks it in the way users do
(other-servers.md lists their pain points): the proxy's address left out of the trusted
networks, PROXY sent to a listener that has it off, a proxy that sends no header to a listener
that expects one, v1 health checks. The test checks that the connection is refused, that the
client's address is never taken from an untrusted header, and that the gate's event names the
peer and the fix, in the words docs/troubleshooting.md quotes.

The end of the module checks the docs themselves: every snippet in docs/proxies/ is run by some
test, and every mailedge TOML snippet loads.
"""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import ssl
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from interop_support import (
    DOCS,
    HAPROXY_DOC,
    PROXY_DOCS,
    Setup,
    behind_haproxy,
    behind_nginx,
    client_source_ip,
    http_get_json,
    never_seen,
    render_mailedge,
    smtp_session,
    snippets,
)

from mailedge.context import AddressSource
from mailedge.events import EventName, GateEvent

TROUBLESHOOTING = DOCS / "troubleshooting.md"
INTEROP_TESTS = Path(__file__).resolve().parent

TRUSTED = 'proxyTrustedNetworks = ["127.0.0.1", "::1"]'
SMTP_LISTENER = 'name = "smtp"\nprotocol = "smtp"\n'


def attempt(action: Callable[[], object]) -> BaseException | None:
    """Run a blocking client action that should fail; its exception, or None if it worked."""
    try:
        action()
    except (OSError, EOFError, smtplib.SMTPException, AssertionError) as exc:
        return exc
    return None


def assert_documented(phrase: str) -> None:
    """The event's wording is what docs/troubleshooting.md tells users to look for."""
    text = " ".join(TROUBLESHOOTING.read_text().split())
    assert phrase in text, f"docs/troubleshooting.md does not quote {phrase!r}"


def only_event(setup: Setup, name: EventName, listener: str) -> GateEvent:
    events = setup.mailedge.events_named(name, listener)
    assert len(events) == 1, setup.mailedge.events
    return events[0]


# -- the proxy is not trusted -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("proxy", "name", "header_start"),
    [
        ("haproxy", "haproxy-smtp-v2", r"\r\n\r\n\x00\r\nQUIT\n"),
        ("nginx", "nginx-smtp", "PROXY TCP4 "),
    ],
    ids=["haproxy", "nginx"],
)
async def test_proxy_address_missing_from_the_trusted_networks(
    tmp_path: Path, proxy: str, name: str, header_start: str
) -> None:
    """Kubernetes SNAT, a Docker bridge: the proxy connects from an address nobody listed."""
    source = client_source_ip()
    behind = behind_haproxy if proxy == "haproxy" else behind_nginx
    untrusted = 'proxyTrustedNetworks = ["10.0.0.0/8"]'
    async with behind(tmp_path, name, mailedge_edits=[(TRUSTED, untrusted)]) as setup:
        me = setup.mailedge
        error = await trio.to_thread.run_sync(
            partial(attempt, partial(smtp_session, "127.0.0.1", setup.frontend, source=source))
        )
        # Served as a direct client, the banner goes out at once; the header then arrives as
        # the client's first bytes, and the connection is closed before EHLO is answered.
        assert isinstance(error, smtplib.SMTPServerDisconnected | ConnectionResetError), error
        event = await me.wait_for_event(EventName.UNTRUSTED_HEADER, "smtp")
        assert str(event.peer_ip) == "127.0.0.1"
        assert event.peer.startswith("127.0.0.1:")
        assert event.reason == "untrusted_header"
        advice = (
            "a PROXY header arrived from 127.0.0.1, which is not trusted on listener 'smtp'. "
            "If this peer is your proxy, add '127.0.0.1' to proxyTrustedNetworks in "
            "SystemSettings (or to the listener's overrideProxyTrustedNetworks); "
            "the header was not honoured"
        )
        assert event.message == advice
        assert event.first_bytes is not None
        assert event.first_bytes.startswith(header_start)
        assert event.level >= 30  # WARNING
        # The header's client address was never used, for anything.
        assert never_seen(me.contexts, source)
        assert all(c.address_source is AddressSource.SOCKET for c in me.contexts_of("smtp"))
        assert me.count("smtp", EventName.ACCEPTED) == 0
        assert me.messages() == []
        assert_documented("which is not trusted on listener")
        assert_documented("to proxyTrustedNetworks in SystemSettings")


async def test_proxy_sent_to_a_listener_with_proxy_off(tmp_path: Path) -> None:
    """``overrideProxyTrustedNetworks = []`` turns PROXY off on a listener: refused the same way."""
    source = client_source_ip()
    proxy_off = SMTP_LISTENER + "overrideProxyTrustedNetworks = []\n"
    async with behind_haproxy(
        tmp_path, "haproxy-smtp-v2", mailedge_edits=[(SMTP_LISTENER, proxy_off)]
    ) as setup:
        me = setup.mailedge
        error = await trio.to_thread.run_sync(
            partial(attempt, partial(smtp_session, "127.0.0.1", setup.frontend, source=source))
        )
        assert error is not None
        event = await me.wait_for_event(EventName.UNTRUSTED_HEADER, "smtp")
        assert str(event.peer_ip) == "127.0.0.1"
        assert event.message.startswith(
            "a PROXY header arrived from 127.0.0.1, which is not trusted on listener 'smtp': "
            "the PROXY protocol is off on this listener (overrideProxyTrustedNetworks = []). "
            "If this peer is your proxy, list '127.0.0.1' in the listener's "
            "overrideProxyTrustedNetworks"
        ), event.message
        assert never_seen(me.contexts, source)
        assert_documented("the PROXY protocol is off on this listener")


# -- the proxy sends no header ------------------------------------------------------------------


async def test_no_header_to_a_server_first_listener_times_out(tmp_path: Path) -> None:
    """HAProxy without send-proxy in front of SMTP: the client waits for a banner in vain."""
    timeout = SMTP_LISTENER + "proxyHeaderTimeout = 1\n"
    async with behind_haproxy(
        tmp_path,
        "haproxy-smtp-v2",
        mailedge_edits=[(SMTP_LISTENER, timeout)],
        proxy_edits=[(" send-proxy-v2", "")],
    ) as setup:
        me = setup.mailedge
        error = await trio.to_thread.run_sync(
            partial(attempt, partial(smtp_session, "127.0.0.1", setup.frontend))
        )
        # No banner at all: mailedge sends nothing before the header, then closes at the timeout.
        assert isinstance(error, smtplib.SMTPServerDisconnected), error
        event = only_event(setup, EventName.TIMEOUT, "smtp")
        assert str(event.peer_ip) == "127.0.0.1"
        assert event.reason == "timeout"
        assert event.message.startswith(
            "nothing arrived within 1 s. Is the proxy configured to send a PROXY header "
            "(HAProxy: send-proxy or send-proxy-v2 on the server line; nginx: proxy_protocol on)?"
        ), event.message
        assert 'proxyHeaderMode = "optional" serves such clients' in event.message
        assert me.contexts == []
        assert_documented("nothing arrived within")


async def test_no_header_and_a_client_that_speaks_first(tmp_path: Path) -> None:
    """An SMTP client that sends EHLO without waiting for the banner (or a direct probe)."""
    async with behind_haproxy(
        tmp_path, "haproxy-smtp-v2", proxy_edits=[(" send-proxy-v2", "")]
    ) as setup:

        def impatient_client() -> bytes:
            with socket.create_connection(("127.0.0.1", setup.frontend), timeout=10) as sock:
                sock.sendall(b"EHLO impatient.mailedge.test\r\n")
                try:
                    return sock.recv(1024)
                except ConnectionResetError:
                    return b""

        reply = await trio.to_thread.run_sync(impatient_client)
        assert reply == b""  # closed without a banner or a reply
        event = await setup.mailedge.wait_for_event(EventName.REJECTED, "smtp")
        assert event.reason == "not_proxy_header"
        assert event.message.startswith(
            "an SMTP command arrived where a PROXY header was expected: the proxy is not "
            "sending PROXY headers"
        ), event.message
        assert event.first_bytes == r"EHLO impatient.mailedge.test\r\n"
        assert_documented("an SMTP command arrived where a PROXY header was expected")


async def test_no_header_to_an_http_listener(tmp_path: Path) -> None:
    async with behind_haproxy(
        tmp_path, "haproxy-http-v2-ssl", proxy_edits=[(" send-proxy-v2-ssl", "")]
    ) as setup:
        error = await trio.to_thread.run_sync(
            partial(attempt, partial(http_get_json, "127.0.0.1", setup.frontend))
        )
        assert error is not None
        event = await setup.mailedge.wait_for_event(EventName.REJECTED, "http")
        assert event.reason == "not_proxy_header"
        assert event.message.startswith(
            "an HTTP request arrived where a PROXY header was expected"
        ), event.message
        assert event.first_bytes is not None
        assert event.first_bytes.startswith("GET /whoami HTTP/1.1")
        assert_documented("an HTTP request arrived where a PROXY header was expected")


async def test_tls_passthrough_without_a_header_to_an_implicit_tls_listener(
    tmp_path: Path,
) -> None:
    """Stalwart's #2009/#645: implicit TLS behind a proxy that forwards TLS without a header."""
    async with behind_haproxy(
        tmp_path, "haproxy-smtps-passthrough", proxy_edits=[(" send-proxy-v2", "")]
    ) as setup:
        error = await trio.to_thread.run_sync(
            partial(
                attempt,
                partial(
                    smtp_session,
                    "127.0.0.1",
                    setup.frontend,
                    implicit_tls=setup.certs.client_context(),
                ),
            )
        )
        # The client's handshake dies: mailedge closes on the ClientHello.
        assert isinstance(error, ssl.SSLError | ConnectionResetError | smtplib.SMTPException), error
        event = await setup.mailedge.wait_for_event(EventName.REJECTED, "smtps")
        assert event.reason == "not_proxy_header"
        assert event.message.startswith(
            "a TLS ClientHello arrived where a PROXY header was expected"
        ), event.message
        assert event.first_bytes is not None
        assert event.first_bytes.startswith(r"\x16\x03\x01")
        assert_documented("a TLS ClientHello arrived where a PROXY header was expected")


# -- health checks ------------------------------------------------------------------------------


async def test_v1_health_checks_arrive_as_clients(tmp_path: Path) -> None:
    """Against a send-proxy (v1) server line, HAProxy's checks carry their own addresses.

    They are ordinary PROXY TCP4 lines, so mailedge cannot tell them from clients: each one is
    a client at HAProxy's address. The docs therefore keep health checks on v2 (LOCAL).
    """
    async with behind_haproxy(
        tmp_path,
        "haproxy-smtp-health-check",
        proxy_edits=[(" send-proxy-v2 proxy-v2-options crc32c", " send-proxy")],
        CHECK_INTERVAL="100ms",
    ) as setup:
        me = setup.mailedge
        await me.wait_for(
            lambda: me.count("smtp", EventName.ACCEPTED, "header") >= 2, "two v1 health checks"
        )
        assert me.count("smtp", EventName.LOCAL) == 0
        for check in me.contexts_of("smtp"):
            assert check.header is not None
            assert check.header.version == 1
            assert check.address_source is AddressSource.HEADER
            assert check.client_known  # indistinguishable from a client...
            assert str(check.client_ip) == "127.0.0.1"  # ...at HAProxy's own address
        assert me.warnings() == []
        assert_documented("send-proxy")


async def test_health_checks_to_another_port_carry_no_header(tmp_path: Path) -> None:
    """``check port N``: HAProxy sends no PROXY header with its checks (it does so only when the
    check goes where the traffic goes). mailedge waits for a header, HAProxy for a banner."""
    async with behind_haproxy(
        tmp_path,
        "haproxy-smtp-health-check",
        proxy_edits=[("check inter", "check port ${SMTP_PORT} inter")],
        CHECK_INTERVAL="100ms",
    ) as setup:
        me = setup.mailedge
        await me.wait_for(
            lambda: me.count("smtp", EventName.REJECTED, "closed") >= 1,
            "a health check closing without a header",
        )
        event = me.events_named(EventName.REJECTED, "smtp")[0]
        assert str(event.peer_ip) == "127.0.0.1"
        assert event.message.startswith("the peer closed the connection before sending anything")
        assert "check-send-proxy" in event.message
        assert event.first_bytes is None
        assert me.count("smtp", EventName.LOCAL) == 0
        await me.wait_for(lambda: " is DOWN" in setup.proxy.output(), "HAProxy marking it DOWN")
        assert_documented("the peer closed the connection before sending anything")


async def test_check_send_proxy_restores_local_headers_on_another_port(tmp_path: Path) -> None:
    """The documented fix for the previous case: ``check-send-proxy``."""
    async with behind_haproxy(
        tmp_path,
        "haproxy-smtp-health-check",
        proxy_edits=[("check inter", "check port ${SMTP_PORT} check-send-proxy inter")],
        # Not 100 ms: HAProxy's check times out after `inter`, and on a loaded machine a
        # healthy server could be marked down, which this test says must not happen.
        CHECK_INTERVAL="500ms",
    ) as setup:
        me = setup.mailedge
        await me.wait_for(lambda: me.count("smtp", EventName.LOCAL) >= 2, "two LOCAL checks")
        assert me.warnings() == []
        assert " is DOWN" not in setup.proxy.output()
        assert_documented("check-send-proxy")


async def test_tls_terminated_twice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """HAProxy terminates TLS and sends the plaintext to a ``tls = true`` listener.

    The header is fine, so the gate admits the connection (and says the client used TLS); the
    listener then waits for a ClientHello while the SMTP client waits for a banner, until the
    listener's tlsHandshakeTimeout. The server then warns, naming the mismatch: the proxy's
    header says it already terminated the client's TLS.
    """
    caplog.set_level(logging.INFO, logger="mailedge.server")
    clue = "the proxy's header says it already terminated the client's TLS"
    smtps = 'name = "smtps"\nprotocol = "smtp"\n'
    async with behind_haproxy(
        tmp_path,
        "haproxy-smtp-tls",
        mailedge_edits=[(smtps, smtps + "tlsHandshakeTimeout = 1\n")],
        proxy_edits=[("${SMTP_PORT}", "${SMTPS_PORT}")],
    ) as setup:
        me = setup.mailedge
        error = await trio.to_thread.run_sync(
            partial(
                attempt,
                partial(
                    smtp_session,
                    "127.0.0.1",
                    setup.frontend,
                    implicit_tls=setup.certs.client_context(),
                ),
            )
        )
        assert isinstance(error, smtplib.SMTPServerDisconnected), error
        assert me.count("smtps", EventName.ACCEPTED, "header") == 1
        assert me.contexts == []  # the handler was never reached
        await me.wait_for(
            lambda: any(clue in r.getMessage() for r in caplog.records),
            "the server's handshake diagnosis",
        )
        [record] = [r for r in caplog.records if clue in r.getMessage()]
        assert record.levelno == logging.WARNING
        assert "smtps" in record.getMessage()
        assert "tls=proxy>: the TLS handshake failed" in record.getMessage()
        assert_documented(clue)


# -- the docs -----------------------------------------------------------------------------------


def _doc_snippets() -> list[tuple[Path, str, str]]:
    found = []
    for doc in sorted(PROXY_DOCS.glob("*.md")):
        for name, snip in snippets(doc).items():
            found.append((doc, name, snip.language))
    return found


def test_every_doc_snippet_is_exercised_by_a_test() -> None:
    """Every ``<!-- snippet: NAME -->`` in docs/proxies/ is named by some interop test."""
    sources = "\n".join(p.read_text() for p in sorted(INTEROP_TESTS.glob("test_*.py")))
    support = (DOCS.parent / "tests" / "support" / "interop_support.py").read_text()
    found = _doc_snippets()
    assert len(found) >= 20, found
    unused = [
        f"{doc.name}: {name}"
        for doc, name, _ in found
        if not re.search(rf"[\"']{re.escape(name)}[\"']", sources + support)
    ]
    assert unused == [], f"snippets no test runs: {unused}"


def test_every_config_block_in_the_proxy_docs_is_a_snippet() -> None:
    """A proxy config or mailedge TOML in docs/proxies/ without a marker would go untested.

    Traefik's page is the exception, on purpose: no Traefik binary installs here, and its page
    says its examples are untested. It must not carry markers that would suggest otherwise.
    """
    config_languages = {"haproxy", "nginx", "caddyfile", "toml"}
    for doc in sorted(PROXY_DOCS.glob("*.md")):
        text = doc.read_text()
        if doc.name == "traefik.md":
            assert "<!-- snippet:" not in text
            assert "not exercised" in text
            continue
        blocks = re.findall(r"^```(\w*)\n", text, re.MULTILINE)
        marked = re.findall(r"^<!-- snippet: [^>]+ -->\n```(\w*)\n", text, re.MULTILINE)
        configs = [lang for lang in blocks if lang in config_languages]
        assert len(configs) == len(marked), f"{doc.name}: a config block without a marker"


@pytest.mark.parametrize(
    ("doc", "name"),
    [(doc, name) for doc, name, lang in _doc_snippets() if lang == "toml"],
    ids=lambda value: value.name if isinstance(value, Path) else str(value),
)
def test_doc_mailedge_toml_loads(doc: Path, name: str) -> None:
    settings = render_mailedge(doc, name)
    assert settings.listeners
    for listener in settings.listeners:
        # Every listener binds loopback only and trusts exactly the local proxy.
        assert all(str(bind.host) in ("127.0.0.1", "::1") for bind in listener.bind)
        trusted = listener.effective_proxy_trusted_networks(settings.system)
        assert [str(n) for n in trusted] == ["127.0.0.1/32", "::1/128"], trusted


def test_haproxy_doc_toml_serves_every_haproxy_snippet() -> None:
    """Each HAProxy snippet's backend port names a listener of the page's mailedge TOML."""
    settings = render_mailedge(HAPROXY_DOC, "haproxy-mailedge")
    placeholders = {f"${{{lst.name.upper().replace('-', '_')}_PORT}}" for lst in settings.listeners}
    for name, snip in snippets(HAPROXY_DOC).items():
        if snip.language != "haproxy" or name == "haproxy-defaults":
            continue
        used = set(re.findall(r"\$\{[A-Z_]+_PORT\}", snip.text)) - {"${FRONTEND_PORT}"}
        assert used and used <= placeholders, (name, used)
