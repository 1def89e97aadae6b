"""ConnectionContext: values, the client_known promise, and STARTTLS updates."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import attrs
import pytest

from mailedge.context import AddressSource, ConnectionContext, TLSTerminator, context_to_json
from mailedge.proxy import TLV, Command, TLVType, encode_v2, parse_header
from mailedge.settings import ListenerProtocol


def context(**changes: Any) -> ConnectionContext:
    base = ConnectionContext(
        connection_id=7,
        listener="smtp",
        protocol=ListenerProtocol.SMTP,
        client_ip=ipaddress.ip_address("198.51.100.7"),
        client_port=40123,
        server_ip=ipaddress.ip_address("192.0.2.25"),
        server_port=25,
        peer_ip=ipaddress.ip_address("127.0.0.1"),
        peer_port=51000,
        local_ip=ipaddress.ip_address("127.0.0.1"),
        local_port=2525,
        proxied=True,
        address_source=AddressSource.HEADER,
        tls=True,
        tls_terminated_by=TLSTerminator.PROXY,
        tls_version="TLSv1.2",
        client_cert_cn="alice",
        client_cert_verified=True,
    )
    return attrs.evolve(base, **changes)


@pytest.mark.parametrize(
    ("source", "known"),
    [
        (AddressSource.HEADER, True),
        (AddressSource.SOCKET, True),
        (AddressSource.PROXY_LOCAL, False),
        (AddressSource.UNKNOWN, False),
    ],
)
def test_client_known_only_for_real_clients(source: AddressSource, known: bool) -> None:
    assert context(address_source=source).client_known is known


def test_with_tls_records_the_servers_own_session() -> None:
    before = context()
    after = before.with_tls(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", sni="mx.example")
    assert after.tls and after.tls_terminated_by is TLSTerminator.SERVER
    assert (after.tls_version, after.tls_cipher, after.sni) == (
        "TLSv1.3",
        "TLS_AES_128_GCM_SHA256",
        "mx.example",
    )
    # The proxy's word about a client certificate no longer describes this session.
    assert after.client_cert_cn is None and not after.client_cert_verified
    # Everything else stays, and the original is untouched (frozen).
    assert after.client_ip == before.client_ip and before.tls_version == "TLSv1.2"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        before.tls = False  # type: ignore[misc]


def test_repr_is_short_and_names_client_and_proxy() -> None:
    text = repr(context())
    assert text == (
        "<ConnectionContext #7 smtp client=198.51.100.7:40123 via=127.0.0.1:51000 header tls=proxy>"
    )
    direct = context(
        proxied=False,
        address_source=AddressSource.SOCKET,
        tls=False,
        tls_terminated_by=None,
        client_ip=ipaddress.ip_address("2001:db8::1"),
    )
    assert repr(direct) == "<ConnectionContext #7 smtp client=[2001:db8::1]:40123 socket>"


def test_unique_id_without_a_header() -> None:
    assert context().unique_id is None


def test_context_to_json_is_the_whoami_form() -> None:
    parsed = parse_header(encode_v2(Command.LOCAL, tlvs=[TLV(TLVType.UNIQUE_ID, b"\x00\xff")]))
    assert parsed is not None
    header = parsed[0]
    data = context_to_json(context(header=header, sni="mx.example", alpn="smtp"))
    assert json.loads(json.dumps(data)) == data
    assert data == {
        "connection_id": 7,
        "listener": "smtp",
        "protocol": "smtp",
        "client_ip": "198.51.100.7",
        "client_port": 40123,
        "client_known": True,
        "address_source": "header",
        "server_ip": "192.0.2.25",
        "server_port": 25,
        "peer_ip": "127.0.0.1",
        "peer_port": 51000,
        "local_ip": "127.0.0.1",
        "local_port": 2525,
        "proxied": True,
        "proxy_version": 2,
        "unique_id": "00ff",
        "tls": True,
        "tls_terminated_by": "proxy",
        "tls_version": "TLSv1.2",
        "tls_cipher": None,
        "sni": "mx.example",
        "alpn": "smtp",
        "client_cert_cn": "alice",
        "client_cert_verified": True,
    }
    direct = context_to_json(
        context(proxied=False, address_source=AddressSource.UNKNOWN, tls_terminated_by=None)
    )
    assert (direct["proxy_version"], direct["unique_id"]) == (None, None)
    assert (direct["client_known"], direct["tls_terminated_by"]) == (False, None)
