"""Adapters that drive each Python peer's own PROXY protocol parser on a bytes object.

Each adapter calls the peer's real parsing code, as cheaply as the peer allows, on the
complete header as one ``bytes`` value, and does the same version detection that the
peer's own entry point does. Nothing is cached between calls. docs/performance.md says
exactly what is called for each peer.

The peers live only in ``.venv-bench`` (``make bench``). Imported anywhere else, a peer
that is missing is reported as unavailable, with the reason, rather than failing.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

__all__ = [
    "Adapter",
    "Endpoint",
    "Peer",
    "RawEndpoint",
    "TLVReading",
    "Unavailable",
    "load_peers",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (ip, port) of the header's source, as the verification step compares it.
Endpoint = tuple[IPAddress, int]
# The source as the peer's own result holds it: its address (an ipaddress object or a str,
# whatever the peer returns) and port. Reading it converts nothing.
RawEndpoint = tuple[object, object]
# What "parse plus reading the TLVs" yields: ALPN, AUTHORITY, SSL version, SSL CN, UNIQUE_ID.
TLVReading = tuple[bytes | None, str | None, str | None, str | None, bytes | None]


def _valid(result: object) -> None:
    """Adapter.check for peers whose parse raises on a header it rejects."""


@dataclass(frozen=True)
class Adapter:
    """What a loader builds for its peer: the calls that are timed, and what they do in words.

    Only what differs from peer to peer is here. What follows from it (the version, the
    endpoint used to verify a peer, the notes on a row) is worked out once, in one place.
    """

    # What each timed parse does, in words, for the results and the docs.
    call: str
    # bytes -> the peer's own result object; raises (or returns an invalid result) on failure.
    parse: Callable[[bytes], object]
    # The peer's result -> its source address and port as the result holds them, read the
    # way the peer's users read them: timed, in the "parse and read the source" kinds.
    read_source: Callable[[object], RawEndpoint]
    source_call: str
    # bytes -> parse, then read ALPN, AUTHORITY, SSL version and CN, UNIQUE_ID; None if the
    # peer exposes no TLVs (then its parse skips them, which the default note says).
    parse_and_read_tlvs: Callable[[bytes], TLVReading] | None = None
    tlv_call: str = "n/a: exposes no TLVs"
    # What the peer's parse leaves undone on a header with TLVs (empty if nothing): the
    # note the table puts on the plain-parse TLV row.
    tlv_note: str = "TLVs skipped, never parsed"
    # Raises if a result is not a valid header. For the check before timing only: most
    # peers raise from parse instead.
    check: Callable[[object], None] = _valid


@dataclass(frozen=True)
class Peer:
    """One peer library, ready to be timed."""

    # The distribution's name, as pip knows it; also the peer's column in the table.
    name: str
    version: str
    adapter: Adapter

    def source(self, result: object) -> Endpoint:
        """The source endpoint of the peer's result, for verification only.

        It converts the address to an ipaddress object and the port to an int, and raises
        if the result is not a valid header.
        """
        self.adapter.check(result)
        ip, port = self.adapter.read_source(result)
        number: Any = port  # an int, or text for some peers: whatever int() takes
        return _ip(ip), int(number)


@dataclass(frozen=True)
class Unavailable:
    """A peer that could not be loaded here, and why."""

    name: str
    reason: str


def _ip(value: object) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii")
    return ipaddress.ip_address(str(value))


# --- proxy-protocol (module proxyprotocol) -------------------------------------------------


def _load_proxy_protocol() -> Adapter:
    from proxyprotocol.detect import ProxyProtocolDetect

    # Stateless; proxy-protocol's own server code builds one and reuses it for every
    # connection, so the benchmark does the same.
    detect: Any = ProxyProtocolDetect()
    unpack: Callable[[bytes], object] = detect.unpack

    def read_source(result: object) -> RawEndpoint:
        ip, port = getattr(result, "source")  # noqa: B009 - the peer's result is untyped
        return ip, port

    def parse_and_read_tlvs(data: bytes) -> TLVReading:
        result: Any = unpack(data)
        tlv = result.tlv
        # .ssl builds a new SSL TLV object on every access, so read it once.
        ssl = tlv.ssl
        return tlv.alpn, tlv.authority, ssl.version, ssl.cn, tlv.unique_id

    return Adapter(
        "ProxyProtocolDetect().unpack(data), one detector reused (v1 and v2)",
        unpack,
        read_source,
        "result.source, a tuple (IPv4Address or IPv6Address, port)",
        parse_and_read_tlvs,
        "unpack(data), then result.tlv.alpn, .authority, .ssl (once) .version and .cn, .unique_id",
        tlv_note="SSL TLV decoded only when .ssl is read",
    )


# --- Twisted (twisted.protocols.haproxy) ---------------------------------------------------


def _load_twisted() -> Adapter:
    from twisted.protocols.haproxy._v1parser import V1Parser
    from twisted.protocols.haproxy._v2parser import V2Parser

    v2_prefix: bytes = V2Parser.PREFIX
    v1_prefix: bytes = V1Parser.PROXYSTR
    v1_parse: Callable[[bytes], object] = V1Parser.parse
    v2_parse: Callable[[bytes], object] = V2Parser.parse

    def parse(data: bytes) -> object:
        # The same detection HAProxyProtocolWrapper.dataReceived does, then the same
        # framing its parsers' feed() does (split at CRLF for v1; the v2 header is
        # already exactly 16 + length bytes), then the parse classmethod feed() calls.
        if len(data) >= 16 and data[:12] == v2_prefix and data[12] & 0xF0 == 0x20:
            return v2_parse(data)
        if len(data) >= 8 and data[:5] == v1_prefix:
            return v1_parse(data.split(b"\r\n", 1)[0])
        raise ValueError("Twisted's wrapper would drop this connection")

    def read_source(result: object) -> RawEndpoint:
        address: Any = getattr(result, "source")  # noqa: B009
        return address.host, address.port

    return Adapter(
        "HAProxyProtocolWrapper's version check, then V2Parser.parse(data), or "
        "V1Parser.parse(line) on the line before CRLF (as V1Parser.feed splits it)",
        parse,
        read_source,
        "result.source.host (a str) and .port",
    )


# --- aiosmtpd (aiosmtpd.proxy_protocol) ----------------------------------------------------


class _BytesReader:
    """aiosmtpd's AsyncReader protocol over bytes already in memory; it never suspends."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    async def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = len(self._data) if n < 0 else min(len(self._data), start + n)
        self._pos = end
        return self._data[start:end]

    async def readexactly(self, n: int) -> bytes:
        start = self._pos
        chunk = self._data[start : start + n]
        if len(chunk) < n:
            raise asyncio.IncompleteReadError(chunk, n)
        self._pos = start + n
        return chunk

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        start = self._pos
        index = self._data.find(separator, start)
        if index < 0:
            raise asyncio.IncompleteReadError(self._data[start:], None)
        self._pos = index + len(separator)
        return self._data[start : self._pos]


