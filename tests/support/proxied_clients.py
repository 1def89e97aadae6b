"""Python's own mail and HTTP clients, with a PROXY header sent first, as a proxy would.

They let a test play both the proxy and the client with the real stdlib clients:
``ProxiedSMTP(header)`` is ``smtplib.SMTP`` whose socket carries ``header`` before SMTP.
"""

from __future__ import annotations

import http.client
import imaplib
import smtplib
import socket
import ssl
from typing import Any

__all__ = ["ProxiedHTTPConnection", "ProxiedIMAP4", "ProxiedSMTP", "ProxiedSMTPOverTLS"]


def _connect(host: str, port: int, timeout: float | None, header: bytes) -> socket.socket:
    sock = socket.create_connection((host, port), timeout)
    try:
        sock.sendall(header)
    except BaseException:
        sock.close()
        raise
    return sock


class ProxiedSMTP(smtplib.SMTP):
    """smtplib.SMTP that sends ``header`` as soon as its TCP connection is up."""

    def __init__(self, header: bytes, *args: Any, **kwargs: Any) -> None:
        self.proxy_header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return _connect(host, port, timeout, self.proxy_header)


class ProxiedSMTPOverTLS(smtplib.SMTP_SSL):
    """smtplib.SMTP_SSL for implicit TLS: the header first, then the TLS handshake."""

    def __init__(self, header: bytes, *args: Any, **kwargs: Any) -> None:
        self.proxy_header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> ssl.SSLSocket:
        sock = _connect(host, port, timeout, self.proxy_header)
        return self.context.wrap_socket(sock, server_hostname=host)


class ProxiedIMAP4(imaplib.IMAP4):
    """imaplib.IMAP4 that sends ``header`` before the server's greeting is read."""

    def __init__(self, header: bytes, host: str, port: int, timeout: float | None = 10) -> None:
        self.proxy_header = header
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return _connect(self.host, self.port, timeout, self.proxy_header)


class ProxiedHTTPConnection(http.client.HTTPConnection):
    """http.client.HTTPConnection that sends ``header`` before the request."""

    def __init__(self, header: bytes, host: str, port: int, timeout: float = 10) -> None:
        self.proxy_header = header
        super().__init__(host, port, timeout=timeout)

    def connect(self) -> None:
        self.sock = _connect(self.host, self.port, self.timeout, self.proxy_header)
