"""Fuzz ``parse_header`` and ``sniff``: with atheris (libFuzzer), or a plain bounded loop.

With atheris installed (``pip install atheris``; wheels for CPython 3.11 on x86-64 Linux)::

    python fuzz/fuzz_parse.py -max_total_time=60 .fuzz-corpus fuzz/corpus

libFuzzer writes new inputs into the first directory and only reads the others, so keep the
checked-in seeds (fuzz/corpus) second. Without atheris, or with ``--plain``, the same
properties run over random inputs and mutations of the seeds, bounded in time and count::

    python fuzz/fuzz_parse.py --plain --seconds 60 --iterations 2000000 --seed 1

``--write-corpus`` rebuilds fuzz/corpus from the encoders: valid headers of every kind and a
few malformed ones, each file named by the SHA-1 of its content, as libFuzzer names them.

The properties, checked for every input and a random choice of parser options:

- ``sniff`` never raises, and agrees with ``parse_header``: NOT_PROXY exactly when
  ``parse_header`` raises ``NotProxyHeaderError``;
- ``parse_header`` returns None, or ``(header, consumed)`` with ``0 < consumed <= len(data)``,
  or raises a ``ProxyProtocolError`` subclass carrying a reason and a message; nothing else
  escapes;
- a parsed header is exactly ``data[:consumed]``: the bytes after it change nothing, the
  same bytes as bytearray or memoryview parse alike, and every strict prefix returns None
  (never raises), checked for a few prefixes;
- every attribute of a parsed header reads without raising (they are decoded lazily).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import random
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

CORPUS = Path(__file__).resolve().parent / "corpus"
# libFuzzer names its corpus files by the SHA-1 of their content.
_HEX40 = frozenset("0123456789abcdef")

try:
    import atheris  # type: ignore[import-not-found, import-untyped, unused-ignore]
except ImportError:  # pragma: no cover - the plain loop stands in
    atheris = None

if atheris is not None and "--plain" not in sys.argv and "--write-corpus" not in sys.argv:
    with atheris.instrument_imports(include=["mailedge"]):
        import mailedge.proxy as proxy
else:
    import mailedge.proxy as proxy


# --- parser options ------------------------------------------------------------------------

MAX_LENGTHS = (16, 16 + 216, proxy.DEFAULT_MAX_V2_LENGTH, 16 + 0xFFFF)


def options(bits: int) -> dict[str, Any]:
    """Parser options from 6 bits: the v2 cap (2 bits) and the four flags."""
    return {
        "max_v2_length": MAX_LENGTHS[bits & 0b11],
        "allow_unix": bool(bits & 0b100),
        "allow_dgram": bool(bits & 0b1000),
        "allow_v1_mixed_family": bool(bits & 0b10000),
        "normalize_v4_mapped": not bits & 0b100000,
    }


# --- the properties ------------------------------------------------------------------------


def read_everything(header: proxy.ProxyHeader) -> None:
    """Every attribute of a parsed header; a lazy decoder that raises is a bug."""
    for name in (
        "version",
        "command",
        "family",
        "transport",
        "source",
        "destination",
        "tlvs",
        "ssl",
        "crc32c_verified",
        "alpn",
        "authority",
        "unique_id",
        "netns",
    ):
        getattr(header, name)
    repr(header)
    hash(header)


def prefixes(consumed: int, pick: Callable[[int], int]) -> Iterable[int]:
    """A few strict prefix lengths: the edges and two picked at random."""
    chosen = {0, 1, consumed - 1, consumed // 2, pick(consumed), pick(consumed)}
    return sorted(k for k in chosen if 0 <= k < consumed)


Parsed = tuple[proxy.ProxyHeader, int] | None


def parse(data: bytes | bytearray | memoryview, opts: dict[str, Any]) -> Parsed | Exception:
    """The parse result, or the codec's error; anything else escapes (and is a finding)."""
    try:
        return proxy.parse_header(data, **opts)
    except proxy.ProxyProtocolError as exc:
        return exc


