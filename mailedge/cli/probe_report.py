"""What a ``mailedge probe`` result means, and how the command shows it.

:func:`explain` says in sentences what a :class:`~mailedge.cli.probe.ProbeResult` means:
the verdict first (MATCH, MISMATCH, or why the exchange stopped), then what most likely
caused it, named by the listener settings behind it. :func:`format_result` is the text
``mailedge probe`` prints, :func:`result_to_json` the JSON of ``--json``.
"""

from __future__ import annotations

import ipaddress
import json as json_module

from mailedge.cli.probe import Outcome, ProbeResult, same_ip
from mailedge.cli.probe_options import HeaderMode
from mailedge.cli.render import JSONObject, address_to_json, describe_header, header_to_json
from mailedge.events import escape_bytes
from mailedge.proxy import ProxyProtocolError, parse_header
from mailedge.settings import ListenerProtocol

__all__ = ["explain", "format_result", "result_to_json"]

# Bytes of header hex per output line.
_HEX_LINE = 32


def _host_of(endpoint: str | None) -> str:
    if endpoint is None:
        return "the probe's address"
    host = endpoint.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


def _log_hint(result: ProbeResult) -> str:
    peer = f" with peer={result.local}" if result.local else ""
    return f"The server's log names the reason (on mailedge: the gate's proxy.* event{peer})."


def _claim_in_replies(result: ProbeResult) -> str | None:
    """The claimed client's address, when a reply names it: proof the header was used."""
    claimed = result.options.claimed_client
    if claimed is None:
        return None
    for direction, line in result.transcript:
        if direction != "received":
            continue
        for word in line.replace("[", " ").replace("]", " ").replace("(", " ").split():
            if same_ip(word.strip(",;)"), claimed.ip):
                return str(claimed.ip)
    return None


def _explain_closed(result: ProbeResult) -> list[str]:
    options = result.options
    me = _host_of(result.local)
    used = _claim_in_replies(result)
    if used is not None:
        return [
            f"The server's reply names {used}, the client the header claimed: the header was "
            "used, and trust is not the problem. The server then closed the connection: its "
            "protocol handler ended the session (a handler that returns closes it) instead "
            "of answering the probe.",
        ]
    if options.mode is HeaderMode.NONE:
        return [
            f"No header was sent. A listener that trusts this address ({me}) as a proxy "
            'requires a PROXY header (proxyHeaderMode = "required") and closes a direct '
            'connection; probe it with --v2, or set proxyHeaderMode = "optional" on it.',
            _log_hint(result),
        ]
    if result.replies and options.protocol.server_first:
        lines = [
            "The server greeted the probe before reading the header, as a listener does for "
            "a peer it does not trust as a proxy, and closed the connection once it read the "
            f"header. Likely: this address ({me}) is not in the listener's trusted networks, "
            "or PROXY is off on that listener (overrideProxyTrustedNetworks = []).",
        ]
    else:
        lines = [
            "The server closed the connection without replying. Likely the gate rejected the "
            f"header: this address ({me}) is not a trusted proxy on that listener, PROXY is "
            "off on that listener (overrideProxyTrustedNetworks = []), or the header is "
            "malformed or longer than the listener accepts (proxyMaxHeaderLength).",
        ]
    return [*lines, _log_hint(result)]


def _explain_timeout(result: ProbeResult) -> list[str]:
    options = result.options
    if result.local is None:  # the connection itself timed out
        return ["Is the address right, and does a firewall drop the connection?"]
    if result.replies or not options.protocol.server_first:
        return ["The server is slow or stuck; its log may say why."]
    if options.mode is HeaderMode.NONE:
        return [
            f"The listener seems to trust this address ({_host_of(result.local)}) as a "
            "proxy: it waits for a PROXY header before greeting. Probe it with --v2, or set "
            'proxyHeaderMode = "optional" on it to serve trusted peers that connect directly.',
        ]
    return [
        f"After the header, an {options.protocol.upper()} server greets at once. This one is "
        "waiting: for more of the header (does it expect another version?), or because it "
        "is not an SMTP or IMAP listener (an HTTP server waits for the client to speak).",
        _log_hint(result),
    ]


def _why_unseen(result: ProbeResult) -> str:
    protocol = result.options.protocol
    if protocol is ListenerProtocol.IMAP:
        return "IMAP has no command that shows it"
    if protocol is ListenerProtocol.SMTP:
        return "its EHLO reply has no [address]"
    return "the /whoami JSON has no client_ip"


