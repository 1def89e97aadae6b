"""nginx 1.22's stream module in front of mailedge: every config in docs/proxies/nginx.md.

nginx sends v1 only, at connect time. Each test renders one ``stream`` block and the page's
mailedge TOML, runs nginx in the foreground, and sends a real client (smtplib, swaks, imaplib,
http.client) through it.
"""

from __future__ import annotations

from pathlib import Path

import interop_checks
from interop_checks import assert_quiet, received_header
from interop_support import HOSTNAME, behind_nginx, client_source_ip, run_client, swaks_bin

from mailedge.events import EventName


async def test_smtp_v1_with_smtplib(tmp_path: Path) -> None:
    source = client_source_ip()
    async with behind_nginx(tmp_path, "nginx-smtp") as setup:
        await interop_checks.smtp_from_header(setup, source, version=1)
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
        # proxyV1ImpliesTls: the session counts as TLS, so STARTTLS is not offered again.
        context, received = await interop_checks.smtp_tls_from_proxy(setup, source, "submissions")
        # v1 carries no TLS details.
        assert context.tls_version is None
        assert context.tls_cipher is None
        assert context.sni is None
        assert "with ESMTPS (version=unknown cipher=unknown terminated-by=proxy)" in received
        assert_quiet(setup)


async def test_imap_v1_then_starttls_through_nginx(tmp_path: Path) -> None:
    async with behind_nginx(tmp_path, "nginx-imap") as setup:
        _, _, contexts = await interop_checks.imap_with_starttls(setup)
        for context in contexts:
            assert context.header is not None
            assert context.header.version == 1
        assert setup.mailedge.count("imap", EventName.ACCEPTED, "header") == 2
        assert_quiet(setup)


async def test_http_through_the_stream_module(tmp_path: Path) -> None:
    source = client_source_ip()
    async with behind_nginx(tmp_path, "nginx-http") as setup:
        result = await interop_checks.whoami_from_header(setup, source, version=1)
        assert result.body["peer_port"] != result.local[1]
        assert_quiet(setup)
