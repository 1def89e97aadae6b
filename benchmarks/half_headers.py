"""Ten thousand half-sent PROXY headers against one mailedge server, while real mail flows.

The attack (CVE-2021-23409's shape): connections from a trusted address that send half a
header, then stall. mailedge's answer is the header timeout, run in each connection's own
task. This script checks what that costs and that it holds:

- a mailedge server (``bench_servers.py mailedge-smtp``: the example SMTP handler delivering
  into a Maildir) runs in its own process on 127.0.0.1 with a short header timeout
  (``--timeout``, 15 s by default: long enough that all the connections are open at once
  on a small machine; with 5 s on a 2-vCPU VM the first expire before the last arrive) and a
  connection cap above the attack's size, trusting 127.0.0.0/8;
- this process opens ``--connections`` connections (10,000), as fast as the server accepts
  them (a faster client only overflows the listen queue), each from one of several
  loopback source addresses (127.0.0.2, 127.0.0.3, ...: bound before connecting, so the
  ephemeral ports of one address are never exhausted), sends half of a v1 or v2 header and
  stalls, then waits for the server to close it, noting when;
- once they are all open, a third process runs ``--legit`` (100) proxied SMTP sessions
  (header, EHLO, MAIL, RCPT, DATA, QUIT), spread over the time the stalled connections are
  held and then cut off, and measures each one, connect to the 221;
- the server's RSS (VmRSS in /proc/<pid>/status) is sampled all along.

Targets: peak RSS under 200 MB; every stalled connection closed by the server at the header
timeout (EOF or reset seen here, ``timeout`` to ``timeout + 1 s`` after it opened); the
legitimate sessions all complete with p99 under 100 ms. The descriptor limit is raised to
what the run needs, within the hard limit; when the hard limit is too low the run is scaled
down and says so. ``--quick`` is a small, seconds-long run. The targets are reported, not
enforced: the exit status is 1 only when something broke (a connect error, a stalled
connection never closed, a legitimate session that failed).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from bench_servers import ROOT, ServerProcess, machine_info, raise_nofile, write_results

from mailedge.proxy import Command, InetAddress, encode_v1, encode_v2

HOST = "127.0.0.1"
# The stalled connections come from 127.0.0.2 onwards, this many per address.
PER_SOURCE = 1000
LEGIT_SOURCE = "127.0.0.250"
# How many connects may be in flight at once: keeps the server's accept queue (128) from
# overflowing into SYN retransmissions, which would only measure the kernel.
CONNECTS_IN_FLIGHT = 100
# Descriptors beyond the connections: the runtime's own, pipes, files.
SPARE_FDS = 256
# Long enough for all 10,000 to be open at once, with time to spare: on a 2-vCPU VM the
# server accepts 850 to 1,400 stalled connections a second (7 to 12 s for 10,000), so with
# 5 s the first expire long before the last arrive.
DEFAULT_TIMEOUT = 15.0
RSS_TARGET_MB = 200.0
P99_TARGET_MS = 100.0
# A stalled connection closed later than timeout + this counts as late.
CLOSE_SLACK = 1.0
LEGIT_SESSION_TIMEOUT = 10.0
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


SERVER_ADDRESS = "192.0.2.25"


def half_header(index: int) -> bytes:
    """Half of a v1 line (even ``index``) or of a v2 header (odd)."""
    source = InetAddress(ipaddress.IPv4Address(f"198.51.100.{index % 250 + 1}"), 40000)
    destination = InetAddress(ipaddress.IPv4Address(SERVER_ADDRESS), 25)
    whole = (
        encode_v1(source, destination)
        if index % 2 == 0
        else encode_v2(Command.PROXY, source, destination)
    )
    return whole[: len(whole) // 2]


def full_header(index: int) -> tuple[bytes, str]:
    ip = f"198.51.100.{index % 250 + 1}"
    source = InetAddress(ipaddress.IPv4Address(ip), 41000 + index)
    destination = InetAddress(ipaddress.IPv4Address(SERVER_ADDRESS), 25)
    return encode_v2(Command.PROXY, source, destination), ip


# --- the server and the RSS sampler ----------------------------------------------------------


class RSSSampler(threading.Thread):
    """Samples the server's VmRSS every ``interval`` seconds until stopped."""

    def __init__(self, server: ServerProcess, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            rss = self.server.rss_kib()
            if rss is not None:
                self.samples.append((time.monotonic(), rss))

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)

    def peak_kib(self, start: float = 0.0, end: float = math.inf) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)


