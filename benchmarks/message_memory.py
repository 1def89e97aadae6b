"""What 100 concurrent 9 MiB messages cost the example SMTP handler in memory.

The attack (issue #12, item 3): connections that each send most of a message's DATA, up to
just under the size cap, and then hold it without the final dot. A handler that buffers the
message in memory holds ``connections x size``; one that streams the data into the Maildir's
``tmp/`` holds a bounded buffer per session. This script measures it:

- a mailedge server (``bench_servers.py mailedge-smtp``: the example SMTP handler delivering
  into a Maildir, under ``mailedge.serve``) runs in its own process on 127.0.0.1, trusting
  127.0.0.0/8; ``--root`` runs another checkout's (say, the code before a change) instead;
- this process opens ``--connections`` (100) connections, at most ``CONNECTS_IN_FLIGHT`` at
  a time, each behind a PROXY v2 header naming its own client (198.51.100.x: the per-client
  connection cap is 16), goes through EHLO, MAIL, RCPT and DATA, and sends ``--size-mib``
  (9) MiB of message text in lines of 998 octets, without the final dot;
- once the server has read all of it (no byte left in a send or receive queue of its
  connections, by ``/proc/net/tcp``), the server's RSS is read: ``VmHWM`` (its peak so
  far) and ``VmRSS``, against ``VmRSS`` before the first connection;
- then every connection sends its final dot and waits for the reply (``250`` expected), and
  the peak is read again: delivery, too, must not hold the message whole.

Target: the peak with every message in flight under 150 MB. The target is reported, not
enforced: the exit status is 1 only when something broke (a connect error, a reply other
than 354 or 250). ``--quick`` is a small, seconds-long run.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from bench_servers import ROOT, ServerProcess, machine_info, raise_nofile, write_results

from mailedge.proxy import Command, InetAddress, encode_v2

HOST = "127.0.0.1"
RSS_TARGET_MB = 150.0
# How many connects may be in flight at once: the server's accept queue holds 128.
CONNECTS_IN_FLIGHT = 50
# One send: 64 lines of 998 octets and their CRLFs (a line as long as RFC 5321 allows, so
# that the run measures memory rather than the per-line cost).
LINE = b"x" * 998 + b"\r\n"
BLOCK = LINE * 64
# Every client step (connect, reply, a send) must finish within this; a stuck server fails
# the run instead of hanging it.
STEP_TIMEOUT = 120.0
# How long the server may take to read what was sent, after the last send returned.
DRAIN_TIMEOUT = 300.0
# How often the server's read count is checked while it drains.
POLL_INTERVAL = 0.05
# Descriptors beyond the connections.
SPARE_FDS = 256


class CheckoutServer(ServerProcess):
    """``bench_servers.py`` of another checkout (``root``), importing that checkout's code."""

    def __init__(self, root: Path, args: list[str]) -> None:
        self.kind = args[0]
        self.python = sys.executable
        path = os.pathsep.join([str(root), str(root / "examples")])
        self.process = subprocess.Popen(
            [sys.executable, str(root / "benchmarks" / "bench_servers.py"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            cwd=root,
            env={**os.environ, "PYTHONPATH": path},
        )
        line = self.read_line()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"{self.kind} server did not start: {line!r}")
        self.port = int(line.split()[1])


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def queued_bytes(port: int) -> int:
    """Bytes still on their way to the server listening on ``port``: in the clients' send
    queues and in the server's receive queues (``/proc/net/tcp``, established sockets)."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state != "01":  # ESTABLISHED
            continue
        send_queue, receive_queue = (int(value, 16) for value in fields[4].split(":"))
        if int(local.rpartition(":")[2], 16) == port:
            total += receive_queue
        elif int(remote.rpartition(":")[2], 16) == port:
            total += send_queue
    return total


class Session:
    """One client connection, driven step by step."""

    def __init__(self, index: int, stream: trio.SocketStream) -> None:
        self.index = index
        self.stream = stream
        self.pending = b""

    async def reply(self) -> bytes:
        """The last line of the next reply."""
        with trio.fail_after(STEP_TIMEOUT):
            while True:
                while b"\r\n" not in self.pending:
                    data = await self.stream.receive_some(4096)
                    if not data:
                        raise ConnectionError(f"session {self.index}: server closed")
                    self.pending += data
                line, _, self.pending = self.pending.partition(b"\r\n")
                if line[3:4] != b"-":
                    return line

    async def command(self, line: bytes, expect: bytes) -> None:
        with trio.fail_after(STEP_TIMEOUT):
            await self.stream.send_all(line + b"\r\n")
        reply = await self.reply()
        if not reply.startswith(expect):
            raise ConnectionError(f"session {self.index}: {line!r} got {reply!r}")


async def open_session(port: int, index: int, limiter: trio.CapacityLimiter) -> Session:
    client = InetAddress(
        ipaddress.IPv4Address(f"198.51.{100 + index // 250}.{index % 250 + 1}"), 40000
    )
    server = InetAddress(ipaddress.IPv4Address("192.0.2.25"), 25)
    async with limiter:
        with trio.fail_after(STEP_TIMEOUT):
            stream = await trio.open_tcp_stream(HOST, port)
    session = Session(index, stream)
    with trio.fail_after(STEP_TIMEOUT):
        await stream.send_all(encode_v2(Command.PROXY, client, server))
    banner = await session.reply()
    if not banner.startswith(b"220"):
        raise ConnectionError(f"session {index}: banner {banner!r}")
    await session.command(b"EHLO client.example", b"250")
    await session.command(b"MAIL FROM:<alice@example.org>", b"250")
    await session.command(b"RCPT TO:<bob@example.net>", b"250")
    await session.command(b"DATA", b"354")
    return session


async def run(server: ServerProcess, connections: int, blocks: int) -> dict[str, Any]:
    pid = server.process.pid
    before = proc_status(pid)
    sessions: list[Session] = []
    limiter = trio.CapacityLimiter(CONNECTS_IN_FLIGHT)
    started = time.monotonic()

    async def one(index: int) -> None:
        session = await open_session(server.port, index, limiter)
        sessions.append(session)
        for _ in range(blocks):
            with trio.fail_after(STEP_TIMEOUT):
                await session.stream.send_all(BLOCK)

    async with trio.open_nursery() as nursery:
        for index in range(connections):
            nursery.start_soon(one, index)
    sent = connections * blocks * len(BLOCK)
    # send_all returns once the kernel has the bytes; wait until the server has read them.
    for _ in range(int(DRAIN_TIMEOUT / POLL_INTERVAL)):
        if queued_bytes(server.port) == 0:
            break
        await trio.sleep(POLL_INTERVAL)
    else:
        raise trio.TooSlowError(f"the server did not read {sent} bytes in {DRAIN_TIMEOUT} s")
    in_flight = proc_status(pid)
    in_flight_seconds = time.monotonic() - started

    async def finish(session: Session) -> None:
        await session.command(b".", b"250")
        await session.command(b"QUIT", b"221")
        await session.stream.aclose()

    async with trio.open_nursery() as nursery:
        for session in sessions:
            nursery.start_soon(finish, session)
    delivered = proc_status(pid)
    return {
        "rss_before_kib": before["VmRSS"],
        "rss_in_flight_kib": in_flight["VmRSS"],
        "peak_in_flight_kib": in_flight["VmHWM"],
        "peak_after_delivery_kib": delivered["VmHWM"],
        "rss_after_delivery_kib": delivered["VmRSS"],
        "bytes_sent": sent,
        "seconds_to_all_in_flight": round(in_flight_seconds, 2),
        "seconds_total": round(time.monotonic() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, help="concurrent messages (100)")
    parser.add_argument("--size-mib", type=float, help="DATA sent per connection, MiB (9)")
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="the checkout whose server runs (this one)"
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON file")
    args = parser.parse_args(argv)
    connections = args.connections or (10 if args.quick else 100)
    size_mib = args.size_mib or (1.0 if args.quick else 9.0)
    blocks = max(1, round(size_mib * 1024 * 1024 / len(BLOCK)))
    raise_nofile(connections + SPARE_FDS)
    root = args.root.resolve()
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()

    with tempfile.TemporaryDirectory(prefix="mailedge-message-memory-") as scratch:
        server_args = [
            "mailedge-smtp",
            "--max-connections",
            str(connections + 16),
            "--nofile",
            str(connections + SPARE_FDS),
            "--maildir",
            str(Path(scratch) / "Maildir"),
            "--log-file",
            str(Path(scratch) / "server.log"),
        ]
        server = ServerProcess(server_args) if root == ROOT else CheckoutServer(root, server_args)
        failure = None
        try:
            result = trio.run(run, server, connections, blocks)
        except (ConnectionError, OSError, trio.TooSlowError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
            result = {}
        finally:
            server.stop()
        log = (Path(scratch) / "server.log").read_text()

    settings = {
        "connections": connections,
        "size_mib_each": round(blocks * len(BLOCK) / 2**20, 3),
        "line_octets": len(LINE),
        "root": str(root),
        "commit": commit,
    }
    print(f"{connections} connections x {settings['size_mib_each']} MiB of DATA, no final dot")
    print(f"server: {root} at {commit or 'unknown commit'}")
    if failure is not None:
        print(f"FAILED: {failure}")
        print(log[-2000:])
        return 1
    mb = 1024 / 1e6  # KiB -> MB
    growth = (result["peak_in_flight_kib"] - result["rss_before_kib"]) * mb
    rows = [
        ("RSS before", result["rss_before_kib"] * mb),
        ("peak RSS, all in flight", result["peak_in_flight_kib"] * mb),
        ("RSS, all in flight", result["rss_in_flight_kib"] * mb),
        ("peak RSS, after delivery", result["peak_after_delivery_kib"] * mb),
        ("growth to the in-flight peak", growth),
        ("growth per connection", growth / connections),
    ]
    for name, value in rows:
        print(f"  {name:<30} {value:9.1f} MB")
    peak_mb = result["peak_in_flight_kib"] * mb
    verdict = "met" if peak_mb < RSS_TARGET_MB else "MISSED"
    print(f"target: peak in flight under {RSS_TARGET_MB:.0f} MB: {verdict}")
    print(f"{result['seconds_to_all_in_flight']} s to send, {result['seconds_total']} s in all")
    if not args.no_save:
        path = write_results(
            "message_memory",
            {
                "machine": machine_info(),
                "settings": settings,
                "result": result,
                "target_mb": RSS_TARGET_MB,
            },
        )
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
