"""nginx 1.22's stream module in front of mailedge: every config in docs/proxies/nginx.md.

nginx sends v1 only, at connect time. Each test renders one ``stream`` block and the page's
mailedge TOML, runs nginx in the foreground, and sends a real client (smtplib, swaks, imaplib,
http.client) through it.
"""

from __future__ import annotations

import ipaddress
import re
from functools import partial
from pathlib import Path

import trio
from interop_support import (
    HOSTNAME,
    Setup,
    behind_nginx,
    client_source_ip,
    http_get_json,
    imap_session,
    run_client,
    smtp_session,
    swaks_bin,
)

from mailedge.context import AddressSource, TLSTerminator
from mailedge.events import EventName

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def assert_quiet(setup: Setup) -> None:
    assert setup.mailedge.warnings() == [], setup.mailedge.warnings()


def received_header(message: bytes) -> str:
    match = re.search(rb"^Received: .*?(?=^\S)", message, re.MULTILINE | re.DOTALL)
    assert match is not None, message
    return re.sub(r"\s+", " ", match[0].decode()).strip()


async def test_smtp_v1_with_smtplib(tmp_path: Path) -> None:
    source = client_source_ip()
    async with behind_nginx(tmp_path, "nginx-smtp") as setup:
        me = setup.mailedge
        result = await trio.to_thread.run_sync(
            partial(smtp_session, "127.0.0.1", setup.frontend, source=source, send=True)
        )
        assert result.ehlo[0] == f"{HOSTNAME} Hello client.mailedge.test [{source}]"
        assert "STARTTLS" in result.ehlo
        context = me.context_for_client_port("smtp", result.local[1])
        assert str(context.client_ip) == source
        assert context.address_source is AddressSource.HEADER
        assert context.peer_ip == LOOPBACK
        assert context.peer_port != result.local[1]
        assert (str(context.server_ip), context.server_port) == ("127.0.0.1", setup.frontend)
        assert context.header is not None
        assert context.header.version == 1
        assert not context.tls
        [message] = me.messages()
        assert f"Received: from client.mailedge.test ([{source}])" in received_header(message)
        assert me.count("smtp", EventName.ACCEPTED, "header") == 1
        assert_quiet(setup)


async def test_smtp_v1_with_swaks(tmp_path: Path) -> None:
    swaks = swaks_bin()
    source = client_source_ip()
    async with behind_nginx(tmp_path, "nginx-smtp") as setup:
        me = setup.mailedge
        result = await run_client(
            [
                swaks,
                "--server",
                f"127.0.0.1:{setup.frontend}",
                "--local-interface",
                source,
                "--ehlo",
                "swaks.mailedge.test",
                "--from",
                "a@swaks.mailedge.test",
                "--to",
                "x@mx.mailedge.test",
                "--header",
                "Subject: through nginx",
                "--timeout",
                "10",
            ]
        )
        transcript = result.stdout.decode(errors="replace")
        assert result.returncode == 0, transcript + result.stderr.decode(errors="replace")
        # swaks shows the server's lines prefixed with "<-".
        assert f"<-  250-{HOSTNAME} Hello swaks.mailedge.test [{source}]" in transcript
        [message] = me.messages()
        assert b"Subject: through nginx" in message
        assert f"Received: from swaks.mailedge.test ([{source}])" in received_header(message)
        assert_quiet(setup)


async def test_smtp_tls_terminated_by_nginx_with_v1_implies_tls(tmp_path: Path) -> None:
    source = client_source_ip()
    async with behind_nginx(tmp_path, "nginx-smtp-tls") as setup:
        me = setup.mailedge
        result = await trio.to_thread.run_sync(
            partial(
                smtp_session,
                "127.0.0.1",
                setup.frontend,
                source=source,
                implicit_tls=setup.certs.client_context(),
                send=True,
            )
        )
        # proxyV1ImpliesTls: the session counts as TLS, so STARTTLS is not offered again.
        assert "STARTTLS" not in result.ehlo
        assert result.ehlo[0].endswith(f"[{source}]")
        context = me.context_for_client_port("submissions", result.local[1])
        assert context.tls
        assert context.tls_terminated_by is TLSTerminator.PROXY
        # v1 carries no TLS details.
        assert context.tls_version is None
        assert context.tls_cipher is None
        assert context.sni is None
        [message] = me.messages()
        assert (
            "with ESMTPS (version=unknown cipher=unknown terminated-by=proxy)"
            in received_header(message)
        )
        assert_quiet(setup)


async def test_imap_v1_then_starttls_through_nginx(tmp_path: Path) -> None:
    async with behind_nginx(tmp_path, "nginx-imap") as setup:
        me = setup.mailedge
        plain = await trio.to_thread.run_sync(partial(imap_session, "127.0.0.1", setup.frontend))
        assert "LOGINDISABLED" in plain.welcome
        assert not plain.logged_in
        upgraded = await trio.to_thread.run_sync(
            partial(
                imap_session,
                "127.0.0.1",
                setup.frontend,
                starttls=setup.certs.client_context(),
            )
        )
        assert upgraded.logged_in, upgraded.login
        for result in (plain, upgraded):
            context = me.context_for_client_port("imap", result.local[1])
            assert context.header is not None
            assert context.header.version == 1
            assert context.peer_port != result.local[1]
        assert me.count("imap", EventName.ACCEPTED, "header") == 2
        assert_quiet(setup)


async def test_http_through_the_stream_module(tmp_path: Path) -> None:
    source = client_source_ip()
    async with behind_nginx(tmp_path, "nginx-http") as setup:
        result = await trio.to_thread.run_sync(
            partial(http_get_json, "127.0.0.1", setup.frontend, source=source)
        )
        whoami = result.body
        assert whoami["client_ip"] == source
        assert whoami["client_port"] == result.local[1]
        assert whoami["peer_port"] != result.local[1]
        assert whoami["proxy_version"] == 1
        assert whoami["tls"] is False
        assert_quiet(setup)
