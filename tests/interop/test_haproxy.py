"""HAProxy 2.6 in front of mailedge: every config in docs/proxies/haproxy.md, with real clients.

Each test renders one HAProxy snippet and the page's mailedge TOML, starts mailedge in-process
and HAProxy as a subprocess, sends a real client through HAProxy, and checks what the server
recovered: the client's address and port, the header's version and TLVs, and TLS.

Clients connect from 127.0.0.2 where the system has it (Linux), and HAProxy connects to
mailedge from 127.0.0.1, so "the client came from the header" shows in the address itself.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import ssl
from pathlib import Path

import interop_checks
import pytest
from interop_checks import LOOPBACK, assert_quiet, received_header
from interop_support import (
    CLIENT_CN,
    HAPROXY_DOC,
    HOSTNAME,
    behind_haproxy,
    client_source_ip,
    curl_bin,
    ipv6_available,
    make_certs,
    missing,
    render_mailedge,
    run_client,
    running_mailedge,
)

from mailedge.context import AddressSource, TLSTerminator
from mailedge.events import EventName
from mailedge.proxy import ClientFlags, Command, Family

# -- SMTP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "version"), [("haproxy-smtp-v1", 1), ("haproxy-smtp-v2", 2)])
async def test_smtp_client_address_reaches_ehlo_and_received(
    tmp_path: Path, name: str, version: int
) -> None:
    source = client_source_ip()
    async with behind_haproxy(tmp_path, name) as setup:
        context, received = await interop_checks.smtp_from_header(setup, source, version=version)
        assert context.proxied
        assert context.header is not None
        assert context.header.tlvs == ()
        assert received.startswith(
            f"Received: from client.mailedge.test ([{source}]) by {HOSTNAME} (mailedge example)"
            " with ESMTP id "
        )
        assert_quiet(setup)


async def test_smtp_v2_crc32c_and_unique_id(tmp_path: Path) -> None:
    source = client_source_ip()
    async with behind_haproxy(tmp_path, "haproxy-smtp-v2-crc32c-unique-id") as setup:
        me = setup.mailedge
        result = await setup.smtp(source=source)
        context = me.context_for_client_port("smtp", result.local[1])
        assert context.header is not None
        assert context.header.crc32c_verified
        assert context.unique_id is not None
        unique_id = context.unique_id.decode()
        # unique-id-format %{+X}o %ci:%cp_%fi:%fp_...: the client and frontend, in hex.
        client_hex = ipaddress.ip_address(source).packed.hex().upper()
        assert unique_id.startswith(
            f"{client_hex}:{result.local[1]:04X}_7F000001:{setup.frontend:04X}_"
        ), unique_id
        # The same id is in HAProxy's log line (log-format "%ID ..."), written at session end.
        await me.wait_for(lambda: unique_id in setup.proxy.output(), "HAProxy's log line")
        assert_quiet(setup)


async def test_health_checks_send_local_and_stay_quiet(tmp_path: Path) -> None:
    async with behind_haproxy(
        tmp_path,
        "haproxy-smtp-health-check",
        # Half a second: HAProxy's check times out after `inter`, and a loaded machine can
        # take longer than 100 ms to answer one, marking the server down.
        CHECK_INTERVAL="500ms",
    ) as setup:
        me = setup.mailedge
        await me.wait_for(
            lambda: me.count("smtp", EventName.LOCAL, "local") >= 2, "two LOCAL health checks"
        )
        # A client still gets through while the checks run.
        source = client_source_ip()
        result = await setup.smtp(source=source)
        assert result.ehlo[0].endswith(f"[{source}]")

        checks = [c for c in me.contexts_of("smtp") if c.client_port != result.local[1]]
        assert checks
        for check in checks:
            assert check.address_source is AddressSource.PROXY_LOCAL
            assert not check.client_known
            assert check.header is not None
            assert check.header.command is Command.LOCAL
            assert check.header.family is Family.UNSPEC
            assert check.header.crc32c_verified
            assert check.client_ip == LOOPBACK == check.peer_ip
        assert me.count("smtp", EventName.ACCEPTED) == 1  # only the client
        assert_quiet(setup)
        # HAProxy saw its checks pass (smtpchk: banner, EHLO, QUIT): never marked DOWN.
        assert " is DOWN" not in setup.proxy.output(), setup.proxy.output()


async def test_ipv6_frontend(tmp_path: Path) -> None:
    if not ipv6_available():
        missing("IPv6 loopback (::1) is not available on this machine")
    async with behind_haproxy(tmp_path, "haproxy-smtp-ipv6", frontend_host="::1") as setup:
        me = setup.mailedge
        result = await setup.smtp(host="::1")
        assert result.ehlo[0] == f"{HOSTNAME} Hello client.mailedge.test [::1]"
        context = me.context_for_client_port("smtp", result.local[1])
        assert context.client_ip == ipaddress.ip_address("::1")
        assert context.server_ip == ipaddress.ip_address("::1")
        assert context.peer_ip == LOOPBACK  # HAProxy reached mailedge over IPv4
        assert context.header is not None
        assert context.header.family is Family.INET6
        assert_quiet(setup)


async def test_smtp_tls_terminated_by_haproxy(tmp_path: Path) -> None:
    source = client_source_ip()
    async with behind_haproxy(tmp_path, "haproxy-smtp-tls") as setup:
        context, received = await interop_checks.smtp_tls_from_proxy(setup, source, "smtp")
        assert context.tls_version == "TLSv1.3"
        assert context.tls_cipher
        assert context.client_cert_cn is None
        assert not context.client_cert_verified
        assert context.header is not None
        assert context.header.crc32c_verified
        assert (
            f"with ESMTPS (version=TLSv1.3 cipher={context.tls_cipher} terminated-by=proxy)"
            in received
        )
        assert_quiet(setup)


async def test_tcp_passthrough_to_implicit_tls_listener(tmp_path: Path) -> None:
    source = client_source_ip()
    async with behind_haproxy(tmp_path, "haproxy-smtps-passthrough") as setup:
        me = setup.mailedge
        result = await setup.smtp(
            source=source, implicit_tls=setup.certs.client_context(), send=True
        )
        assert "STARTTLS" not in result.ehlo
        # The header came first, then mailedge's own handshake: both the client and TLS are known.
        context = me.context_for_client_port("smtps", result.local[1])
        assert str(context.client_ip) == source
        assert context.tls
        assert context.tls_terminated_by is TLSTerminator.SERVER
        assert context.tls_version == "TLSv1.3"
        assert context.sni == HOSTNAME  # from mailedge's own handshake
        [message] = me.messages()
        received = received_header(message)
        assert f"([{source}])" in received
        assert "with ESMTPS (version=TLSv1.3 cipher=" in received
        assert "terminated-by=proxy" not in received
        assert_quiet(setup)


# -- IMAP ---------------------------------------------------------------------------------------


async def test_imap_plaintext_needs_starttls(tmp_path: Path) -> None:
    async with behind_haproxy(tmp_path, "haproxy-imap-v2") as setup:
        plain, upgraded, contexts = await interop_checks.imap_with_starttls(setup)
        assert "STARTTLS" in plain.welcome
        assert "PRIVACYREQUIRED" in plain.login
        assert "LOGINDISABLED" not in upgraded.capabilities
        for context in contexts:
            assert context.proxied
            assert not context.tls  # as the gate admitted it; STARTTLS came later
        assert_quiet(setup)


async def test_imap_tls_terminated_by_haproxy_allows_login(tmp_path: Path) -> None:
    async with behind_haproxy(tmp_path, "haproxy-imap-tls") as setup:
        me = setup.mailedge
        result = await setup.imap(implicit_tls=setup.certs.client_context())
        assert "LOGINDISABLED" not in result.welcome
        assert "STARTTLS" not in result.welcome
        assert result.logged_in, result.login
        context = me.context_for_client_port("imap", result.local[1])
        assert context.tls
        assert context.tls_terminated_by is TLSTerminator.PROXY
        assert context.tls_version == "TLSv1.3"
        assert_quiet(setup)


# -- HTTP ---------------------------------------------------------------------------------------


async def test_http_plaintext_frontend_with_send_proxy_v2_ssl(tmp_path: Path) -> None:
    source = client_source_ip()
    async with behind_haproxy(tmp_path, "haproxy-http-v2-ssl") as setup:
        result = await interop_checks.whoami_from_header(setup, source, version=2)
        whoami = result.body
        assert whoami["proxied"] is True
        assert whoami["tls_terminated_by"] is None
        # HAProxy did send an SSL TLV, saying "not TLS" (client 0x00).
        context = setup.mailedge.context_for_client_port("http", result.local[1])
        assert context.header is not None
        assert context.header.ssl is not None
        assert context.header.ssl.client == ClientFlags(0)
        assert_quiet(setup)


@pytest.mark.parametrize("with_cert", [True, False], ids=["client-cert", "no-client-cert"])
async def test_https_terminated_by_haproxy(tmp_path: Path, with_cert: bool) -> None:
    source = client_source_ip()
    async with behind_haproxy(tmp_path, "haproxy-http-tls") as setup:
        result = await setup.http(
            source=source,
            tls=setup.certs.client_context(with_cert=with_cert),
            server_hostname=HOSTNAME,
        )
        whoami = result.body
        assert whoami["client_ip"] == source
        assert whoami["client_port"] == result.local[1]
        assert whoami["tls"] is True
        assert whoami["tls_terminated_by"] == "proxy"
        assert whoami["tls_version"] == result.tls_version == "TLSv1.3"
        assert whoami["tls_cipher"] == result.tls_cipher
        assert whoami["sni"] == HOSTNAME
        assert whoami["client_cert_cn"] == (CLIENT_CN if with_cert else None)
        assert whoami["client_cert_verified"] is with_cert

        context = setup.mailedge.context_for_client_port("http", result.local[1])
        assert context.header is not None
        assert context.header.crc32c_verified
        assert context.header.ssl is not None
        expected = ClientFlags.SSL | (
            ClientFlags.CERT_CONN | ClientFlags.CERT_SESS if with_cert else ClientFlags(0)
        )
        assert context.header.ssl.client == expected
        assert context.header.ssl.verify == 0
        # HAProxy 2.6 sends the cert-sig and cert-key sub-TLVs even without a client certificate.
        assert context.header.ssl.sig_alg is not None
        assert context.header.ssl.key_alg is not None
        assert_quiet(setup)


async def test_https_with_an_untrusted_client_certificate_never_reaches_mailedge(
    tmp_path: Path,
) -> None:
    """``verify optional``: a certificate that fails verification ends the handshake at HAProxy."""
    async with behind_haproxy(tmp_path, "haproxy-http-tls") as setup:
        try:
            await setup.http(
                tls=setup.certs.client_context(foreign_cert=True), server_hostname=HOSTNAME
            )
        except (ssl.SSLError, ConnectionResetError, http.client.HTTPException):
            pass
        else:
            pytest.fail("HAProxy accepted a client certificate from an unknown CA")
        assert setup.mailedge.contexts_of("http") == []
        assert setup.mailedge.events == []


async def test_tls_frontend_with_plain_send_proxy_v2_says_nothing_about_tls(
    tmp_path: Path,
) -> None:
    """Without the SSL TLV, mailedge cannot know that HAProxy terminated TLS (the doc's table)."""
    tlv_options = (
        " send-proxy-v2-ssl-cn proxy-v2-options ssl,cert-cn,ssl-cipher,cert-sig,cert-key,"
        "authority,crc32c"
    )
    async with behind_haproxy(
        tmp_path, "haproxy-http-tls", proxy_edits=[(tlv_options, " send-proxy-v2")]
    ) as setup:
        result = await setup.http(tls=setup.certs.client_context(), server_hostname=HOSTNAME)
        assert result.tls_version == "TLSv1.3"  # the client did use TLS, with HAProxy
        assert result.body["proxied"] is True
        assert result.body["tls"] is False
        assert result.body["sni"] is None
        assert_quiet(setup)


async def test_curl_haproxy_protocol_directly_against_a_trusted_listener(tmp_path: Path) -> None:
    """curl --haproxy-protocol sends its own v1 line; from a trusted address it is believed."""
    curl = curl_bin()
    certs = make_certs(tmp_path / "certs")
    settings = render_mailedge(HAPROXY_DOC, "haproxy-mailedge")
    async with running_mailedge(settings, tmp_path, certs) as me:
        port = me.port("http")
        result = await run_client(
            [
                curl,
                "-sS",
                "--max-time",
                "10",
                "--haproxy-protocol",
                f"http://127.0.0.1:{port}/whoami",
            ]
        )
        assert result.returncode == 0, result.stderr
        whoami = json.loads(result.stdout)
        assert whoami["proxied"] is True
        assert whoami["proxy_version"] == 1
        assert whoami["address_source"] == "header"
        assert whoami["client_ip"] == "127.0.0.1"
        # curl's header names its own socket, so the client port is curl's: the socket peer.
        assert whoami["client_port"] == whoami["peer_port"]
        assert me.warnings() == []
