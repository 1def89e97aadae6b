"""The header: :class:`ProxyHeader`, a validated header's bytes and what they say.

A :class:`ProxyHeader` holds the header's bytes as received, validated in full by the
parser; its addresses, TLVs and SSL details are built from those bytes the first time
they are read, and cached. Since the bytes were validated, building them never raises.
The values it holds live in :mod:`mailedge.proxy.values`; a header is built from values
by :func:`mailedge.proxy.build.build_header`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar, overload

import attrs

from mailedge.proxy._decode import (
    TLV_HEAD,
    TYPE_ALPN,
    TYPE_AUTHORITY,
    TYPE_CRC32C,
    TYPE_NETNS,
    TYPE_SSL,
    TYPE_UNIQUE_ID,
    HeaderLayout,
    decode_ssl,
    new_tlv,
    tlv_spans,
)
from mailedge.proxy.values import TLV, Address, Command, Family, SSLInfo, Transport

__all__ = ["ProxyHeader"]

_new = object.__new__
_type_length = TLV_HEAD.unpack_from


_T = TypeVar("_T")


class _lazy(Generic[_T]):  # lower case: used as a decorator, like property
    """A read-only attribute computed on first read and kept in the instance ``__dict__``.

    A non-data descriptor: once the value is in ``__dict__``, Python finds it there and
    never calls this again. ``functools.cached_property`` does the same, but on Python 3.11
    it takes a lock on every first read, which costs three times as much.
    """

    def __init__(self, compute: Callable[[Any], _T]) -> None:
        self._compute = compute
        self._name = compute.__name__
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _lazy[_T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _T: ...

    def __get__(self, instance: object, owner: type | None = None) -> _T | _lazy[_T]:
        if instance is None:
            return self
        value = instance.__dict__[self._name] = self._compute(instance)
        return value


class _Endpoint:
    """``source`` or ``destination``: a first read of either builds and keeps both.

    A non-data descriptor like :class:`_lazy`. The gate reads both on every connection, so
    one read builds both, with the builder the header's layout names: no test of version
    or family is left for this first read to make.
    """

    def __init__(self, name: str, doc: str) -> None:
        self._name = name
        self.__doc__ = doc

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _Endpoint: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> Address | None: ...

    def __get__(self, instance: object, owner: type | None = None) -> Address | _Endpoint | None:
        if instance is None:
            return self
        fields = instance.__dict__
        fields["_layout"].endpoints(fields)
        address: Address | None = fields[self._name]
        return address


@attrs.frozen(slots=False, init=False, repr=False, match_args=False)
class ProxyHeader:
    """A complete, validated PROXY protocol header (v1 or v2).

    The parser validates every byte, then stores just two things: the bytes (``raw``) and
    a shared :class:`HeaderLayout` (version, command, family, transport and the
    ``normalize_v4_mapped`` option). ``version``, ``command``, ``family`` and
    ``transport`` read the layout. ``source``, ``destination``, ``tlvs``, ``ssl``,
    ``crc32c_verified`` and the TLV accessors are built from ``raw`` on first read and
    cached; since ``raw`` was validated, they never raise.

    Two headers are equal (and hash alike) when their ``raw`` bytes and the
    ``normalize_v4_mapped`` option they were parsed with are equal: those two decide every
    other attribute. To build one from values, use
    :func:`~mailedge.proxy.build.build_header`.
    """

    # The whole header exactly as received: "PROXY " to the CRLF, or the v2 signature to
    # the end of the last TLV. Never anything after it.
    raw: bytes
    _layout: HeaderLayout = attrs.field(alias="layout")

    def __init__(
        self,
        version: int,
        command: Command,
        family: Family,
        transport: Transport,
        source: Address | None = None,
        destination: Address | None = None,
        tlvs: Iterable[TLV] = (),
        ssl: SSLInfo | None = None,
        crc32c_verified: bool = False,
    ) -> None:
        """Deprecated: ``build_header`` takes the same values and builds the same header.

        Kept for one release. Headers come from the parser, or from
        :func:`~mailedge.proxy.build.build_header`, which encodes the values and parses
        them back; this class does not build them.
        """
        # DEPRECATION SHIM, to remove in the next release together with this __init__:
        # build.py imports this module, so this is the one import of it from here, and it is
        # deferred to the call. Nothing else in the codec imports upwards.
        warnings.warn(
            "ProxyHeader(...) from values is deprecated and goes in the next release; use "
            "mailedge.proxy.build_header(...), which takes the same arguments",
            DeprecationWarning,
            stacklevel=2,
        )
        from mailedge.proxy.build import build_header

        built = build_header(
            version,
            command,
            family,
            transport,
            source,
            destination,
            tlvs,
            ssl,
            crc32c_verified,
        )
        self.__dict__.update(built.__dict__)

    @property
    def version(self) -> int:
        """1 (text) or 2 (binary)."""
        return self._layout.version

    @property
    def command(self) -> Command:
        """PROXY, or LOCAL (v2 only): the proxy's own connection, addresses ignored."""
        return self._layout.command

    @property
    def family(self) -> Family:
        """The address family on the wire: v1 TCP4/TCP6/UNKNOWN are INET/INET6/UNSPEC."""
        return self._layout.family

    @property
    def transport(self) -> Transport:
        """STREAM or DGRAM; UNSPEC with v2 family UNSPEC; always STREAM for v1."""
        return self._layout.transport

    def __repr__(self) -> str:
        return (
            f"ProxyHeader(version={self.version!r}, command={self.command!r}, "
            f"family={self.family!r}, transport={self.transport!r}, source={self.source!r}, "
            f"destination={self.destination!r}, ssl={self.ssl!r}, "
            f"crc32c_verified={self.crc32c_verified!r})"
        )

    source = _Endpoint("source", "The client's endpoint; None for LOCAL, v1 UNKNOWN and v2 UNSPEC.")
    destination = _Endpoint(
        "destination", "The endpoint the client connected to; None when source is."
    )

    @_lazy
    def tlvs(self) -> tuple[TLV, ...]:
        """Every TLV raw, in wire order (v2 only; empty for v1 and a discarded LOCAL block)."""
        first = self._layout.tlv_start
        if first is None:
            return ()
        raw = self.raw
        return tuple(
            [
                new_tlv(type_, raw[start:stop])
                for type_, start, stop in tlv_spans(raw, first, len(raw))
            ]
        )

    @_lazy
    def _first_values(self) -> dict[int, bytes]:
        """The value of the first TLV of each type."""
        values: dict[int, bytes] = {}
        pos = self._layout.tlv_start
        if pos is None:
            return values
        raw = self.raw
        end = len(raw)
        while pos < end:
            type_, length = _type_length(raw, pos)
            pos += 3
            if type_ not in values:
                values[type_] = raw[pos : pos + length]
            pos += length
        return values

    @_lazy
    def ssl(self) -> SSLInfo | None:
        """The decoded SSL TLV, when one was present (a header has at most one)."""
        value = self._first_values.get(TYPE_SSL)
        return None if value is None else decode_ssl(value)

    @_lazy
    def crc32c_verified(self) -> bool:
        """True when a CRC32C TLV was present, and so matched: a mismatch never parses."""
        return TYPE_CRC32C in self._first_values

    @property
    def alpn(self) -> bytes | None:
        """The PP2_TYPE_ALPN value: the protocol the client negotiated, e.g. ``b"h2"``."""
        return self._first_values.get(TYPE_ALPN)

    @property
    def authority(self) -> str | None:
        """The PP2_TYPE_AUTHORITY value (the SNI host name), validated as UTF-8 by the parser."""
        value = self._first_values.get(TYPE_AUTHORITY)
        return None if value is None else value.decode("utf-8")

    @property
    def unique_id(self) -> bytes | None:
        """The PP2_TYPE_UNIQUE_ID value: an opaque id of at most 128 bytes."""
        return self._first_values.get(TYPE_UNIQUE_ID)

    @property
    def netns(self) -> str | None:
        """The PP2_TYPE_NETNS value: the network namespace name, validated by the parser."""
        value = self._first_values.get(TYPE_NETNS)
        return None if value is None else value.decode("ascii")


def make_header(raw: bytes, layout: HeaderLayout) -> ProxyHeader:
    """The parser's constructor: ``raw`` must be a header it has validated in full.

    It skips ``__init__`` and fills the instance ``__dict__`` directly, which the frozen
    class allows (only attribute assignment is blocked): a fraction of an ``attrs``
    ``__init__``'s cost. The hot paths of ``parse_header`` inline these same lines.
    """
    header = _new(ProxyHeader)
    fields = header.__dict__
    fields["raw"] = raw
    fields["_layout"] = layout
    return header