def explain(result: ProbeResult) -> list[str]:
    """What the result means, in sentences: the verdict first, then the likely causes."""
    options = result.options
    lines = [result.detail] if result.detail else []
    if result.outcome is Outcome.CONNECT_FAILED:
        return [*lines, f"Is the server running, with a listener on {options.target}?"]
    if result.outcome is Outcome.CLOSED:
        return [*lines, *_explain_closed(result)]
    if result.outcome is Outcome.TIMEOUT:
        return [*lines, *_explain_timeout(result)]
    if result.outcome in (Outcome.BAD_REPLY, Outcome.REFUSED):
        if result.outcome is Outcome.BAD_REPLY:
            lines.append(f"Is {options.target} an {options.protocol.upper()} listener?")
        if options.mode is not HeaderMode.NONE and result.local is not None:
            lines.append(
                "A server that does not expect a PROXY header reads it as "
                f"{options.protocol.upper()} and answers it with an error, which then arrives "
                "where the probe expected its reply; compare with --no-header."
            )
        return lines
    claimed = options.claimed_client
    seen = result.client_seen
    me = _host_of(result.local)
    if claimed is not None and seen is None and _claim_in_replies(result) is not None:
        return [
            f"The server's reply names {claimed.ip}, the client the header claimed: the "
            "header was used."
        ]
    if claimed is not None and seen is None:
        return [
            f"The server does not report the client's address ({_why_unseen(result)}), so "
            f"the header's claim ({claimed.ip}) cannot be checked here. The server's log "
            f"names the client of the connection from peer={result.local} (mailedge: the "
            "gate's proxy.accepted event, logged at DEBUG)."
        ]
    if claimed is not None and result.matched:
        return [f"MATCH: the server sees the client the header claimed, {claimed.ip}."]
    if claimed is not None:
        lines = [f"MISMATCH: the header claimed {claimed.ip}, but the server sees {seen}."]
        own = result.local is not None and seen is not None
        if own and same_ip(str(seen), ipaddress.ip_address(me)):
            lines.append("That is the probe's own address: the header was not used.")
        return [
            *lines,
            f"Likely causes: the listener does not trust this address ({me}) as a proxy, so "
            "it did not use the header; PROXY is off on that listener "
            "(overrideProxyTrustedNetworks = []); or the server reads the header but reports "
            "the connection's own address. " + _log_hint(result),
        ]
    if options.mode is HeaderMode.LOCAL:
        source = (result.whoami or {}).get("address_source")
        sees = f"; it sees {seen}" if seen is not None else ""
        shown = f" (address_source {source})" if source is not None else ""
        return [
            "A LOCAL header names no client: the server uses the connection's own "
            f"addresses{sees}{shown}."
        ]
    if seen is None:
        return ["No header was sent, so there is no claim to check."]
    return [
        f"No header was sent, so there is no claim to check: the server sees {seen}, and "
        f"the probe's own address is {me}."
    ]


def _header_to_json(result: ProbeResult) -> JSONObject:
    data = result.header
    decoded: JSONObject | None = None
    try:
        parsed = parse_header(data) if data else None
    except ProxyProtocolError:
        parsed = None
    if parsed is not None:
        decoded = header_to_json(parsed[0])
    return {
        "mode": str(result.options.mode),
        "length": len(data),
        "hex": data.hex(),
        "text": escape_bytes(data, limit=None) if result.options.mode is HeaderMode.V1 else None,
        "decoded": decoded,
    }


def result_to_json(result: ProbeResult) -> JSONObject:
    """The result as plain JSON values, for ``--json``."""
    options = result.options
    return {
        "protocol": str(options.protocol),
        "target": str(options.target),
        "local": result.local,
        "header": _header_to_json(result),
        "claimed_client": address_to_json(options.claimed_client),
        "outcome": str(result.outcome),
        "closed_early": result.closed_early,
        "detail": result.detail,
        "transcript": [{"direction": d, "line": line} for d, line in result.transcript],
        "http_status": result.http_status,
        "whoami": result.whoami,
        "client_seen": result.client_seen,
        "matched": result.matched,
        "explanation": explain(result),
        "exit_code": result.exit_code,
    }


def format_result(result: ProbeResult, json: bool = False) -> str:
    """The result as the text ``mailedge probe`` prints, or as indented JSON."""
    if json:
        return json_module.dumps(result_to_json(result), indent=2)
    options = result.options
    out = [f"probe {options.protocol} {options.target}"]
    if result.local is not None:
        out[0] += f" from {result.local}"
    if result.header:
        out.append(f"header sent ({len(result.header)} bytes): {describe_header(result.header)}")
        hex_text = result.header.hex()
        step = 2 * _HEX_LINE
        out.extend(f"  {hex_text[i : i + step]}" for i in range(0, len(hex_text), step))
    elif options.mode is HeaderMode.NONE:
        out.append("header sent: none (--no-header)")
    for direction, line in result.transcript:
        out.append(f"{'>' if direction == 'sent' else '<'} {line}")
    if result.whoami is not None:
        out.append("whoami:")
        out.append(json_module.dumps(result.whoami, indent=2))
    if result.client_seen is not None:
        out.append(f"server sees client: {result.client_seen}")
    out.extend(explain(result))
    return "\n".join(out)
