"""The decoding helpers' shared tables: one list each, that agrees with the values."""

from __future__ import annotations

import attrs

from mailedge.proxy import SSLInfo, SSLSubType, TLVType
from mailedge.proxy._decode import (
    SSL_TEXT_FIELDS,
    TYPE_ALPN,
    TYPE_AUTHORITY,
    TYPE_CRC32C,
    TYPE_NETNS,
    TYPE_SSL,
    TYPE_UNIQUE_ID,
    decode_ssl,
)


def test_the_ssl_text_fields_are_sslinfo_s_text_fields_in_order() -> None:
    text_fields = [field.name for field in attrs.fields(SSLInfo)][2:9]
    assert [name for _, name in SSL_TEXT_FIELDS] == text_fields
    # ... and their sub-types run from VERSION up, as the spec numbers them.
    assert [sub_type for sub_type, _ in SSL_TEXT_FIELDS] == list(SSLSubType)[:7]
    assert SSLSubType.CLIENT_CERT not in {sub_type for sub_type, _ in SSL_TEXT_FIELDS}


def test_every_ssl_text_field_decodes_into_its_own_field() -> None:
    for sub_type, name in SSL_TEXT_FIELDS:
        value = b"\x00" + bytes(4) + bytes([sub_type, 0, 3]) + b"abc"
        ssl = decode_ssl(value)
        assert getattr(ssl, name) == "abc", name
        others = [other for _, other in SSL_TEXT_FIELDS if other != name]
        assert [getattr(ssl, other) for other in others] == [None] * 6


def test_the_plain_type_ints_are_the_enum_values() -> None:
    assert (TYPE_ALPN, TYPE_AUTHORITY, TYPE_CRC32C, TYPE_UNIQUE_ID, TYPE_SSL, TYPE_NETNS) == (
        TLVType.ALPN,
        TLVType.AUTHORITY,
        TLVType.CRC32C,
        TLVType.UNIQUE_ID,
        TLVType.SSL,
        TLVType.NETNS,
    )
    for value in (TYPE_ALPN, TYPE_AUTHORITY, TYPE_CRC32C, TYPE_UNIQUE_ID, TYPE_SSL, TYPE_NETNS):
        assert type(value) is int
