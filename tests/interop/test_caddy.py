"""Caddy 2.11 in front of mailedge's HTTP listener: every Caddyfile in docs/proxies/caddy.md.

Caddy proxies HTTP only, so these tests use the example HTTP handler's ``GET /whoami``, which
returns the connection context the gate built, as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from interop_checks import assert_quiet
from interop_support import (
    HOSTNAME,
    behind_caddy,
    client_source_ip,
    client_sources,
    curl_bin,
    run_client,
)

from mailedge.events import EventName


@pytest.mark.parametrize(("name", "version"), [("caddy-http-v1", 1), ("caddy-http-v2", 2)])
async def test_whoami_shows_the_client_caddy_saw(tmp_path: Path, name: str, version: int) -> None:
    sources = client_sources()
    async with behind_caddy(tmp_path, name) as setup:
        # One connection per source, alternating: a pooled upstream connection reused for
        # another client would show the previous client's address.
        for source in [*sources, *sources]:
            result = await setup.http(source=source)
            whoami = result.body
            assert whoami["client_ip"] == source
            assert whoami["peer_ip"] == "127.0.0.1"  # Caddy's own connection
            assert whoami["proxied"] is True
            assert whoami["address_source"] == "header"
            assert whoami["proxy_version"] == version
            assert whoami["tls"] is False
            # What Caddy 2.11 actually sends: the client's address with port 0, and 0.0.0.0:0
            # as the destination (v1 "PROXY TCP4 127.0.0.2 0.0.0.0 0 0"). docs/proxies/caddy.md
            # says so; if a Caddy release starts sending real ports, update both.
            assert whoami["client_port"] == 0, (whoami, result.local)
            assert (whoami["server_ip"], whoami["server_port"]) == ("0.0.0.0", 0)
        assert setup.mailedge.count("http", EventName.ACCEPTED, "header") >= 1
        assert_quiet(setup)


async def test_curl_through_caddy(tmp_path: Path) -> None:
    curl = curl_bin()
    source = client_source_ip()
    async with behind_caddy(tmp_path, "caddy-http-v2") as setup:
        result = await run_client(
            [
                curl,
                "-sS",
                "--max-time",
                "10",
                "--interface",
                source,
                f"http://127.0.0.1:{setup.frontend}/whoami",
            ]
        )
        assert result.returncode == 0, result.stderr
        whoami = json.loads(result.stdout)
        assert whoami["client_ip"] == source
        assert whoami["proxy_version"] == 2
        assert_quiet(setup)


async def test_https_terminated_by_caddy_is_not_reported_as_tls(tmp_path: Path) -> None:
    """Caddy's v2 header has no SSL TLV: mailedge cannot know that the client used HTTPS."""
    source = client_source_ip()
    async with behind_caddy(tmp_path, "caddy-https-v2") as setup:
        result = await setup.http(
            source=source, tls=setup.certs.client_context(), server_hostname=HOSTNAME
        )
        assert result.tls_version is not None  # the client did speak TLS, to Caddy
        whoami = result.body
        assert whoami["client_ip"] == source
        assert whoami["proxy_version"] == 2
        assert whoami["tls"] is False
        assert whoami["sni"] is None
        [context] = setup.mailedge.contexts_of("http")
        assert context.header is not None
        assert context.header.tlvs == ()
        assert_quiet(setup)
