"""The server programs the resilience benchmarks run, each in its own process.

``python benchmarks/bench_servers.py KIND [options]`` starts one server on 127.0.0.1, port 0,
and speaks a line protocol with the benchmark that started it:

- on stdout, once bound: ``PORT <port>``;
- on stdin, ``cpu``: the server answers ``CPU <user> <system>``, its own
  ``resource.getrusage(RUSAGE_SELF)`` in seconds;
- on stdin, ``stats``: the server answers ``STATS <json>`` (mailedge's gate counters);
- ``quit`` or the end of stdin: the server stops.

The kinds:

``bare``
    trio, no mailedge: reads the v2 header with the least possible work (the 16-byte fixed
    part and the IPv4 source, struct-unpacked, nothing validated), sends a banner, reads one
    line, replies ``221 <source>`` and closes.
``mailedge``
    ``mailedge.serve`` with the gate, the context and the same exchange as ``bare``, the
    reply carrying ``context.client_ip``.
``mailedge-console``
    ``mailedge`` with the console's decision ring (``mailedge.decisions.DecisionRing``) as
    the gate's ``on_event`` sink, as the example server wires it: what the console costs.
``gate``
    informational: the bare server's loop with ``ProxyGate.admit`` in place of its minimal
    parse, and nothing else of the server layer (no limits, hooks or idle timeouts), so the
    gate's own share of mailedge's cost can be told from the server layer's.
``aiosmtpd``
    aiosmtpd's own SMTP server with its PROXY support on (``proxy_protocol_timeout``); a
    ``handle_QUIT`` hook replies ``221 <source>`` from the session's ``proxy_data``. Needs
    ``.venv-bench`` (``make bench``).
``mailedge-smtp``
    ``mailedge.serve`` with the example SMTP handler delivering into a Maildir, for
    ``half_headers.py``: a header timeout, a connection cap and a log file from the options.

Every server binds loopback only. This module also holds what the benchmark scripts share:
the machine description and the results file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import resource
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
BANNER = b"220 bench.example ESMTP\r\n"
# The same listen backlog as mailedge's server layer, so that no server gets a deeper queue.
BACKLOG = 128
# The overhead benchmark's header timeout; no connection there ever comes near it.
HEADER_TIMEOUT = 5.0
MAX_LINE = 512


# --- shared with the benchmark scripts -------------------------------------------------------

# How long a server may take to start or to answer on its control channel; a loaded
# 2-vCPU machine holding 10,000 connections answers within a few seconds.
CONTROL_TIMEOUT = 30.0
SCRIPT = Path(__file__).resolve()


class ServerProcess:
    """One of this script's servers in its own process, driven over its control channel."""

    def __init__(self, args: list[str], python: str = sys.executable) -> None:
        self.kind = args[0]
        self.python = python
        self.process = subprocess.Popen(
            [python, str(SCRIPT), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            cwd=ROOT,
        )
        line = self.read_line()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"{self.kind} server did not start: {line!r}")
        self.port = int(line.split()[1])

    def read_line(self) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + CONTROL_TIMEOUT
        data = b""
        while not data.endswith(b"\n"):
            left = max(deadline - time.monotonic(), 0)
            if not select.select([self.process.stdout], [], [], left)[0]:
                raise TimeoutError(f"{self.kind} server did not answer in {CONTROL_TIMEOUT} s")
            chunk = self.process.stdout.read(1)
            if not chunk:
                raise RuntimeError(f"{self.kind} server exited ({self.process.poll()})")
            data += chunk
        return data.decode().strip()

    def ask(self, command: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        return self.read_line()

    def cpu(self) -> float:
        """The server's user + system CPU seconds so far."""
        _, user, system = self.ask("cpu").split()
        return float(user) + float(system)

    def stats(self) -> dict[str, Any]:
        """The server's ``stats`` answer (mailedge's gate counters and open connections)."""
        stats: dict[str, Any] = json.loads(self.ask("stats").split(" ", 1)[1])
        return stats

    def rss_kib(self) -> int | None:
        """The server's VmRSS, or None once it has gone."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            try:
                self.process.stdin.write(b"quit\n")
                self.process.stdin.close()
                self.process.wait(timeout=CONTROL_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def machine_info() -> dict[str, object]:
    """What the numbers were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "trio": trio.__version__,
        "rlimit_nofile": [soft, hard],
    }


