"""What the gate costs a server per connection: mailedge against a bare trio server and aiosmtpd.

Three servers (benchmarks/bench_servers.py), each in its own process on 127.0.0.1, port 0,
one at a time:

- ``bare``: trio with the header parsed minimally (struct-unpack of the v2 fixed part and the
  IPv4 source, no validation): the floor for a trio server doing this exchange;
- ``mailedge``: ``mailedge.serve``: limits, the gate with full validation, the context, the
  idle-timeout stream, and a handler doing the same exchange;
- ``mailedge-console``: ``mailedge`` with the console's decision ring as the gate's event
  sink (as the example server runs it), so every routine decision becomes an event; the
  ratio ``mailedge-console/mailedge`` is what the console costs a connection;
- ``gate`` (informational): the bare server's loop with ``ProxyGate.admit`` and nothing else
  of mailedge's server layer, which splits mailedge's cost into the gate's and the layer's;
- ``aiosmtpd``: aiosmtpd 1.4.6 with ``proxy_protocol_timeout`` (its PROXY support) and a
  ``handle_QUIT`` hook replying with the recovered source.

This process is the client. It opens connections one at a time, then 50 at a time; each
sends a v2 header (``encode_v2``, claiming 198.51.100.x), reads the banner, sends ``QUIT``,
reads ``221 <address>`` and checks that the address is the one its header claimed.

The server's CPU time per connection comes from the server's own
``getrusage(RUSAGE_SELF)`` (user + system), read over its control channel right before and
after each measured phase; warm-up connections are not counted. Latency is client-side,
connect to reply. Rounds rotate the order of the servers; each figure is the median over the
rounds. Only ratios within one run mean anything.

The console's sink costs a few microseconds, less than those servers' run-to-run noise on a
shared machine, so it is also measured in this process (``--sink``, on by default with
``mailedge-console``): ``ProxyGate.admit`` on in-memory streams, a v2 header each, by a gate
without a sink and one with the console's ``DecisionRing``, in alternating blocks, CPU time
per admit; the ratio of the two medians is the sink's share of the gate's own work.

Targets: mailedge at most 10 % more server CPU per connection than the bare server, and no
more than aiosmtpd. They are reported, not enforced: the exit status is 1 only when a
connection failed or got a wrong answer. ``--quick`` is a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio
from bench_servers import (
    ROOT,
    ServerProcess,
    cpu_seconds,
    machine_info,
    raise_nofile,
    write_results,
)

from mailedge.proxy import Command, InetAddress, encode_v2

BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
HOST = "127.0.0.1"
PHASES = ("sequential", "concurrent")
KINDS = ("bare", "gate", "mailedge", "mailedge-console", "aiosmtpd")
CONCURRENCY = 50
# Each connection claims one of these sources, so per-client limits never trip.
CLIENTS = 250
CONNECT_TIMEOUT = 10.0
# The targets, as server CPU per connection ratios; the other ratios are informational.
TARGETS = {"mailedge/bare": 1.10, "mailedge/aiosmtpd": 1.00}


def headers() -> list[tuple[bytes, bytes]]:
    """(v2 header, the reply it must produce) for each claimed source."""
    out = []
    destination = InetAddress(ipaddress.IPv4Address("192.0.2.25"), 25)
    for i in range(CLIENTS):
        source = InetAddress(ipaddress.IPv4Address(f"198.51.100.{i + 1}"), 40000 + i)
        out.append((encode_v2(Command.PROXY, source, destination), f"221 {source.ip}\r\n".encode()))
    return out


HEADERS = headers()


# --- the server processes ------------------------------------------------------------------


def server_python(kind: str) -> tuple[str | None, str]:
    """The interpreter to run ``kind`` with, or None and the reason it cannot run."""
    if kind != "aiosmtpd" or importlib.util.find_spec("aiosmtpd") is not None:
        return sys.executable, ""
    if BENCH_PYTHON.exists():
        probe = subprocess.run(
            [str(BENCH_PYTHON), "-c", "import aiosmtpd"], capture_output=True, check=False
        )
        if probe.returncode == 0:
            return str(BENCH_PYTHON), ""
    return None, "aiosmtpd is not installed here nor in .venv-bench (run `make bench`)"


# --- the client ----------------------------------------------------------------------------


class Mismatch(Exception):
    """A server answered something other than what the header claimed."""


async def _receive_line(sock: trio.socket.SocketType) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = await sock.recv(4096)
        if not chunk:
            raise Mismatch(f"connection closed after {data!r}")
        data += chunk
    return data


async def one_connection(port: int, index: int) -> float:
    """One exchange; returns its latency, connect to reply, in seconds."""
    header, expected = HEADERS[index % CLIENTS]
    start = time.perf_counter()
    with trio.fail_after(CONNECT_TIMEOUT):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await sock.connect((HOST, port))
            await sock.send(header)
            banner = await _receive_line(sock)
            if not banner.startswith(b"220 "):
                raise Mismatch(f"banner {banner!r}")
            await sock.send(b"QUIT\r\n")
            reply = await _receive_line(sock)
            if reply != expected:
                raise Mismatch(f"expected {expected!r}, got {reply!r}")
    return time.perf_counter() - start


@dataclass
class Phase:
    name: str
    connections: int
    concurrency: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.connections / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_connection_us(self) -> float:
        return self.cpu_seconds / self.connections * 1e6

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    def summary(self) -> dict[str, object]:
        return {
            "connections": self.connections,
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 4),
            "connections_per_second": round(self.rate, 1),
            "server_cpu_seconds": round(self.cpu_seconds, 6),
            "server_cpu_us_per_connection": round(self.cpu_per_connection_us, 2),
            "client_cpu_us_per_connection": round(
                self.client_cpu_seconds / self.connections * 1e6, 2
            ),
            "p50_ms": round(self.percentile_ms(0.50), 3),
            "p99_ms": round(self.percentile_ms(0.99), 3),
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
        }


async def run_connections(port: int, count: int, concurrency: int, phase: Phase) -> None:
    counter = iter(range(count))

    async def worker() -> None:
        for index in counter:
            try:
                phase.latencies.append(await one_connection(port, index))
            except (OSError, Mismatch, trio.TooSlowError) as exc:
                phase.errors.append(f"{type(exc).__name__}: {exc}")

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)


def measure(server: ServerProcess, count: int, concurrency: int, name: str) -> Phase:
    phase = Phase(name, count, concurrency)
    cpu_before = server.cpu()
    client_before = sum(cpu_seconds())
    start = time.perf_counter()
    trio.run(run_connections, server.port, count, concurrency, phase)
    phase.seconds = time.perf_counter() - start
    phase.client_cpu_seconds = sum(cpu_seconds()) - client_before
    phase.cpu_seconds = server.cpu() - cpu_before
    return phase


def run_server(
    kind: str, python: str, sequential: int, concurrent: int, warmup: int
) -> list[Phase]:
    server = ServerProcess([kind], python)
    try:
        warm = Phase("warmup", warmup, CONCURRENCY)
        trio.run(run_connections, server.port, warmup // 2, 1, warm)
        trio.run(run_connections, server.port, warmup - warmup // 2, CONCURRENCY, warm)
        if warm.errors:
            raise RuntimeError(f"{kind}: warm-up failed: {warm.errors[:3]}")
        return [
            measure(server, sequential, 1, "sequential"),
            measure(server, concurrent, CONCURRENCY, "concurrent"),
        ]
    finally:
        server.stop()


# --- the console's sink, in process ----------------------------------------------------------

SINK_BLOCK = 500


def sink_overhead(blocks: int) -> dict[str, float]:
    """CPU microseconds per ``admit`` without and with the decision ring as the gate's sink."""
    import trio.testing
    from bench_servers import _mailedge_settings

    from mailedge.decisions import DecisionRing
    from mailedge.gate import ProxyGate

    settings = _mailedge_settings(10.0, 512)
    gates = {
        "no sink": ProxyGate(settings),
        "decision ring": ProxyGate(settings, on_event=DecisionRing().record),
    }
    samples: dict[str, list[float]] = {name: [] for name in gates}

    async def block(gate: ProxyGate) -> float:
        start = time.process_time()
        for index in range(SINK_BLOCK):
            ours, theirs = trio.testing.memory_stream_pair()
            await theirs.send_all(HEADERS[index % CLIENTS][0])
            _, context = await gate.admit(
                ours, listener="smtp", peer=(HOST, 40000), local=(HOST, 25)
            )
            assert context.proxied
        return (time.process_time() - start) / SINK_BLOCK * 1e6

    async def run() -> None:
        for _ in range(2):  # warm-up
            for gate in gates.values():
                await block(gate)
        for round_ in range(blocks):
            # Alternate which goes first, so drift in the machine's load hits both alike.
            order = list(gates.items()) if round_ % 2 == 0 else list(gates.items())[::-1]
            for name, gate in order:
                samples[name].append(await block(gate))

    trio.run(run)
    result = {name: median(values) for name, values in samples.items()}
    result["ratio"] = result["decision ring"] / result["no sink"]
    return result


