"""End to end: two example servers behind a real HAProxy (roundrobin), sharing one Redis.

The HAProxy config and the servers' TOML are docs/scale-out.md's snippets. One client's
connections alternate between the two servers; its connection rate limit and its ban hold
across both, because both keep them in the same Redis. With each server on its own memory
store the same traffic gets twice the rate and no ban on the second server (checked once by
hand: the assertions below then fail).
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import ssl
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from interop_support import (
    DOCS,
    HAPROXY_DOC,
    RunningProcess,
    free_port,
    render,
    run_haproxy,
    run_process,
    snippets,
)
from redis_support import RedisSentinelSet, RedisServer

pytest.importorskip("coredis")
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject:pytest.PytestUnraisableExceptionWarning"
)

SCALE_OUT_DOC = DOCS / "scale-out.md"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLIENT_TIMEOUT = 10.0
# The snippet's limit: "5/1m".
RATE = 5


def example_table(state: Path) -> str:
    return f'\n[Example]\nstateDir = "{state}"\nusers = {{ demo = "demo-password" }}\n'


@contextlib.asynccontextmanager
async def example_server(
    name: str, tmp_path: Path, redis_url: str
) -> AsyncIterator[tuple[RunningProcess, int]]:
    port = free_port()
    directory = tmp_path / name
    directory.mkdir()
    config = directory / "mailedge.toml"
    config.write_text(
        render(SCALE_OUT_DOC, "scale-out-mailedge", SMTP_PORT=port, REDIS_URL=redis_url)
        + example_table(directory)
    )
    argv = [sys.executable, str(EXAMPLES / "mailserver.py"), "--config", str(config)]
    async with run_process(
        name, argv, log_path=directory / "server.log", ready=[("127.0.0.1", port)], cwd=directory
    ) as running:
        yield running, port


def banner(port: int, source: str) -> bytes:
    """The first reply to a connection from ``source`` through HAProxy."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=CLIENT_TIMEOUT, source_address=(source, 0)
    ) as sock:
        first = sock.recv(200)
        if first.startswith(b"220 "):
            sock.sendall(b"QUIT\r\n")
            while sock.recv(200):
                pass
        return first