# --- the stalled connections -----------------------------------------------------------------


@dataclass
class Stalled:
    """What happened to each stalled connection, seen from the client."""

    opened: list[float] = field(default_factory=list)
    # (opened, closed, how): how is "eof" or "reset".
    closed: list[tuple[float, float, str]] = field(default_factory=list)
    still_open: int = 0
    connect_errors: list[str] = field(default_factory=list)


async def stall(
    port: int, index: int, source: str, limiter: trio.CapacityLimiter, result: Stalled, wait: float
) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        try:
            async with limiter:
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                await sock.bind((source, 0))
                # Taken before the connect: the server's timer starts after it, at accept.
                opened = time.monotonic()
                await sock.connect((HOST, port))
            result.opened.append(opened)
            await sock.send(half_header(index))
        except OSError as exc:
            result.connect_errors.append(f"{type(exc).__name__}: {exc}")
            return
        with trio.move_on_after(wait):
            try:
                data = await sock.recv(4096)
            except ConnectionResetError:
                result.closed.append((opened, time.monotonic(), "reset"))
                return
            if data:
                # The server must send nothing before a complete header.
                result.connect_errors.append(f"server sent {data[:40]!r} before the header")
                return
            result.closed.append((opened, time.monotonic(), "eof"))
            return
        result.still_open += 1


async def run_stalled(
    server: ServerProcess,
    count: int,
    header_timeout: float,
    all_open: trio.Event,
    result: Stalled,
) -> float:
    """Open ``count`` stalled connections, as fast as the server accepts them.

    The server's accept queue holds 128 (mailedge's listen backlog); connecting faster than
    it accepts overflows it, and the kernel then drops SYNs that are retried only a second
    later, which would measure the kernel's backoff. So this keeps at most
    ``CONNECTS_IN_FLIGHT`` connections connected but not yet accepted, asking the server how
    many it has taken (its open connections plus its finished gate decisions).
    """
    limiter = trio.CapacityLimiter(CONNECTS_IN_FLIGHT)
    start = time.monotonic()
    accepted = 0

    async def poll_accepted() -> None:
        nonlocal accepted
        while len(result.opened) + len(result.connect_errors) < count:
            stats = await trio.to_thread.run_sync(server.stats)
            counters = stats["counters"]
            assert isinstance(counters, dict)
            open_now = stats["open"]
            assert isinstance(open_now, int)
            accepted = open_now + sum(counters.values())
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll_accepted)
        for index in range(count):
            while index - accepted >= CONNECTS_IN_FLIGHT:
                await trio.sleep(0.002)
                if time.monotonic() - start > 120:
                    raise RuntimeError("the server stopped accepting")
            source = f"127.0.0.{2 + index // PER_SOURCE}"
            nursery.start_soon(
                stall, server.port, index, source, limiter, result, header_timeout + 30
            )
        while len(result.opened) + len(result.connect_errors) < count:
            await trio.sleep(0.01)
            if time.monotonic() - start > 120:
                break
        all_open.set()
    return time.monotonic() - start


# --- the legitimate sessions (their own process) ---------------------------------------------


async def _reply(stream: trio.SocketStream, pending: bytearray) -> bytes:
    """One SMTP reply, all its lines; returns them joined."""
    lines = []
    while True:
        while b"\r\n" not in pending:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError(f"closed after {bytes(pending)!r}")
            pending += data
        line, _, rest = bytes(pending).partition(b"\r\n")
        pending[:] = rest
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return b"\n".join(lines)


async def legit_session(port: int, index: int) -> float:
    header, ip = full_header(index)
    start = time.perf_counter()
    with trio.fail_after(LEGIT_SESSION_TIMEOUT):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        await sock.bind((LEGIT_SOURCE, 0))
        await sock.connect((HOST, port))
        async with trio.SocketStream(sock) as stream:
            pending = bytearray()
            await stream.send_all(header)
            steps = [
                (None, b"220"),
                (b"EHLO legit.example\r\n", b"250"),
                (b"MAIL FROM:<sender@example.org>\r\n", b"250"),
                (b"RCPT TO:<postmaster@example.net>\r\n", b"250"),
                (b"DATA\r\n", b"354"),
                (
                    f"Subject: legit {index}\r\nMessage-ID: <legit-{index}@example.org>\r\n\r\n"
                    f"Hello from session {index}.\r\n.\r\n".encode(),
                    b"250",
                ),
                (b"QUIT\r\n", b"221"),
            ]
            for command, code in steps:
                if command is not None:
                    await stream.send_all(command)
                reply = await _reply(stream, pending)
                if not reply.startswith(code):
                    raise ConnectionError(f"{command!r}: expected {code!r}, got {reply!r}")
                if (
                    command is not None
                    and command.startswith(b"EHLO")
                    and f"[{ip}]" not in (reply.decode())
                ):
                    raise ConnectionError(f"EHLO reply does not name the client {ip}: {reply!r}")
    return time.perf_counter() - start