# --- report --------------------------------------------------------------------------------


def _loadavg() -> list[float]:
    """The machine's load averages: other work on it skews every number here."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--sequential", type=int, help="connections one at a time (3000)")
    parser.add_argument("--concurrent", type=int, help=f"connections {CONCURRENCY} at a time")
    parser.add_argument("--rounds", type=int, help="rounds, servers rotated each round (3)")
    parser.add_argument(
        "--servers", default=",".join(KINDS), help=f"which servers, comma-separated ({KINDS})"
    )
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON file")
    parser.add_argument(
        "--sink",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the console's sink in process (default: with mailedge-console)",
    )
    args = parser.parse_args(argv)
    kinds = [kind for kind in args.servers.split(",") if kind]
    if not set(kinds) <= set(KINDS):
        parser.error(f"--servers: choose from {', '.join(KINDS)}")
    sequential = args.sequential or (300 if args.quick else 3000)
    concurrent = args.concurrent or (300 if args.quick else 3000)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = 100 if args.quick else 400
    raise_nofile(4096)
    load_before = _loadavg()

    pythons: dict[str, str] = {}
    unavailable: dict[str, str] = {}
    for kind in kinds:
        python, reason = server_python(kind)
        if python is None:
            unavailable[kind] = reason
        else:
            pythons[kind] = python
    runs: dict[str, list[list[Phase]]] = {kind: [] for kind in pythons}
    order = list(pythons)
    for round_ in range(rounds):
        rotated = order[round_ % len(order) :] + order[: round_ % len(order)]
        for kind in rotated:
            print(f"round {round_ + 1}/{rounds}: {kind} ...", file=sys.stderr, flush=True)
            runs[kind].append(run_server(kind, pythons[kind], sequential, concurrent, warmup))

    # Per server and phase: the median over rounds.
    table: dict[str, dict[str, dict[str, float]]] = {}
    for kind, kind_runs in runs.items():
        table[kind] = {}
        for index, phase_name in enumerate(PHASES):
            phases = [run[index] for run in kind_runs]
            table[kind][phase_name] = {
                "cpu_us": median([p.cpu_per_connection_us for p in phases]),
                "rate": median([p.rate for p in phases]),
                "p50_ms": median([p.percentile_ms(0.50) for p in phases]),
                "p99_ms": median([p.percentile_ms(0.99) for p in phases]),
                "errors": float(sum(len(p.errors) for p in phases)),
            }
        total_cpu = [sum(p.cpu_seconds for p in run) for run in kind_runs]
        total_conns = sequential + concurrent
        table[kind]["all"] = {"cpu_us": median([c / total_conns * 1e6 for c in total_cpu])}

    print()
    print(
        f"gate overhead: {sequential} sequential + {concurrent} at concurrency {CONCURRENCY}, "
        f"median of {rounds} round(s); server CPU from the server's own getrusage"
    )
    header = (
        f"{'server':<16} {'phase':<11} {'conn/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU us/conn':>12} {'errors':>7}"
    )
    print(header)
    print("-" * len(header))
    for kind, by_phase in table.items():
        for phase_name in ("sequential", "concurrent"):
            row = by_phase[phase_name]
            print(
                f"{kind:<16} {phase_name:<11} {row['rate']:>8.0f} {row['p50_ms']:>8.2f} "
                f"{row['p99_ms']:>8.2f} {row['cpu_us']:>12.1f} {row['errors']:>7.0f}"
            )
    for kind, reason in unavailable.items():
        print(f"{kind:<16} n/a: {reason}")

    ratios: dict[str, dict[str, float]] = {}
    verdicts: dict[str, bool] = {}
    pairs = [
        ("mailedge", "bare"),
        ("mailedge", "aiosmtpd"),
        ("gate", "bare"),
        ("mailedge", "gate"),
        ("mailedge-console", "mailedge"),
    ]
    for mine, other in pairs:
        if mine in table and other in table:
            ratios[f"{mine}/{other}"] = {
                phase: table[mine][phase]["cpu_us"] / table[other][phase]["cpu_us"]
                for phase in ("sequential", "concurrent", "all")
            }
    if ratios:
        print()
        print("server CPU per connection, ratios")
        for name, ratio in ratios.items():
            cells = "  ".join(f"{phase} {value:.3f}" for phase, value in ratio.items())
            limit = TARGETS.get(name)
            if limit is None:
                verdict = "(informational)"
            else:
                verdicts[name] = all(value <= limit for value in ratio.values())
                verdict = f"target <= {limit:.2f}: {'met' if verdicts[name] else 'NOT met'}"
            print(f"  {name:<26} {cells}  {verdict}")

    sink: dict[str, float] = {}
    if args.sink or (args.sink is None and "mailedge-console" in kinds):
        print("\nthe console's sink, in process ...", file=sys.stderr, flush=True)
        sink = sink_overhead(10 if args.quick else 40)
        print(
            f"\nProxyGate.admit, CPU us per connection (median of blocks of {SINK_BLOCK}): "
            f"no sink {sink['no sink']:.2f}, decision ring {sink['decision ring']:.2f}, "
            f"ratio {sink['ratio']:.3f} (+{sink['decision ring'] - sink['no sink']:.2f} us)"
        )

    errors = sum(by_phase[name]["errors"] for by_phase in table.values() for name in PHASES)
    payload: dict[str, object] = {
        "benchmark": "gate_overhead",
        "machine": machine_info(),
        "settings": {
            "sequential": sequential,
            "concurrent": concurrent,
            "concurrency": CONCURRENCY,
            "rounds": rounds,
            "warmup": warmup,
            "quick": args.quick,
        },
        "interpreters": pythons,
        "unavailable": unavailable,
        "rounds": {
            kind: [[phase.summary() for phase in run] for run in kind_runs]
            for kind, kind_runs in runs.items()
        },
        "median": table,
        "cpu_ratios": ratios,
        "sink_in_process_us": sink,
        "targets_met": verdicts,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
    }
    if not args.no_save:
        print(f"\nresults: {write_results('gate_overhead', payload)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