def write_results(name: str, payload: dict[str, object]) -> Path:
    """Write ``payload`` to benchmarks/results/<name>-<UTC timestamp>.json; return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def raise_nofile(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never past the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


# --- the control channel ---------------------------------------------------------------------


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _answer(command: str, stats: Callable[[], dict[str, Any]]) -> bool:
    """Answer one control line; False means stop."""
    if command == "cpu":
        user, system = cpu_seconds()
        _say(f"CPU {user:.6f} {system:.6f}")
    elif command == "stats":
        _say("STATS " + json.dumps(stats(), sort_keys=True))
    elif command in ("quit", ""):
        return False
    else:
        _say(f"ERROR unknown command {command!r}")
    return True


async def _trio_control(stats: Callable[[], dict[str, Any]], stop: trio.CancelScope) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    pending = b""
    async with stdin:
        while True:
            data = await stdin.receive_some(4096)
            if not data:
                break
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if not _answer(line.decode().strip(), stats):
                    stop.cancel()
                    return
    stop.cancel()


def _no_stats() -> dict[str, Any]:
    return {}


# --- the bare trio server --------------------------------------------------------------------


async def _read_line(stream: trio.abc.ReceiveStream, pending: bytearray) -> bytes | None:
    while b"\r\n" not in pending:
        if len(pending) > MAX_LINE:
            return None
        data = await stream.receive_some(4096)
        if not data:
            return None
        pending += data
    line, _, rest = bytes(pending).partition(b"\r\n")
    pending[:] = rest
    return line


async def _bare_connection(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            buffer = bytearray()
            while len(buffer) < 16:
                data = await stream.receive_some(4096)
                if not data:
                    return
                buffer += data
            # The least a server can do: the fixed part's length, and the IPv4 source.
            (length,) = struct.unpack_from("!H", buffer, 14)
            while len(buffer) < 16 + length:
                data = await stream.receive_some(4096)
                if not data:
                    return
                buffer += data
            source = ".".join(map(str, struct.unpack_from("!4B", buffer, 16)))
            pending = bytearray(buffer[16 + length :])
            await stream.send_all(BANNER)
            if await _read_line(stream, pending) is None:
                return
            await stream.send_all(f"221 {source}\r\n".encode())
        except trio.BrokenResourceError:
            return


async def run_bare() -> None:
    listeners = await trio.open_tcp_listeners(0, host=HOST, backlog=BACKLOG)
    _say(f"PORT {listeners[0].socket.getsockname()[1]}")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, _bare_connection, listeners)
        await _trio_control(_no_stats, nursery.cancel_scope)


async def run_gate() -> None:
    from mailedge.gate import ProxyGate, ProxyRejected

    gate = ProxyGate(_mailedge_settings(HEADER_TIMEOUT, 512))

    async def connection(tcp: trio.SocketStream) -> None:
        async with tcp:
            try:
                peer = tcp.socket.getpeername()
                local = tcp.socket.getsockname()
                stream, context = await gate.admit(
                    tcp, listener="smtp", peer=(peer[0], peer[1]), local=(local[0], local[1])
                )
                await _mailedge_exchange(stream, context)
            except (ProxyRejected, trio.BrokenResourceError, OSError):
                return

    listeners = await trio.open_tcp_listeners(0, host=HOST, backlog=BACKLOG)
    _say(f"PORT {listeners[0].socket.getsockname()[1]}")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, connection, listeners)
        await _trio_control(_no_stats, nursery.cancel_scope)


# --- mailedge --------------------------------------------------------------------------------


def _mailedge_settings(timeout: float, max_connections: int) -> Any:
    from mailedge.networks import TrustedNetworks
    from mailedge.settings import (
        BindAddress,
        ListenerProtocol,
        NetworkListener,
        Settings,
        SystemSettings,
    )

    return Settings(
        system=SystemSettings(proxy_trusted_networks=TrustedNetworks(["127.0.0.0/8"])),
        listeners=(
            NetworkListener(
                name="smtp",
                protocol=ListenerProtocol.SMTP,
                bind=(BindAddress.parse(f"{HOST}:0"),),
                proxy_header_timeout=timeout,
                max_connections=max_connections,
            ),
        ),
    )


async def _mailedge_exchange(stream: trio.abc.Stream, context: Any) -> None:
    """The same exchange as the bare server's, with the client the gate recovered."""
    await stream.send_all(BANNER)
    if await _read_line(stream, bytearray()) is None:
        return
    await stream.send_all(f"221 {context.client_ip}\r\n".encode())