async def run_legit(port: int, count: int, interval: float) -> dict[str, object]:
    latencies: list[float] = []
    started: list[float] = []
    errors: list[str] = []
    origin = time.monotonic()

    async def one(index: int) -> None:
        await trio.sleep(index * interval)
        try:
            at = time.monotonic() - origin
            latencies.append(await legit_session(port, index))
            started.append(at)
        except (OSError, ConnectionError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            errors.append(f"{index}: {type(exc).__name__}: {exc}")

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(one, index)
    return {"latencies": latencies, "started": started, "origin": origin, "errors": errors}


def legit_main(port: int, count: int, interval: float) -> None:
    """The legitimate client's process: waits for ``go`` on stdin, prints its results."""
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    result = trio.run(run_legit, port, count, interval)
    print(json.dumps(result), flush=True)


# --- report ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def peak_concurrent(events: list[tuple[float, float, str]], unclosed_opens: list[float]) -> int:
    marks = [(o, 1) for o, _, _ in events] + [(c, -1) for _, c, _ in events]
    marks += [(o, 1) for o in unclosed_opens]
    marks.sort()
    now = peak = 0
    for _, step in marks:
        now += step
        peak = max(peak, now)
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, help="stalled connections (10000)")
    parser.add_argument("--legit", type=int, help="legitimate SMTP sessions (100)")
    parser.add_argument("--timeout", type=float, help="the server's header timeout, s (15)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON file")
    parser.add_argument("--role", choices=["legit"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "legit":
        legit_main(args.port, args.legit, args.interval)
        return 0

    wanted = args.connections or (1000 if args.quick else 10_000)
    legit = args.legit or (20 if args.quick else 100)
    timeout = args.timeout or (2.0 if args.quick else DEFAULT_TIMEOUT)
    notes: list[str] = []
    available = raise_nofile(wanted + legit + SPARE_FDS)
    count = min(wanted, available - legit - SPARE_FDS)
    if count < wanted:
        notes.append(
            f"scaled down from {wanted} to {count} stalled connections: RLIMIT_NOFILE's hard "
            f"limit allows {available} descriptors"
        )
    if 2 + (count - 1) // PER_SOURCE >= 250:
        raise SystemExit("too many connections for the 127.0.0.x source addresses")

    with tempfile.TemporaryDirectory(prefix="mailedge-half-headers-") as scratch:
        maildir = Path(scratch) / "Maildir"
        log_file = Path(scratch) / "server.log"
        server = ServerProcess(
            [
                "mailedge-smtp",
                "--header-timeout",
                str(timeout),
                "--max-connections",
                str(count + legit + 100),
                "--nofile",
                str(count + legit + SPARE_FDS),
                "--maildir",
                str(maildir),
                "--log-file",
                str(log_file),
            ]
        )
        sampler = RSSSampler(server)
        interval = (timeout + 1.5) / legit
        legit_process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--role",
                "legit",
                "--port",
                str(server.port),
                "--legit",
                str(legit),
                "--interval",
                str(interval),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert legit_process.stdin is not None
            assert legit_process.stdout is not None
            if legit_process.stdout.readline().strip() != "ready":
                raise RuntimeError("the legitimate client did not start")
            time.sleep(0.5)
            baseline_kib = server.rss_kib() or 0
            sampler.start()
            stalled = Stalled()
            all_open = trio.Event()

            async def attack() -> float:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(go_when_open)
                    return await run_stalled(server, count, timeout, all_open, stalled)
                raise AssertionError("unreachable")

            go_at: list[float] = []

            async def go_when_open() -> None:
                await all_open.wait()
                go_at.append(time.monotonic())
                cpu_marks.append(await trio.to_thread.run_sync(server.cpu))
                assert legit_process.stdin is not None
                legit_process.stdin.write("go\n")
                legit_process.stdin.flush()

            cpu_marks = [server.cpu()]
            attack_start = time.monotonic()
            trio.run(attack)
            attack_end = time.monotonic()
            cpu_marks.append(server.cpu())
            legit_line = legit_process.stdout.readline()
            legit_process.wait(timeout=60)
            legit_result: dict[str, Any] = (
                json.loads(legit_line)
                if legit_line
                else {"latencies": [], "started": [], "origin": 0.0, "errors": []}
            )
            time.sleep(0.3)
            sampler.stop()
            stats = server.stats()
            delivered = len(list((maildir / "new").iterdir())) if maildir.exists() else 0
            log_lines = len(log_file.read_text().splitlines()) if log_file.exists() else 0
        finally:
            sampler.stop()
            if legit_process.poll() is None:
                legit_process.kill()
                legit_process.wait(timeout=10)
            server.stop()

    # -- analysis --
    closed_open = {o for o, _, _ in stalled.closed}
    unclosed = [o for o in stalled.opened if o not in closed_open]
    peak_held = peak_concurrent(stalled.closed, unclosed)
    held_seconds = [c - o for o, c, _ in stalled.closed]
    late = [d for d in held_seconds if not timeout <= d <= timeout + CLOSE_SLACK]
    resets = sum(1 for *_, how in stalled.closed if how == "reset")
    eofs = sum(1 for *_, how in stalled.closed if how == "eof")
    open_seconds = go_at[0] - attack_start if go_at else math.nan
    peak_kib = sampler.peak_kib()
    peak_mb = peak_kib / 1024
    per_connection_kib = (peak_kib - baseline_kib) / max(peak_held, 1)
    latencies_ms = [x * 1e3 for x in legit_result["latencies"]]
    legit_errors: list[str] = legit_result["errors"]
    p99 = percentile(latencies_ms, 0.99)

    rss_ok = peak_mb < RSS_TARGET_MB
    closed_ok = (
        len(stalled.closed) == count
        and not stalled.connect_errors
        and stalled.still_open == 0
        and not late
    )
    legit_ok = len(latencies_ms) == legit and not legit_errors and p99 < P99_TARGET_MS
    # The sessions by when they started: while the stalled connections were only held, while
    # the server was expiring them, or after.
    closed_from = min((c for _, c, _ in stalled.closed), default=math.inf)
    closed_until = max((c for _, c, _ in stalled.closed), default=-math.inf)
    windows: dict[str, list[float]] = {"hold": [], "expiry": [], "after": []}
    for at, ms in zip(legit_result["started"], latencies_ms, strict=True):
        started = legit_result["origin"] + at
        window = (
            "hold" if started < closed_from else "expiry" if started <= closed_until else "after"
        )
        windows[window].append(ms)
    cpu_open_us = (cpu_marks[1] - cpu_marks[0]) / max(len(stalled.opened), 1) * 1e6
    cpu_expiry_us = (cpu_marks[2] - cpu_marks[1]) / max(len(stalled.closed), 1) * 1e6
    counters = stats.get("counters", {})
    assert isinstance(counters, dict)
    timeouts = counters.get("smtp/proxy.timeout/timeout", 0)

    sources = (count - 1) // PER_SOURCE + 1
    print()
    print(
        f"half headers: {count} stalled connections from {sources} source "
        f"address{'es' if sources > 1 else ''}, header timeout {timeout:g} s; "
        f"{legit} legitimate sessions"
    )
    rows = [
        ("stalled connections opened", f"{len(stalled.opened)} in {open_seconds:.2f} s"),
        ("peak held at once (client view)", f"{peak_held}"),
        ("closed by the server", f"{len(stalled.closed)} ({eofs} EOF, {resets} reset)"),
        ("not closed / connect errors", f"{stalled.still_open} / {len(stalled.connect_errors)}"),
        (
            "held for (min / p50 / p99 / max)",
            " / ".join(f"{percentile(held_seconds, q):.3f}" for q in (0.0, 0.5, 0.99, 1.0)) + " s",
        ),
        (f"closed outside [{timeout:g}, {timeout + CLOSE_SLACK:g}] s", f"{len(late)}"),
        ("server proxy.timeout events", f"{timeouts}"),
        ("server RSS baseline / peak", f"{baseline_kib / 1024:.1f} / {peak_mb:.1f} MB"),
        ("RSS per held connection", f"{per_connection_kib:.1f} KiB"),
        (
            "legit sessions completed",
            f"{len(latencies_ms)} of {legit} ({len(legit_errors)} errors)",
        ),
        (
            "legit latency p50 / p99 / max",
            f"{percentile(latencies_ms, 0.5):.1f} / {p99:.1f} / "
            f"{percentile(latencies_ms, 1.0):.1f} ms",
        ),
        *(
            (
                f"  started during {name} ({len(values)})",
                f"{percentile(values, 0.5):.1f} / {percentile(values, 0.99):.1f} / "
                f"{percentile(values, 1.0):.1f} ms",
            )
            for name, values in windows.items()
            if values
        ),
        ("messages in the Maildir", f"{delivered}"),
        ("server CPU per stalled connection", f"{cpu_open_us:.0f} us to accept and hold"),
        ("", f"{cpu_expiry_us:.0f} us to expire and close (legit sessions included)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print()
    print(f"  target: peak RSS < {RSS_TARGET_MB:g} MB: {'met' if rss_ok else 'NOT met'}")
    print(
        "  target: every stalled connection closed at the timeout: "
        + ("met" if closed_ok else "NOT met")
    )
    print(
        f"  target: {legit} legitimate sessions, p99 < {P99_TARGET_MS:g} ms: "
        f"{'met' if legit_ok else 'NOT met'}"
    )
    for note in notes:
        print(f"  note: {note}")
    for error in stalled.connect_errors[:3] + legit_errors[:3]:
        print(f"  error: {error}")

    payload: dict[str, object] = {
        "benchmark": "half_headers",
        "machine": machine_info(),
        "settings": {
            "connections": count,
            "requested_connections": wanted,
            "legit_sessions": legit,
            "header_timeout": timeout,
            "per_source_address": PER_SOURCE,
            "connects_in_flight": CONNECTS_IN_FLIGHT,
            "legit_interval": interval,
            "quick": args.quick,
        },
        "notes": notes,
        "stalled": {
            "opened": len(stalled.opened),
            "open_seconds": round(open_seconds, 3),
            "peak_held": peak_held,
            "closed_eof": eofs,
            "closed_reset": resets,
            "still_open": stalled.still_open,
            "connect_errors": len(stalled.connect_errors),
            "first_connect_errors": stalled.connect_errors[:5],
            "held_seconds": {
                name: round(percentile(held_seconds, q), 4)
                for name, q in (("min", 0.0), ("p50", 0.5), ("p99", 0.99), ("max", 1.0))
            },
            "late": len(late),
            # When the server closed them, in seconds from the start of the attack.
            "closed_from": round(closed_from - attack_start, 3),
            "closed_until": round(closed_until - attack_start, 3),
        },
        "server": {
            "rss_baseline_kib": baseline_kib,
            "rss_peak_kib": peak_kib,
            "rss_per_held_connection_kib": round(per_connection_kib, 2),
            "gate_counters": counters,
            "log_lines": log_lines,
            "attack_seconds": round(attack_end - attack_start, 3),
            "cpu_us_per_stalled_open": round(cpu_open_us, 1),
            "cpu_us_per_stalled_expiry": round(cpu_expiry_us, 1),
        },
        "legit": {
            "completed": len(latencies_ms),
            "errors": legit_errors[:10],
            "p50_ms": round(percentile(latencies_ms, 0.5), 3),
            "p99_ms": round(p99, 3),
            "max_ms": round(percentile(latencies_ms, 1.0), 3),
            "by_window": {
                name: {
                    "sessions": len(values),
                    "p50_ms": round(percentile(values, 0.5), 3),
                    "p99_ms": round(percentile(values, 0.99), 3),
                }
                for name, values in windows.items()
            },
            "delivered": delivered,
            # [start, latency]: seconds from the start of the attack, and milliseconds.
            "sessions": [
                [round(legit_result["origin"] + at - attack_start, 4), round(ms, 3)]
                for at, ms in zip(legit_result["started"], latencies_ms, strict=True)
            ],
        },
        "targets_met": {
            "rss": rss_ok,
            "stalled_closed_at_timeout": closed_ok,
            "legit_p99": legit_ok,
        },
    }
    if not args.no_save:
        print(f"\nresults: {write_results('half_headers', payload)}")
    # The targets are reported, not enforced; a failure is something that broke: a connect
    # error, a stalled connection the server never closed, a legitimate session that failed.
    broken = (
        stalled.connect_errors
        or stalled.still_open
        or len(stalled.closed) != count
        or legit_errors
        or len(latencies_ms) != legit
    )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