def check(data: bytes, opts: dict[str, Any], pick: Callable[[int], int]) -> None:
    """Raise AssertionError (or whatever escapes the codec) when a property breaks."""
    kind = proxy.sniff(data)
    assert isinstance(kind, proxy.Sniff), kind
    result = parse(data, opts)
    if isinstance(result, Exception):
        assert isinstance(result, proxy.ProxyProtocolError)
        assert isinstance(result.reason, str), repr(result)
        assert result.reason, repr(result)
        assert isinstance(result.message, str), repr(result)
        assert result.message, repr(result)
        not_proxy = isinstance(result, proxy.NotProxyHeaderError)
        assert not_proxy == (kind is proxy.Sniff.NOT_PROXY), (kind, result)
        # The input's type changes nothing, not even the error.
        for other in (bytearray(data), memoryview(data)):
            again = parse(other, opts)
            assert type(again) is type(result), (type(other).__name__, result, again)
        return
    assert kind is not proxy.Sniff.NOT_PROXY, f"sniff says NOT_PROXY but parse gave {result!r}"
    for other in (bytearray(data), memoryview(data)):
        assert proxy.parse_header(other, **opts) == result, type(other).__name__
    if result is None:
        return
    header, consumed = result
    assert isinstance(header, proxy.ProxyHeader)
    assert 0 < consumed <= len(data), (consumed, len(data))
    assert header.raw == data[:consumed]
    assert (header.version == 1) == (data[:1] == b"P"), header.version
    read_everything(header)
    # Exactly the header: what follows it changes nothing.
    assert proxy.parse_header(data[:consumed], **opts) == result
    assert proxy.parse_header(data[:consumed] + b"\r\n\x00PROXY \r\n", **opts) == result
    # Every strict prefix is a valid incomplete header: None, never an error.
    for k in prefixes(consumed, pick):
        assert proxy.parse_header(data[:k], **opts) is None, k


# --- seeds and mutations -------------------------------------------------------------------


