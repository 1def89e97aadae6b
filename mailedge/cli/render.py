"""How the command line shows a PROXY header: as plain JSON values, or as one line of text.

:func:`header_to_json` turns a parsed header into plain JSON values; it is meant to be
shared by every tool that shows a header (``mailedge decode``, ``mailedge probe --json``).
Bytes become hex or escaped text (:func:`mailedge.events.escape_bytes`), enums their names.
"""

from __future__ import annotations

from collections.abc import Callable

from mailedge.events import escape_bytes
from mailedge.networks import format_endpoint
from mailedge.proxy import (
    TLV,
    Address,
    ClientFlags,
    InetAddress,
    ProxyHeader,
    ProxyProtocolError,
    SSLInfo,
    SSLSubType,
    TLVType,
    UnixAddress,
    parse_header,
)

__all__ = [
    "JSONObject",
    "address_to_json",
    "describe_header",
    "header_to_json",
    "ssl_to_json",
    "tlv_to_json",
]

JSONObject = dict[str, object]


def _printable_text(data: bytes) -> str | None:
    """The value as text when it is non-empty, valid UTF-8 and entirely printable."""
    if not data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def _tlv_type_name(type_: int) -> str:
    try:
        return TLVType(type_).name
    except ValueError:
        pass
    if 0xE0 <= type_ <= 0xEF:
        return "CUSTOM"
    if 0xF0 <= type_ <= 0xF7:
        return "EXPERIMENTAL"
    if type_ >= 0xF8:
        return "FUTURE"
    return "UNASSIGNED"


def _ssl_subtype_name(type_: int) -> str:
    try:
        return SSLSubType(type_).name
    except ValueError:
        return "UNASSIGNED"


def tlv_to_json(tlv: TLV, *, name: Callable[[int], str] = _tlv_type_name) -> JSONObject:
    """One TLV: its type (number and name), length and value, as hex and, if printable, text."""
    value = bytes(tlv.value)
    entry: JSONObject = {
        "type": tlv.type,
        "type_name": name(tlv.type),
        "length": len(value),
        "value_hex": value.hex(),
    }
    text = _printable_text(value)
    if text is not None:
        entry["value_text"] = text
    return entry


def _client_flag_names(client: int) -> list[str]:
    names: list[str] = []
    known = 0
    for flag in ClientFlags:
        known |= flag.value
        if client & flag.value:
            names.append(str(flag.name))
    for bit in range(8):
        if client & (1 << bit) & ~known:
            names.append(f"UNKNOWN_0x{1 << bit:02x}")
    return names


def ssl_to_json(ssl: SSLInfo) -> JSONObject:
    """The decoded PP2_TYPE_SSL TLV: every field, the client flags by name, and ``verified``."""
    return {
        "client": _client_flag_names(int(ssl.client)),
        "client_ssl": ssl.client_ssl,
        "cert_presented": ssl.cert_presented,
        "verify": ssl.verify,
        "verified": ssl.verified,
        "version": ssl.version,
        "cn": ssl.cn,
        "cipher": ssl.cipher,
        "sig_alg": ssl.sig_alg,
        "key_alg": ssl.key_alg,
        "group": ssl.group,
        "sig_scheme": ssl.sig_scheme,
        "client_cert": None if ssl.client_cert is None else ssl.client_cert.hex(),
        "tlvs": [tlv_to_json(sub, name=_ssl_subtype_name) for sub in ssl.tlvs],
    }


def address_to_json(address: Address | None) -> JSONObject | None:
    """``{ip, port}`` for INET and INET6, ``{path}`` for UNIX, None for no address."""
    if address is None:
        return None
    if isinstance(address, InetAddress):
        return {"ip": str(address.ip), "port": address.port}
    if isinstance(address, UnixAddress):
        return {"path": escape_bytes(address.path.rstrip(b"\x00"), limit=None)}
    raise TypeError(f"not an address: {address!r}")


def header_to_json(header: ProxyHeader) -> JSONObject:
    """A parsed header as plain JSON values (for ``decode``, a probe, an HTTP /whoami).

    Bytes become hex (``unique_id``, TLV values) or escaped text (``alpn``); enums become
    their names. The result does not say whether the header was trusted: that is the
    caller's to add.
    """
    alpn = header.alpn
    unique_id = header.unique_id
    return {
        "version": header.version,
        "command": header.command.name,
        "family": header.family.name,
        "transport": header.transport.name,
        "source": address_to_json(header.source),
        "destination": address_to_json(header.destination),
        "tlvs": [tlv_to_json(tlv) for tlv in header.tlvs],
        "ssl": None if header.ssl is None else ssl_to_json(header.ssl),
        "alpn": None if alpn is None else escape_bytes(alpn, limit=None),
        "authority": header.authority,
        "unique_id": None if unique_id is None else unique_id.hex(),
        "netns": header.netns,
        "crc32c_verified": header.crc32c_verified,
    }


def describe_header(data: bytes) -> str:
    """One line about a header's bytes, from mailedge's own parser: what a server will read."""
    try:
        parsed = parse_header(data)
    except ProxyProtocolError as error:  # the probe writes valid ones; just in case
        return f"not a valid header: {error.message}"
    if parsed is None:
        return "an incomplete header"
    header, _ = parsed
    if header.version == 1:
        return f"v1: {escape_bytes(data, limit=None)}"
    text = f"v2 {header.command.name} {header.family.name}"
    if isinstance(header.source, InetAddress) and isinstance(header.destination, InetAddress):
        source, destination = header.source, header.destination
        text += f" {format_endpoint(source.ip, source.port)} -> "
        text += format_endpoint(destination.ip, destination.port)
    names: list[str] = []
    for tlv in header.tlvs:
        try:
            names.append(TLVType(tlv.type).name)
        except ValueError:  # the probe writes only named types; just in case
            names.append(f"0x{tlv.type:02x}")
    if names:
        text += f", TLVs: {', '.join(names)}"
    return text
