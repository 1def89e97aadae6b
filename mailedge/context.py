"""The connection context: who the client really is, as far as this server can tell.

The gate builds one for every admitted connection. SPF, DMARC, rate limiting and auto-ban
consume it, so its first promise is that ``client_ip`` is never a trusted proxy's address
pretending to be a client: when the proxy speaks for itself (LOCAL) or does not know the
client (v1 UNKNOWN, v2 UNSPEC), ``address_source`` says so and ``client_known`` is false.
"""

from __future__ import annotations

import enum

import attrs

from mailedge.networks import format_endpoint
from mailedge.proxy import IPAddress, ProxyHeader
from mailedge.settings import ListenerProtocol

__all__ = ["AddressSource", "ConnectionContext", "TLSTerminator", "context_to_json"]


class AddressSource(enum.StrEnum):
    """Where ``client_ip`` and ``client_port`` came from."""

    # A trusted proxy's PROXY header named the client.
    HEADER = "header"
    # A direct connection: the socket peer is the client.
    SOCKET = "socket"
    # A LOCAL header: the proxy's own connection (a health check). There is no client.
    PROXY_LOCAL = "proxy_local"
    # A proxied connection whose header carried no address (v1 UNKNOWN, v2 UNSPEC):
    # the client exists but is unknown; the socket endpoints stand in for it.
    UNKNOWN = "unknown"


class TLSTerminator(enum.StrEnum):
    """Which side decrypted the client's TLS."""

    PROXY = "proxy"
    SERVER = "server"


@attrs.frozen(kw_only=True, repr=False)
class ConnectionContext:
    """What one admitted connection is: its listener, its real client, and its TLS."""

    connection_id: int
    listener: str
    protocol: ListenerProtocol

    # The effective client and server: from the header when proxied, else the socket.
    # v4-mapped IPv6 is always normalised to IPv4.
    client_ip: IPAddress
    client_port: int
    server_ip: IPAddress
    server_port: int

    # The socket's own endpoints. When proxied, ``peer_ip`` is the proxy.
    peer_ip: IPAddress
    peer_port: int
    local_ip: IPAddress
    local_port: int

    proxied: bool
    address_source: AddressSource

    # True when the original client connection was protected by TLS: the proxy's SSL TLV
    # had CLIENT_SSL, the listener says its v1 proxy terminates TLS, or this server did.
    tls: bool = False
    tls_terminated_by: TLSTerminator | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    # The server name the client asked for: the AUTHORITY TLV, or this server's own SNI.
    sni: str | None = None
    alpn: str | None = None
    # The client certificate's CN, and whether the proxy said it was presented and verified.
    client_cert_cn: str | None = None
    client_cert_verified: bool = False

    # The raw header, including UNIQUE_ID and custom TLVs, for hooks that want more.
    header: ProxyHeader | None = None

    @property
    def client_known(self) -> bool:
        """True when ``client_ip`` really is the client's (from the header or a direct socket)."""
        return self.address_source in (AddressSource.HEADER, AddressSource.SOCKET)

    @property
    def client_endpoint(self) -> str:
        """``client_ip:client_port`` for logs, IPv6 in brackets."""
        return format_endpoint(self.client_ip, self.client_port)

    @property
    def unique_id(self) -> bytes | None:
        """The proxy's UNIQUE_ID for this connection, for correlating logs with the proxy's."""
        return None if self.header is None else self.header.unique_id

    def with_tls(
        self,
        *,
        version: str | None,
        cipher: str | None,
        sni: str | None = None,
        alpn: str | None = None,
    ) -> ConnectionContext:
        """The context after this server completed a TLS handshake (implicit TLS or STARTTLS).

        The server's own session replaces anything the proxy reported about TLS, including
        the client certificate, which this server has not verified.
        """
        return attrs.evolve(
            self,
            tls=True,
            tls_terminated_by=TLSTerminator.SERVER,
            tls_version=version,
            tls_cipher=cipher,
            sni=sni,
            alpn=alpn,
            client_cert_cn=None,
            client_cert_verified=False,
        )

    def __repr__(self) -> str:
        parts = [f"#{self.connection_id}", self.listener, f"client={self.client_endpoint}"]
        if self.proxied:
            parts.append(f"via={format_endpoint(self.peer_ip, self.peer_port)}")
        parts.append(str(self.address_source))
        if self.tls:
            parts.append(f"tls={self.tls_terminated_by}")
        return f"<ConnectionContext {' '.join(parts)}>"


def context_to_json(context: ConnectionContext) -> dict[str, object]:
    """The connection context as JSON-ready values: addresses as strings, enums as values.

    The form of an HTTP ``/whoami`` (the example HTTP handler serves it), which
    ``mailedge probe`` reads: ``client_ip`` is the client the server believes in.
    """
    header = context.header
    unique_id = context.unique_id
    return {
        "connection_id": context.connection_id,
        "listener": context.listener,
        "protocol": str(context.protocol),
        "client_ip": str(context.client_ip),
        "client_port": context.client_port,
        "client_known": context.client_known,
        "address_source": str(context.address_source),
        "server_ip": str(context.server_ip),
        "server_port": context.server_port,
        "peer_ip": str(context.peer_ip),
        "peer_port": context.peer_port,
        "local_ip": str(context.local_ip),
        "local_port": context.local_port,
        "proxied": context.proxied,
        "proxy_version": None if header is None else header.version,
        "unique_id": None if unique_id is None else unique_id.hex(),
        "tls": context.tls,
        "tls_terminated_by": (
            None if context.tls_terminated_by is None else str(context.tls_terminated_by)
        ),
        "tls_version": context.tls_version,
        "tls_cipher": context.tls_cipher,
        "sni": context.sni,
        "alpn": context.alpn,
        "client_cert_cn": context.client_cert_cn,
        "client_cert_verified": context.client_cert_verified,
    }
