"""Headers per second: mailedge's parser against the Python peers, in one process.

Run it with ``make bench``, which builds ``.venv-bench`` with the peers
(benchmarks/requirements-peers.txt). Run from the project's own venv it measures mailedge
alone and marks every peer unavailable. ``--quick`` is a seconds-long smoke run.

Every header is built with mailedge's encoders, and every parser is first checked to parse
it to the right source address and port; a parser that fails is shown as n/a with the
reason, never with a number. All parsers get the very same ``bytes`` object, nothing is
cached between calls, and mailedge runs with its defaults: full validation and CRC32C.
The numbers are best-of-N rates; only ratios within one run mean anything.

mailedge validates a header in full when it parses it, but builds its addresses, TLVs and
SSL details only when they are first read. So each kind is timed twice: the parse alone,
and the parse followed by reading the source address and port, as a server does on every
connection (mailedge then builds an InetAddress and an ipaddress object; each peer reads
whatever its result holds, a string for some).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from peers import Endpoint, Peer, RawEndpoint, TLVReading, Unavailable, load_peers

from mailedge.proxy import (
    TLV,
    ClientFlags,
    Command,
    InetAddress,
    ProxyHeader,
    SSLInfo,
    TLVType,
    encode_v1,
    encode_v2,
    parse_header,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MAILEDGE = "mailedge"
# The note on a "read the source" cell whose parser returns the address as text.
STR_SOURCE_NOTE = "source address read as a str"

FULL_ITERATIONS = 5_000
FULL_REPEATS = 13
QUICK_ITERATIONS = 200
QUICK_REPEATS = 2

# --- the headers -----------------------------------------------------------------------------

SOURCE4 = InetAddress(ipaddress.IPv4Address("192.0.2.10"), 51234)
DESTINATION4 = InetAddress(ipaddress.IPv4Address("198.51.100.25"), 25)
SOURCE6 = InetAddress(ipaddress.IPv6Address("2001:db8:85a3::8a2e:370:7334"), 51234)
DESTINATION6 = InetAddress(ipaddress.IPv6Address("2001:db8::25"), 587)

ALPN = b"smtp"
AUTHORITY = "mail.example.com"
SSL_VERSION = "TLSv1.3"
SSL_CN = "client.example.org"
UNIQUE_ID = bytes(range(0x41, 0x41 + 16))
EXPECTED_TLVS: TLVReading = (ALPN, AUTHORITY, SSL_VERSION, SSL_CN, UNIQUE_ID)


def _tlv_header() -> bytes:
    return encode_v2(
        Command.PROXY,
        SOURCE6,
        DESTINATION6,
        tlvs=[
            TLV(TLVType.ALPN, ALPN),
            TLV(TLVType.AUTHORITY, AUTHORITY.encode("ascii")),
            TLV(TLVType.UNIQUE_ID, UNIQUE_ID),
        ],
        ssl=SSLInfo(
            client=ClientFlags.SSL | ClientFlags.CERT_CONN | ClientFlags.CERT_SESS,
            verify=0,
            version=SSL_VERSION,
            cn=SSL_CN,
        ),
    )


@dataclass(frozen=True)
class Kind:
    """One row of the table: a header, and whether the timed call also reads its TLVs."""

    key: str
    label: str
    data: bytes
    source: InetAddress
    has_tlvs: bool = False
    read_tlvs: bool = False
    checks_crc: bool = False
    # The timed call also reads the source address and port from the parser's result.
    read_source: bool = False


def build_kinds() -> list[Kind]:
    """The parse-only kinds, the TLV-reading one, then each parse-only kind reading its source."""
    tlv_header = _tlv_header()
    parse_only = [
        Kind("v1_tcp4", "v1 TCP4", encode_v1(SOURCE4, DESTINATION4), SOURCE4),
        Kind("v1_tcp6", "v1 TCP6", encode_v1(SOURCE6, DESTINATION6), SOURCE6),
        Kind("v2_tcp4", "v2 TCP4", encode_v2(Command.PROXY, SOURCE4, DESTINATION4), SOURCE4),
        Kind(
            "v2_tcp6_tlvs",
            "v2 TCP6 + TLVs (ALPN, AUTHORITY, SSL, UNIQUE_ID)",
            tlv_header,
            SOURCE6,
            has_tlvs=True,
        ),
        Kind(
            "v2_tcp4_crc32c",
            "v2 TCP4 + CRC32C",
            encode_v2(Command.PROXY, SOURCE4, DESTINATION4, crc32c=True),
            SOURCE4,
            checks_crc=True,
        ),
    ]
    read_tlvs = Kind(
        "v2_tcp6_tlvs_read",
        "v2 TCP6 + TLVs, parse and read the TLVs",
        tlv_header,
        SOURCE6,
        has_tlvs=True,
        read_tlvs=True,
    )
    read_source = [
        Kind(
            f"{kind.key}_source",
            f"{kind.label}, parse and read the source",
            kind.data,
            kind.source,
            has_tlvs=kind.has_tlvs,
            checks_crc=kind.checks_crc,
            read_source=True,
        )
        for kind in parse_only
    ]
    return [*parse_only, read_tlvs, *read_source]


def _corrupt_crc(data: bytes) -> bytes:
    """The same v2 header with one bit of its CRC32C value flipped."""
    address_length = {0x1: 12, 0x2: 36, 0x3: 216}.get(data[13] >> 4, 0)
    offset = 16 + address_length
    while offset + 3 <= len(data):
        type_ = data[offset]
        length = int.from_bytes(data[offset + 1 : offset + 3], "big")
        if type_ == TLVType.CRC32C:
            mutable = bytearray(data)
            mutable[offset + 3] ^= 0x01
            return bytes(mutable)
        offset += 3 + length
    raise ValueError("the header has no CRC32C TLV")


# --- the parsers -----------------------------------------------------------------------------


def _mailedge_source(result: object) -> Endpoint:
    if not isinstance(result, tuple):
        raise TypeError(f"parse_header returned {result!r}")
    header = result[0]
    if not isinstance(header, ProxyHeader) or not isinstance(header.source, InetAddress):
        raise TypeError(f"parse_header returned {result!r}")
    return header.source.ip, header.source.port


def _mailedge_read_source(result: object) -> RawEndpoint:
    # What a server does with every header: the client's address and port, built now.
    header: ProxyHeader = result[0]  # type: ignore[index]  # checked by _verify first
    source = header.source
    assert source is not None  # an InetAddress on every kind here
    return source.ip, source.port  # type: ignore[union-attr]


def _mailedge_read_tlvs(data: bytes) -> TLVReading:
    parsed = parse_header(data)
    if parsed is None:
        raise ValueError("parse_header wants more bytes")
    header = parsed[0]
    ssl = header.ssl
    if ssl is None:
        raise ValueError("no SSL TLV")
    return header.alpn, header.authority, ssl.version, ssl.cn, header.unique_id


@dataclass
class Cell:
    """One parser on one kind: the samples, or why there are none."""

    status: str = "ok"
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    samples_ns: list[int] = field(default_factory=list)
    crc_checked: bool | None = None
    call: Callable[[bytes], object] | None = None

    def best_rate(self, iterations: int) -> float | None:
        if not self.samples_ns:
            return None
        return iterations * 1e9 / min(self.samples_ns)

    def median_rate(self, iterations: int) -> float | None:
        if not self.samples_ns:
            return None
        return iterations * 1e9 / statistics.median(self.samples_ns)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:200]


def _parse_and_read_source(
    parse: Callable[[bytes], object], read_source: Callable[[object], RawEndpoint]
) -> Callable[[bytes], RawEndpoint]:
    """The timed call of a "parse and read the source" kind, the same shape for every parser."""

    def call(data: bytes) -> RawEndpoint:
        return read_source(parse(data))

    return call


def _verify(
    kind: Kind,
    parse: Callable[[bytes], object],
    source: Callable[[object], Endpoint],
    read_tlvs: Callable[[bytes], TLVReading] | None,
    read_source: Callable[[object], RawEndpoint],
) -> Cell:
    """Check that the parser gets this header right; the Cell says what to time, or why not."""
    cell = Cell()
    if kind.read_tlvs:
        if read_tlvs is None:
            return Cell(status="n/a", reason="exposes no TLVs")
        try:
            reading = read_tlvs(kind.data)
        except Exception as error:
            return Cell(status="n/a", reason=f"failed: {_describe(error)}")
        if reading != EXPECTED_TLVS:
            return Cell(status="n/a", reason=f"read the TLVs wrong: {reading!r}")
        cell.call = read_tlvs
        return cell
    try:
        endpoint = source(parse(kind.data))
    except Exception as error:
        return Cell(status="n/a", reason=f"rejected the header: {_describe(error)}")
    expected = (kind.source.ip, kind.source.port)
    if endpoint != expected:
        return Cell(status="n/a", reason=f"wrong source {endpoint!r}, expected {expected!r}")
    timed = parse
    text_address = False  # the source address read back as a str, not an ipaddress object
    if kind.read_source:
        timed = _parse_and_read_source(parse, read_source)
        try:
            ip, port = timed(kind.data)
            read = (_as_ip(ip), port)
            text_address = isinstance(ip, str)
        except Exception as error:
            return Cell(status="n/a", reason=f"could not read the source: {_describe(error)}")
        if read != expected:
            return Cell(status="n/a", reason=f"read source {read!r}, expected {expected!r}")
    if kind.checks_crc:
        try:
            source(parse(_corrupt_crc(kind.data)))
        except Exception:
            cell.crc_checked = True
        else:
            cell.crc_checked = False
            cell.notes.append("no CRC check")
    if text_address:
        cell.notes.append(STR_SOURCE_NOTE)
    cell.call = timed
    return cell


def _as_ip(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    return ipaddress.ip_address(str(value))


def _time(call: Callable[[bytes], object], data: bytes, iterations: int) -> int:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in itertools.repeat(None, iterations):
            call(data)
        return time.perf_counter_ns() - start
    finally:
        gc.enable()


# --- reporting -------------------------------------------------------------------------------


def machine_info() -> dict[str, object]:
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load: list[float] | None = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        load = None
    return {
        "nproc": os.cpu_count(),
        "loadavg": load,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "python_build": " ".join(platform.python_build()),
    }


def _rate(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M/s"
    return f"{value / 1e3:.0f}k/s"


@dataclass
class Row:
    kind: Kind
    cells: dict[str, Cell]


def _fastest_peer(row: Row, peer_names: list[str], iterations: int) -> tuple[str, float] | None:
    rates = [
        (name, rate)
        for name in peer_names
        if (rate := row.cells[name].best_rate(iterations)) is not None
    ]
    return max(rates, key=lambda item: item[1]) if rates else None


def _paired_ratio(row: Row, peer: str) -> float | None:
    """The median, over rounds, of mailedge's speed over the peer's in that same round.

    Each round times every parser back to back, so this ratio shrugs off load that comes
    and goes between rounds, which the best-of rates do not see.
    """
    mine = row.cells[MAILEDGE].samples_ns
    theirs = row.cells[peer].samples_ns
    if not mine or len(mine) != len(theirs):
        return None
    return statistics.median(peer_ns / my_ns for my_ns, peer_ns in zip(mine, theirs, strict=True))


def render_table(rows: list[Row], columns: list[str], iterations: int) -> str:
    peer_names = columns[1:]
    footnotes: dict[str, str] = {}

    def mark(text: str) -> str:
        if text not in footnotes:
            footnotes[text] = f"[{len(footnotes) + 1}]"
        return footnotes[text]

    header = ["kind", *columns, "fastest peer", "mailedge / fastest", "paired median"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [row.kind.label]
        for name in columns:
            cell = row.cells[name]
            if cell.status != "ok":
                values.append("n/a " + mark(f"{name}: {cell.reason}"))
                continue
            text = _rate(cell.best_rate(iterations))
            for note in cell.notes:
                text += " " + mark(note)
            values.append(text)
        fastest = _fastest_peer(row, peer_names, iterations)
        mine = row.cells[MAILEDGE].best_rate(iterations)
        paired = None if fastest is None else _paired_ratio(row, fastest[0])
        if fastest is None or mine is None or paired is None:
            values += ["n/a", "n/a", "n/a"]
        else:
            values += [fastest[0], f"{mine / fastest[1]:.2f}x", f"{paired:.2f}x"]
        lines.append("| " + " | ".join(values) + " |")
    if footnotes:
        lines.append("")
        lines += [f"{marker} {text}" for text, marker in footnotes.items()]
    return "\n".join(lines)


def _peer_json(peer: Peer | Unavailable) -> dict[str, object]:
    if isinstance(peer, Unavailable):
        return {"name": peer.name, "distribution": peer.name, "unavailable": peer.reason}
    adapter = peer.adapter
    return {
        "name": peer.name,
        "distribution": peer.name,
        "version": peer.version,
        "call": adapter.call,
        "source_call": adapter.source_call,
        "tlv_call": adapter.tlv_call,
        "tlv_note": adapter.tlv_note,
    }


def results_json(
    rows: list[Row],
    columns: list[str],
    peers: list[Peer | Unavailable],
    iterations: int,
    repeats: int,
    started: datetime,
    quick: bool,
    info: dict[str, object],
) -> dict[str, object]:
    kinds: list[dict[str, object]] = []
    for row in rows:
        results: dict[str, object] = {}
        for name in columns:
            cell = row.cells[name]
            results[name] = {
                "status": cell.status,
                "reason": cell.reason or None,
                "notes": cell.notes,
                "crc_checked": cell.crc_checked,
                "best_per_second": cell.best_rate(iterations),
                "median_per_second": cell.median_rate(iterations),
                "samples_ns": cell.samples_ns,
            }
        fastest = _fastest_peer(row, columns[1:], iterations)
        mine = row.cells[MAILEDGE].best_rate(iterations)
        kinds.append(
            {
                "key": row.kind.key,
                "label": row.kind.label,
                "reads_source": row.kind.read_source,
                "reads_tlvs": row.kind.read_tlvs,
                "header_hex": row.kind.data.hex(),
                "header_length": len(row.kind.data),
                "results": results,
                "fastest_peer": None if fastest is None else fastest[0],
                "ratio_vs_fastest_peer": (
                    None if fastest is None or mine is None else mine / fastest[1]
                ),
                "paired_median_ratio_vs_fastest_peer": (
                    None if fastest is None else _paired_ratio(row, fastest[0])
                ),
                "paired_median_ratio_vs_each_peer": {
                    name: _paired_ratio(row, name)
                    for name in columns[1:]
                    if row.cells[name].samples_ns
                },
            }
        )
    return {
        "benchmark": "parse",
        "date": started.isoformat(timespec="seconds"),
        "quick": quick,
        "machine": info,
        "settings": {
            "iterations": iterations,
            "repeats": repeats,
            "statistic": "best of repeats (fastest run), median also given",
            "timer": "time.perf_counter_ns",
            "gc": "collected before, disabled during each timed run",
        },
        "mailedge": {
            "version": metadata.version("mailedge"),
            "call": "parse_header(data)",
            "source_call": "header.source, then its .ip (an ipaddress object) and .port",
        },
        "peers": [_peer_json(peer) for peer in peers],
        "kinds": kinds,
    }


# --- main ------------------------------------------------------------------------------------


def run(iterations: int, repeats: int, quick: bool, json_path: Path | None) -> int:
    started = datetime.now(UTC)
    clock = time.monotonic()
    info = machine_info()  # before the run, so that the load average is the one it started in
    peers = load_peers()
    available = [peer for peer in peers if isinstance(peer, Peer)]
    columns = [MAILEDGE] + [peer.name for peer in peers]
    rows: list[Row] = []

    for kind in build_kinds():
        cells: dict[str, Cell] = {
            MAILEDGE: _verify(
                kind, parse_header, _mailedge_source, _mailedge_read_tlvs, _mailedge_read_source
            )
        }
        mine = cells[MAILEDGE]
        if mine.status != "ok" or mine.crc_checked is False:
            print(f"mailedge fails its own {kind.label} header: {mine.reason}", file=sys.stderr)
            return 1
        for peer in peers:
            if isinstance(peer, Unavailable):
                cells[peer.name] = Cell(status="n/a", reason=peer.reason)
            else:
                adapter = peer.adapter
                cells[peer.name] = _verify(
                    kind,
                    adapter.parse,
                    peer.source,
                    adapter.parse_and_read_tlvs,
                    adapter.read_source,
                )
                if kind.has_tlvs and not kind.read_tlvs and adapter.tlv_note:
                    # Before the source note, as the table has always listed them.
                    cells[peer.name].notes.insert(0, adapter.tlv_note)
        timed = [name for name in columns if cells[name].call is not None]
        for repeat in range(repeats):
            # Rotate the order so that no parser always runs first (or last) in a round.
            shift = repeat % len(timed)
            for name in timed[shift:] + timed[:shift]:
                call = cells[name].call
                assert call is not None
                cells[name].samples_ns.append(_time(call, kind.data, iterations))
        rows.append(Row(kind, cells))
        print(f"measured {kind.label}", file=sys.stderr)

    elapsed = time.monotonic() - clock
    print()
    print(
        f"PROXY header parsing, {started:%Y-%m-%d %H:%M} UTC, {info['cpu_model']}, "
        f"{info['nproc']} CPUs, load {info['loadavg']}, Python {info['python']}; "
        f"best of {repeats} runs of "
        f"{iterations:,} parses{' (QUICK: not a measurement)' if quick else ''}"
    )
    print()
    print(render_table(rows, columns, iterations))
    print()
    versions = ", ".join(f"{peer.name} {peer.version}" for peer in available)
    print(f"mailedge {metadata.version('mailedge')}; peers: {versions or 'none installed'}")
    print(f"{elapsed:.0f} s")

    if json_path is not None:
        document = results_json(rows, columns, peers, iterations, repeats, started, quick, info)
        document["elapsed_seconds"] = round(elapsed, 1)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {json_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run ({QUICK_ITERATIONS} parses, {QUICK_REPEATS} repeats) that writes "
        "no JSON unless --json is given",
    )
    parser.add_argument("--iterations", type=int, help="parses per timed run")
    parser.add_argument("--repeats", type=int, help="timed runs per parser and kind")
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="where to write the results (default: benchmarks/results/parse-<UTC time>.json)",
    )
    parser.add_argument("--no-json", action="store_true", help="write no JSON file")
    args = parser.parse_args(argv)
    iterations: int = args.iterations or (QUICK_ITERATIONS if args.quick else FULL_ITERATIONS)
    repeats: int = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    if iterations < 1 or repeats < 1:
        parser.error("--iterations and --repeats must be at least 1")
    json_path: Path | None = args.json
    if json_path is None and not args.quick:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        json_path = RESULTS_DIR / f"parse-{stamp}.json"
    if args.no_json:
        json_path = None
    return run(iterations, repeats, args.quick, json_path)


if __name__ == "__main__":
    raise SystemExit(main())