def build_seeds() -> dict[str, bytes]:
    """Valid headers of every kind, built with the encoders, and a few malformed ones."""
    ip = ipaddress.ip_address
    inet = proxy.InetAddress
    c4, s4 = inet(ip("198.51.100.7"), 40123), inet(ip("192.0.2.25"), 25)
    c6, s6 = inet(ip("2001:db8::7"), 40123), inet(ip("2001:db8::25"), 587)
    mapped = inet(ip("::ffff:198.51.100.7"), 1)
    unix_a, unix_b = proxy.UnixAddress(b"/run/client.sock"), proxy.UnixAddress(b"/run/mx.sock")
    tlv = proxy.TLV
    kind = proxy.TLVType
    ssl_full = proxy.SSLInfo(
        client=proxy.ClientFlags.SSL | proxy.ClientFlags.CERT_CONN | proxy.ClientFlags.CERT_SESS,
        verify=0,
        version="TLSv1.3",
        cn="client.example.org",
        cipher="TLS_AES_128_GCM_SHA256",
        sig_alg="SHA256",
        key_alg="RSA2048",
        group="X25519",
        sig_scheme="rsa_pss_rsae_sha256",
    )
    ssl_plain = proxy.SSLInfo(client=proxy.ClientFlags(0), verify=0)
    encode_v2 = proxy.encode_v2
    proxy_cmd, local_cmd = proxy.Command.PROXY, proxy.Command.LOCAL
    v2 = encode_v2(proxy_cmd, c4, s4)
    ehlo = b"EHLO client.example\r\n"
    client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)
    valid = {
        "v1-tcp4": proxy.encode_v1(c4, s4),
        "v1-tcp6": proxy.encode_v1(c6, s6),
        "v1-unknown": proxy.encode_v1(),
        "v1-tcp6-mapped": proxy.encode_v1(mapped, inet(ip("::ffff:192.0.2.25"), 25)),
        "v1-unknown-with-rest": b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        "v1-tcp4-then-ehlo": proxy.encode_v1(c4, s4) + ehlo,
        "v2-inet": v2,
        "v2-inet6": encode_v2(proxy_cmd, c6, s6),
        "v2-inet6-mapped": encode_v2(proxy_cmd, c4, s4, family=proxy.Family.INET6),
        "v2-unix": encode_v2(proxy_cmd, unix_a, unix_b),
        "v2-unspec": encode_v2(proxy_cmd),
        "v2-local": encode_v2(local_cmd),
        "v2-local-crc": encode_v2(local_cmd, crc32c=True),
        "v2-dgram": encode_v2(proxy_cmd, c4, s4, transport=proxy.Transport.DGRAM),
        "v2-crc": encode_v2(proxy_cmd, c6, s6, crc32c=True),
        "v2-tlvs": encode_v2(
            proxy_cmd,
            c6,
            s6,
            tlvs=[
                tlv(kind.ALPN, b"smtp"),
                tlv(kind.AUTHORITY, b"mail.example.com"),
                tlv(kind.UNIQUE_ID, bytes(range(16))),
                tlv(kind.NOOP, bytes(5)),
                tlv(kind.NETNS, b"blue"),
                tlv(0xE0, b"custom"),
            ],
            ssl=ssl_full,
            crc32c=True,
        ),
        "v2-ssl-plaintext": encode_v2(proxy_cmd, c4, s4, ssl=ssl_plain),
        "v2-ssl-client-cert": encode_v2(
            proxy_cmd,
            c4,
            s4,
            ssl=proxy.SSLInfo(
                client=proxy.ClientFlags.SSL | proxy.ClientFlags.CERT_CONN,
                verify=0,
                version="TLSv1.2",
                client_cert=b"\x30\x82\x01\x0a" + bytes(64),
            ),
        ),
        "v2-then-client-hello": v2 + client_hello,
    }
    bad_crc = bytearray(valid["v2-crc"])
    bad_crc[-1] ^= 0xFF
    malformed = {
        "bad-v1-no-crlf": b"PROXY UNKNOWN " + b"x" * 200,
        "bad-v1-port": b"PROXY TCP4 198.51.100.7 192.0.2.25 40123 99999\r\n",
        "bad-v1-octet": b"PROXY TCP4 198.51.100.007 192.0.2.25 1 2\r\n",
        "bad-v1-spaces": b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        "bad-v1-lone-lf": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        "bad-v2-version": v2[:12] + b"\x31" + v2[13:],
        "bad-v2-command": v2[:12] + b"\x22" + v2[13:],
        "bad-v2-family": v2[:13] + b"\x41" + v2[14:],
        "bad-v2-length-65535": v2[:14] + b"\xff\xff",
        "bad-v2-short-block": v2[:14] + b"\x00\x04" + v2[16:20],
        "bad-v2-tlv-overrun": v2[:14] + b"\x00\x11" + v2[16:28] + b"\x01\x00\x09ab",
        "bad-v2-crc": bytes(bad_crc),
        "bad-v2-ssl-short": encode_v2(proxy_cmd, c4, s4, tlvs=[tlv(kind.SSL, b"\x01\x00")]),
        "not-proxy-tls": client_hello,
        "not-proxy-smtp": ehlo,
    }
    return {**valid, **malformed}


def corpus_seeds() -> list[bytes]:
    seeds = list(build_seeds().values())
    if CORPUS.is_dir():
        known = set(seeds)
        for path in sorted(CORPUS.iterdir()):
            if path.is_file() and path.stat().st_size <= 70_000:
                data = path.read_bytes()
                if data not in known:
                    seeds.append(data)
                    known.add(data)
    return seeds


class Chooser(Protocol):
    """What a mutation needs to decide: atheris's FuzzedDataProvider or ``random``."""

    def int_in(self, low: int, high: int) -> int: ...

    def some_bytes(self, count: int) -> bytes: ...


class FDPChooser:
    def __init__(self, fdp: Any) -> None:
        self.fdp = fdp

    def int_in(self, low: int, high: int) -> int:
        return int(self.fdp.ConsumeIntInRange(low, high))

    def some_bytes(self, count: int) -> bytes:
        return bytes(self.fdp.ConsumeBytes(count))