def _load_aiosmtpd() -> Adapter:
    from aiosmtpd.proxy_protocol import get_proxy

    def parse(data: bytes) -> object:
        # get_proxy is a coroutine, but over an in-memory reader it finishes on its first
        # step, so it is driven by hand instead of through an event loop.
        coroutine = get_proxy(_BytesReader(data))
        try:
            coroutine.send(None)
        except StopIteration as done:
            result: object = done.value
            return result
        coroutine.close()
        raise RuntimeError("aiosmtpd's get_proxy suspended on an in-memory reader")

    def check(result: object) -> None:
        # get_proxy returns a ProxyData whatever the header; .valid says if it parsed.
        proxy_data: Any = result
        if not proxy_data.valid:
            raise ValueError(f"aiosmtpd rejected the header: {proxy_data.error!r}")

    def read_source(result: object) -> RawEndpoint:
        proxy_data: Any = result
        return proxy_data.src_addr, proxy_data.src_port

    def parse_and_read_tlvs(data: bytes) -> TLVReading:
        proxy_data: Any = parse(data)
        tlv = proxy_data.tlv
        # aiosmtpd keeps the raw bytes; decode the text ones to match what the others return.
        return (
            bytes(tlv.ALPN),
            bytes(tlv.AUTHORITY).decode("utf-8"),
            bytes(tlv.SSL_VERSION).decode("ascii"),
            bytes(tlv.SSL_CN).decode("utf-8"),
            bytes(tlv.UNIQUE_ID),
        )

    return Adapter(
        "get_proxy(reader) over an in-memory AsyncReader, driven with coroutine.send(None) "
        "(no event loop)",
        parse,
        read_source,
        "proxy_data.src_addr (an IPv4Address or IPv6Address) and .src_port",
        parse_and_read_tlvs,
        "get_proxy as above, then proxy_data.tlv (ProxyTLV.from_raw) and its ALPN, "
        "AUTHORITY, SSL_VERSION, SSL_CN, UNIQUE_ID, text ones decoded",
        tlv_note="TLVs kept raw until .tlv is read",
        check=check,
    )


# --- gunicorn (gunicorn.http.message) ------------------------------------------------------


def _load_gunicorn() -> Adapter:
    from gunicorn.http.message import PP_V2_SIGNATURE, Request

    def parse(data: bytes) -> object:
        # A bare Request (no __init__, which would go on to parse an HTTP request) whose
        # buffer already holds the whole header, which is what Request.parse has after its
        # first read: the unreader is then never touched. The dispatch is
        # _handle_proxy_protocol's in "auto" mode, without its trusted-proxy check
        # (mailedge's gate is separate and not measured here either).
        request: Any = object.__new__(Request)
        if data[:12] == PP_V2_SIGNATURE:
            request._parse_proxy_protocol_v2(None, data)
        elif data[:6] == b"PROXY ":
            request._parse_proxy_protocol_v1(None, data)
        else:
            raise ValueError("not a PROXY header for gunicorn")
        info: object = request.proxy_protocol_info
        return info

    def read_source(result: object) -> RawEndpoint:
        info: Any = result
        return info["client_addr"], info["client_port"]

    return Adapter(
        "Request._parse_proxy_protocol_v1/_v2(None, data) on object.__new__(Request), "
        "after _handle_proxy_protocol's signature dispatch",
        parse,
        read_source,
        'info["client_addr"] (a str) and info["client_port"]',
    )


# In table order: each peer's distribution name, and the function that imports it and builds
# its adapter (raising ImportError when it is not installed).
_LOADERS: tuple[tuple[str, Callable[[], Adapter]], ...] = (
    ("proxy-protocol", _load_proxy_protocol),
    ("twisted", _load_twisted),
    ("aiosmtpd", _load_aiosmtpd),
    ("gunicorn", _load_gunicorn),
)


def load_peers() -> list[Peer | Unavailable]:
    """Every peer, in table order: loaded, or the reason it could not be."""
    loaded: list[Peer | Unavailable] = []
    for name, loader in _LOADERS:
        try:
            adapter = loader()
        except ImportError as error:
            loaded.append(Unavailable(name, f"not installed ({error}); run `make bench`"))
        else:
            loaded.append(Peer(name, metadata.version(name), adapter))
    return loaded