async def run_mailedge(
    handler: Callable[[trio.abc.Stream, Any], Any],
    header_timeout: float,
    max_connections: int,
    decision_ring: bool = False,
) -> None:
    from mailedge.decisions import DecisionRing
    from mailedge.gate import ProxyGate
    from mailedge.server import Server, serve
    from mailedge.settings import ListenerProtocol

    settings = _mailedge_settings(header_timeout, max_connections)
    gate = ProxyGate(settings, on_event=DecisionRing().record) if decision_ring else None
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            lambda task_status: serve(
                settings, {ListenerProtocol.SMTP: handler}, gate=gate, task_status=task_status
            )
        )
        _say(f"PORT {server.addresses['smtp'][0][1]}")

        def stats() -> dict[str, Any]:
            counts = {"/".join(key): n for key, n in server.gate.counters}
            return {"counters": counts, "open": server.limits.open_on("smtp")}

        await _trio_control(stats, nursery.cancel_scope)


def _smtp_handler(maildir: Path) -> Callable[[trio.abc.Stream, Any], Any]:
    from mailedge_examples.smtp_handler import SMTPHandler

    handler: Callable[[trio.abc.Stream, Any], Any] = SMTPHandler(
        hostname="bench.example", maildir=maildir
    )
    return handler


# --- aiosmtpd --------------------------------------------------------------------------------


def run_aiosmtpd() -> None:
    from aiosmtpd.smtp import SMTP

    class Handler:
        async def handle_PROXY(
            self, server: Any, session: Any, envelope: Any, proxy_data: Any
        ) -> bool:
            return bool(proxy_data.valid)

        async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
            return f"221 {session.proxy_data.src_addr}"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Handler()
        server = await loop.create_server(
            lambda: SMTP(
                handler,
                hostname="bench.example",
                ident="ESMTP",
                proxy_protocol_timeout=HEADER_TIMEOUT,
                loop=loop,
            ),
            HOST,
            0,
            backlog=BACKLOG,
        )
        _say(f"PORT {server.sockets[0].getsockname()[1]}")
        done = loop.create_future()
        pending = bytearray()
        fd = sys.stdin.fileno()

        def on_stdin() -> None:
            data = os.read(fd, 4096)
            if not data:
                loop.remove_reader(fd)
                done.set_result(None)
                return
            pending.extend(data)
            while b"\n" in pending:
                line, _, rest = bytes(pending).partition(b"\n")
                pending[:] = rest
                if not _answer(line.decode().strip(), _no_stats):
                    loop.remove_reader(fd)
                    if not done.done():
                        done.set_result(None)
                    return

        loop.add_reader(fd, on_stdin)
        await done
        server.close()
        await server.wait_closed()

    asyncio.run(main())


# --- entry point -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "kind",
        choices=["bare", "gate", "mailedge", "mailedge-console", "aiosmtpd", "mailedge-smtp"],
    )
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT)
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--nofile", type=int, default=0, help="raise RLIMIT_NOFILE to this")
    parser.add_argument("--maildir", type=Path, help="mailedge-smtp: where mail is delivered")
    parser.add_argument("--log-file", type=Path, help="where the server logs (WARNING and up)")
    args = parser.parse_args(argv)
    if args.nofile:
        raise_nofile(args.nofile)
    if args.log_file is not None:
        logging.basicConfig(filename=args.log_file, level=logging.WARNING)
    else:
        # Nothing on stdout but the control lines; problems still show on stderr.
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    if args.kind == "bare":
        trio.run(run_bare)
    elif args.kind == "gate":
        trio.run(run_gate)
    elif args.kind in ("mailedge", "mailedge-console"):
        trio.run(
            run_mailedge,
            _mailedge_exchange,
            args.header_timeout,
            args.max_connections,
            args.kind == "mailedge-console",
        )
    elif args.kind == "aiosmtpd":
        run_aiosmtpd()
    else:
        with tempfile.TemporaryDirectory(prefix="mailedge-bench-") as scratch:
            maildir = args.maildir or Path(scratch) / "Maildir"
            trio.run(
                run_mailedge, _smtp_handler(maildir), args.header_timeout, args.max_connections
            )


if __name__ == "__main__":
    main()