class RandomChooser:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int_in(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def some_bytes(self, count: int) -> bytes:
        return self.rng.randbytes(count)


INTERESTING = (0, 1, 0x0D, 0x0A, 0x20, 0x21, 0x7F, 0x80, 0xFF)


def mutate(seed: bytes, choose: Chooser) -> bytes:
    """A few structured edits of a seed: the kind that finds off-by-ones in length fields."""
    data = bytearray(seed)
    for _ in range(choose.int_in(1, 4)):
        op = choose.int_in(0, 8)
        at = choose.int_in(0, len(data)) if data else 0
        if op == 0 and data:  # flip a bit
            data[min(at, len(data) - 1)] ^= 1 << choose.int_in(0, 7)
        elif op == 1 and data:  # an interesting byte
            data[min(at, len(data) - 1)] = INTERESTING[choose.int_in(0, len(INTERESTING) - 1)]
        elif op == 2:  # insert bytes
            data[at:at] = choose.some_bytes(choose.int_in(1, 8))
        elif op == 3 and data:  # delete a range
            del data[at : at + choose.int_in(1, 8)]
        elif op == 4:  # truncate
            del data[at:]
        elif op == 5 and len(data) >= 16:  # rewrite the v2 length
            length = choose.int_in(0, 0xFFFF)
            data[14:16] = length.to_bytes(2, "big")
        elif op == 6 and len(data) >= 19:  # rewrite a TLV-ish length somewhere past the block
            where = choose.int_in(16, len(data) - 2)
            data[where : where + 2] = choose.int_in(0, 0xFFFF).to_bytes(2, "big")
        elif op == 7:  # append noise
            data += choose.some_bytes(choose.int_in(1, 32))
        elif op == 8 and data:  # duplicate a slice
            end = min(len(data), at + choose.int_in(1, 16))
            data[at:at] = data[at:end]
    return bytes(data)


# --- atheris -------------------------------------------------------------------------------

SEEDS = corpus_seeds()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    opts = options(fdp.ConsumeIntInRange(0, 63))
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0:
        payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    else:
        seed = SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)]
        payload = mutate(seed, FDPChooser(fdp))
    check(payload, opts, lambda n: fdp.ConsumeIntInRange(0, max(n - 1, 0)))


# --- the plain loop ------------------------------------------------------------------------


def plain(seconds: float, iterations: int, seed: int) -> int:
    """Random inputs and seed mutations until the time or the count runs out."""
    rng = random.Random(seed)
    choose = RandomChooser(rng)
    deadline = time.monotonic() + seconds
    done = 0
    while done < iterations and time.monotonic() < deadline:
        opts = options(rng.randrange(64))
        mode = rng.randrange(4)
        if mode == 0:
            payload = rng.randbytes(rng.randrange(0, 300))
        elif mode == 1:
            # Signature-led noise, where the parsers are.
            lead = rng.choice([b"PROXY ", proxy.V2_SIGNATURE, b"P", b"\r\n\r\n"])
            payload = lead + rng.randbytes(rng.randrange(0, 120))
        else:
            payload = mutate(rng.choice(SEEDS), choose)
        try:
            check(payload, opts, lambda n: rng.randrange(max(n, 1)))
        except BaseException:
            print(f"failing input ({opts}): {payload!r}", file=sys.stderr)
            raise
        done += 1
    return done


def write_corpus() -> None:
    CORPUS.mkdir(exist_ok=True)
    wanted = {hashlib.sha1(data).hexdigest(): data for data in build_seeds().values()}
    for path in CORPUS.iterdir():
        if len(path.name) == 40 and set(path.name) <= _HEX40 and path.name not in wanted:
            path.unlink()
    for name, data in wanted.items():
        (CORPUS / name).write_bytes(data)
    print(f"{len(wanted)} seeds in {CORPUS}")


def main(argv: list[str]) -> None:
    if "--write-corpus" in argv:
        write_corpus()
        return
    if atheris is None or "--plain" in argv:
        parser = argparse.ArgumentParser(description="the plain, bounded fuzz loop")
        parser.add_argument("--plain", action="store_true")
        parser.add_argument("--seconds", type=float, default=60.0)
        parser.add_argument("--iterations", type=int, default=1_000_000)
        parser.add_argument("--seed", type=int, default=0)
        args, _ = parser.parse_known_args(argv[1:])
        if atheris is None:
            print("atheris is not installed: running the plain loop", file=sys.stderr)
        done = plain(args.seconds, args.iterations, args.seed)
        print(f"plain fuzzing: {done} inputs, seed {args.seed}, no property broken")
        return
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