def failed_login(port: int, source: str) -> None:
    """AUTH PLAIN with a wrong password, after STARTTLS: one failure towards a ban."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT, source_address=(source, 0))
    try:
        smtp.starttls(context=context)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("demo", "wrong")
    finally:
        # No QUIT: the failure that bans ends the session with the ban's 421.
        smtp.close()


def test_every_snippet_in_scale_out_is_run_here() -> None:
    source = Path(__file__).read_text()
    for name in snippets(SCALE_OUT_DOC):
        assert f'"{name}"' in source, name


async def test_rate_limit_and_ban_hold_across_two_servers_behind_haproxy(
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        async with (
            example_server("mx1", tmp_path, redis.url) as (mx1, port1),
            example_server("mx2", tmp_path, redis.url) as (mx2, port2),
        ):
            frontend = free_port()
            config = haproxy_config(frontend, port1, port2)
            async with run_haproxy(config, tmp_path):
                # The rate: one client, ten connections alternating between the servers.
                replies = [
                    await trio.to_thread.run_sync(banner, frontend, "127.0.0.3")
                    for _ in range(2 * RATE)
                ]
                accepted = [r for r in replies if r.startswith(b"220 ")]
                refused = [r for r in replies if r.startswith(b"421 4.7.0 ")]
                # Shared: the one limit, not one per server (which would let all ten in).
                assert len(accepted) == RATE, replies
                assert len(refused) == RATE, replies

                # The ban: three failed logins, spread over both servers, ban the client ...
                for _ in range(3):
                    await trio.to_thread.run_sync(failed_login, frontend, "127.0.0.2")
                # ... on both: the next two connections, one to each, are refused.
                with trio.fail_after(CLIENT_TIMEOUT):
                    for _ in range(2):
                        reply = await trio.to_thread.run_sync(banner, frontend, "127.0.0.2")
                        assert reply.startswith(b"421 4.7.0 "), reply
            for running in (mx1, mx2):
                log = running.output()
                # Both servers served the client and refused it: the limits were shared.
                assert re.search(r"on_connect refused .*client=127\.0\.0\.3", log), log
                assert re.search(r"on_connect refused .*client=127\.0\.0\.2", log), log
    finally:
        redis.stop()


def haproxy_config(frontend: int, port1: int, port2: int) -> str:
    return render(HAPROXY_DOC, "haproxy-defaults") + render(
        SCALE_OUT_DOC,
        "scale-out-haproxy",
        FRONTEND_PORT=frontend,
        MX1_ADDRESS="127.0.0.1",
        MX1_PORT=port1,
        MX2_ADDRESS="127.0.0.1",
        MX2_PORT=port2,
    )


def banned_on_both(port: int, source: str) -> bool:
    """Three failed logins from ``source``; then whether both servers refuse it."""
    for _ in range(3):
        failed_login(port, source)
    return all(banner(port, source).startswith(b"421 4.7.0 ") for _ in range(2))


@pytest.mark.slow
async def test_haproxy_two_servers_and_sentinel_share_a_ban_after_a_failover(
    tmp_path: Path,
) -> None:
    """The HA deployment: HAProxy, two servers, a primary, its replica and a Sentinel with the
    doc's sentinel.conf (one Sentinel, so quorum 1, and short timings). A ban spread over both
    servers holds on both before the primary dies and again after the Sentinel's failover,
    with nothing restarted: the stores find the new primary by themselves. Roundrobin puts
    the three failures 2 + 1 on the servers, so per-process state (a store still on its
    fallback) bans no one: a ban on both means shared state."""
    redis = RedisSentinelSet(tmp_path / "redis")
    redis.sentinel.sentinel_config = render(
        SCALE_OUT_DOC,
        "scale-out-sentinel",
        edits=[
            ("${PRIMARY_PORT} 2", "${PRIMARY_PORT} 1"),
            ("down-after-milliseconds mymaster 5000", "down-after-milliseconds mymaster 500"),
            ("failover-timeout mymaster 60000", "failover-timeout mymaster 2000"),
        ],
        SENTINEL_PORT=redis.sentinel.port,
        PRIMARY_ADDRESS="127.0.0.1",
        PRIMARY_PORT=redis.primary.port,
    )
    store = render(
        SCALE_OUT_DOC,
        "scale-out-store-sentinel",
        # Two of the three Sentinels are not running: the stores skip them.
        SENTINEL_1=f"127.0.0.1:{redis.dead_sentinel_port}",
        SENTINEL_2=redis.sentinel.address,
        SENTINEL_3=f"127.0.0.1:{free_port()}",
    )
    url = tomllib.loads(store)["Store"]["url"]
    await trio.to_thread.run_sync(redis.start)
    try:
        async with (
            example_server("mx1", tmp_path, url) as (mx1, port1),
            example_server("mx2", tmp_path, url) as (mx2, port2),
        ):
            frontend = free_port()
            async with run_haproxy(haproxy_config(frontend, port1, port2), tmp_path):
                assert await trio.to_thread.run_sync(banned_on_both, frontend, "127.0.0.2")
                redis.primary.kill()
                # Bans shared again once the stores are on the new primary: a fresh client
                # each try, as a try that failed meanwhile may have banned it on one server.
                with trio.fail_after(60):
                    for last in range(10, 40):
                        source = f"127.0.0.{last}"
                        if await trio.to_thread.run_sync(banned_on_both, frontend, source):
                            break
                        await trio.sleep(1.0)
                    else:
                        raise AssertionError("no shared ban after the failover")
                assert redis.primary_port() == redis.replica.port
            for running in (mx1, mx2):
                assert re.search(
                    rf"on_connect refused .*client={re.escape(source)}", running.output()
                )
    finally:
        redis.stop()
