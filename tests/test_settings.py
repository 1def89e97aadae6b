"""Tests for mailedge.settings: overrides, bind addresses, knob validation, Settings."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address
from typing import Any

import attrs
import pytest

import mailedge.settings
from mailedge.defaults import (
    DEFAULT_PROXY_HEADER_TIMEOUT,
    DEFAULT_PROXY_MAX_HEADER_LENGTH,
    DEFAULT_PROXY_OPTIONAL_WAIT,
    MAX_PROXY_MAX_HEADER_LENGTH,
    MIN_PROXY_MAX_HEADER_LENGTH,
)
from mailedge.networks import TrustedNetworks
from mailedge.settings import (
    AutoBanSettings,
    BindAddress,
    HeaderMode,
    InvalidSettingError,
    ListenerProtocol,
    NetworkListener,
    RateLimit,
    Settings,
    SystemSettings,
    UnknownListenerError,
)

SYSTEM = SystemSettings(proxy_trusted_networks=TrustedNetworks(["127.0.0.0/8", "::1"]))


def listener(name: str = "smtp", **fields: Any) -> NetworkListener:
    return NetworkListener(
        name=name,
        protocol=fields.pop("protocol", ListenerProtocol.SMTP),
        bind=fields.pop("bind", (BindAddress.parse("127.0.0.1:2525"),)),
        **fields,
    )


# -- enums --------------------------------------------------------------------------------


def test_protocols() -> None:
    assert [protocol.value for protocol in ListenerProtocol] == ["smtp", "imap", "http"]
    assert ListenerProtocol("smtp") is ListenerProtocol.SMTP
    assert ListenerProtocol.SMTP.server_first
    assert ListenerProtocol.IMAP.server_first
    assert not ListenerProtocol.HTTP.server_first


def test_header_modes() -> None:
    assert [mode.value for mode in HeaderMode] == ["required", "optional"]


# -- override semantics -------------------------------------------------------------------------


def test_absent_override_inherits_the_server_wide_list() -> None:
    smtp = listener()
    assert smtp.override_proxy_trusted_networks is None
    assert smtp.effective_proxy_trusted_networks(SYSTEM) == SYSTEM.proxy_trusted_networks
    assert ip_address("127.0.0.1") in smtp.effective_proxy_trusted_networks(SYSTEM)
    assert not smtp.proxy_disabled_explicitly


def test_override_replaces_the_server_wide_list() -> None:
    smtp = listener(override_proxy_trusted_networks=TrustedNetworks(["10.0.0.0/8"]))
    effective = smtp.effective_proxy_trusted_networks(SYSTEM)
    assert effective == TrustedNetworks(["10.0.0.0/8"])
    # Replaced, not merged: the server-wide loopback is no longer trusted here.
    assert ip_address("127.0.0.1") not in effective
    assert ip_address("10.1.2.3") in effective
    assert not smtp.proxy_disabled_explicitly


def test_empty_override_turns_proxy_off() -> None:
    smtp = listener(override_proxy_trusted_networks=TrustedNetworks())
    effective = smtp.effective_proxy_trusted_networks(SYSTEM)
    assert not effective
    assert ip_address("127.0.0.1") not in effective
    assert smtp.proxy_disabled_explicitly


def test_no_server_wide_list_means_proxy_off() -> None:
    assert not listener().effective_proxy_trusted_networks(SystemSettings())
    assert not SystemSettings().proxy_trusted_networks


# -- bind addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:2525", IPv4Address("127.0.0.1"), 2525),
        ("[::1]:2525", IPv6Address("::1"), 2525),
        ("0.0.0.0:25", IPv4Address("0.0.0.0"), 25),
        ("[::]:25", IPv6Address("::"), 25),
        ("127.0.0.1:0", IPv4Address("127.0.0.1"), 0),
        ("[2001:db8::1]:65535", IPv6Address("2001:db8::1"), 65535),
    ],
)
def test_bind_parse_round_trips(text: str, host: IPv4Address | IPv6Address, port: int) -> None:
    bind = BindAddress.parse(text)
    assert bind == BindAddress(host, port)
    assert str(bind) == text
    assert repr(bind) == f"BindAddress({text!r})"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "'' has no port; write an address and port such as '127.0.0.1:25' or '[::1]:25'"),
        (
            "127.0.0.1",
            "'127.0.0.1' has no port; write an address and port "
            "such as '127.0.0.1:25' or '[::1]:25'",
        ),
        (
            "::1:25",
            "'::1:25' needs brackets around an IPv6 address, such as '127.0.0.1:25' or '[::1]:25'",
        ),
        (
            "localhost:25",
            "'localhost:25' is not an address and port: 'localhost' is not an IP address "
            "(listeners bind IP addresses, not host names)",
        ),
        (
            "10.0.0.300:25",
            "'10.0.0.300:25' is not an address and port: '10.0.0.300' is not an IP address "
            "(listeners bind IP addresses, not host names)",
        ),
        (
            "[127.0.0.1]:25",
            "'[127.0.0.1]:25' is not an address and port: '127.0.0.1' is not an IPv6 address",
        ),
        ("[::1]25", "'[::1]25' is not an address and port such as '127.0.0.1:25' or '[::1]:25'"),
        ("[::1", "'[::1' is not an address and port such as '127.0.0.1:25' or '[::1]:25'"),
        ("[fe80::1%eth0]:25", "'[fe80::1%eth0]:25' has a zone id; zone ids are not supported"),
        (
            "[::ffff:127.0.0.1]:25",
            "'[::ffff:127.0.0.1]:25' is an IPv4-mapped address; write '127.0.0.1:25' instead",
        ),
        (
            "127.0.0.1:65536",
            "'127.0.0.1:65536' has an invalid port '65536'; write a number from 0 to 65535",
        ),
        (
            "127.0.0.1:025",
            "'127.0.0.1:025' has an invalid port '025'; write a number from 0 to 65535",
        ),
        (
            "127.0.0.1:8_0",
            "'127.0.0.1:8_0' has an invalid port '8_0'; write a number from 0 to 65535",
        ),
        (
            "127.0.0.1:+25",
            "'127.0.0.1:+25' has an invalid port '+25'; write a number from 0 to 65535",
        ),
        ("127.0.0.1:", "'127.0.0.1:' has an invalid port ''; write a number from 0 to 65535"),
        (
            "127.0.0.1: 25",
            "'127.0.0.1: 25' has an invalid port ' 25'; write a number from 0 to 65535",
        ),
        ("[::1]:", "'[::1]:' has an invalid port ''; write a number from 0 to 65535"),
    ],
)
def test_bad_bind_addresses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        BindAddress.parse(text)
    assert str(caught.value) == message


def test_bind_address_validates_when_built_directly() -> None:
    with pytest.raises(InvalidSettingError, match=r"^port: must be from 0 to 65535, got 70000$"):
        BindAddress(IPv4Address("127.0.0.1"), 70000)
    with pytest.raises(InvalidSettingError, match=r"^port: expected an integer, got True$"):
        BindAddress(IPv4Address("127.0.0.1"), True)
    with pytest.raises(InvalidSettingError, match=r"^host: expected an IPv4Address"):
        BindAddress("127.0.0.1", 25)  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingError, match=r"^host: zone ids are not supported"):
        BindAddress(IPv6Address("fe80::1%eth0"), 25)
    with pytest.raises(InvalidSettingError, match=r"^host: bind the IPv4 address 127.0.0.1"):
        BindAddress(IPv6Address("::ffff:127.0.0.1"), 25)


# -- listener knobs -------------------------------------------------------------------------------


def test_listener_defaults() -> None:
    smtp = listener()
    assert smtp.tls is False
    assert smtp.override_proxy_trusted_networks is None
    assert smtp.proxy_header_timeout == DEFAULT_PROXY_HEADER_TIMEOUT == 5.0
    assert smtp.proxy_max_header_length == DEFAULT_PROXY_MAX_HEADER_LENGTH == 4096
    assert smtp.proxy_header_mode is HeaderMode.REQUIRED
    assert smtp.proxy_optional_wait == DEFAULT_PROXY_OPTIONAL_WAIT == 0.25
    assert smtp.proxy_v1_implies_tls is False
    assert smtp.proxy_allow_v1_mixed_family is False
    assert (smtp.max_connections, smtp.max_connections_per_ip) == (512, 16)
    assert (smtp.idle_timeout, smtp.tls_handshake_timeout) == (300.0, 10.0)
    assert (smtp.rate_limit_connections, smtp.rate_limit_messages) == (None, None)
    assert smtp.rate_limit_ipv6_prefix == 64


def test_listener_accepts_the_limits() -> None:
    assert listener(proxy_max_header_length=MIN_PROXY_MAX_HEADER_LENGTH)
    assert listener(proxy_max_header_length=MAX_PROXY_MAX_HEADER_LENGTH)
    assert MIN_PROXY_MAX_HEADER_LENGTH == 232
    assert MAX_PROXY_MAX_HEADER_LENGTH == 65551
    assert listener(proxy_header_timeout=300).proxy_header_timeout == 300
    assert listener(proxy_header_timeout=0.001)
    assert listener(proxy_optional_wait=10.0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "name: must be non-empty, without whitespace or control characters, got ''"),
        (
            {"name": "smtp in"},
            "name: must be non-empty, without whitespace or control characters, got 'smtp in'",
        ),
        ({"name": 7}, "name: expected a string, got 7"),
        ({"protocol": "pop3"}, "protocol: expected a ListenerProtocol, got 'pop3'"),
        ({"protocol": 25}, "protocol: expected a ListenerProtocol, got 25"),
        ({"bind": ()}, "bind: must list at least one address"),
        (
            {"bind": frozenset([BindAddress.parse("127.0.0.1:25")])},
            "bind: expected a tuple of BindAddress, got frozenset({BindAddress('127.0.0.1:25')})",
        ),
        (
            {"bind": (BindAddress.parse("127.0.0.1:25"), BindAddress.parse("127.0.0.1:25"))},
            "bind: 127.0.0.1:25 is listed twice",
        ),
        ({"bind": (25,)}, "bind: expected a BindAddress, got 25"),
        (
            {"bind": ["127.0.0.1:25", "localhost:25"]},
            "bind: 'localhost:25' is not an address and port: 'localhost' is not an IP address "
            "(listeners bind IP addresses, not host names)",
        ),
        ({"tls": 1}, "tls: expected a boolean, got 1"),
        ({"tls": "yes"}, "tls: expected a boolean, got 'yes'"),
        (
            {"override_proxy_trusted_networks": "10.0.0.0/8"},
            "override_proxy_trusted_networks: expected a TrustedNetworks or None, got '10.0.0.0/8'",
        ),
        (
            {"proxy_header_timeout": 0},
            "proxy_header_timeout: must be more than 0 and at most 300 seconds, got 0",
        ),
        (
            {"proxy_header_timeout": -1.0},
            "proxy_header_timeout: must be more than 0 and at most 300 seconds, got -1.0",
        ),
        (
            {"proxy_header_timeout": 5000},
            "proxy_header_timeout: must be more than 0 and at most 300 seconds, got 5000",
        ),
        (
            {"proxy_header_timeout": float("nan")},
            "proxy_header_timeout: must be more than 0 and at most 300 seconds, got nan",
        ),
        (
            {"proxy_header_timeout": float("inf")},
            "proxy_header_timeout: must be more than 0 and at most 300 seconds, got inf",
        ),
        (
            {"proxy_header_timeout": True},
            "proxy_header_timeout: expected a number of seconds, got True",
        ),
        (
            {"proxy_max_header_length": 231},
            "proxy_max_header_length: must be from 232 (a v2 header with a UNIX address and "
            "no TLVs) to 65551 bytes, got 231",
        ),
        (
            {"proxy_max_header_length": 65552},
            "proxy_max_header_length: must be from 232 (a v2 header with a UNIX address and "
            "no TLVs) to 65551 bytes, got 65552",
        ),
        (
            {"proxy_max_header_length": 4096.0},
            "proxy_max_header_length: expected an integer, got 4096.0",
        ),
        (
            {"proxy_max_header_length": False},
            "proxy_max_header_length: expected an integer, got False",
        ),
        (
            {"proxy_header_mode": "sometimes"},
            "proxy_header_mode: expected a HeaderMode, got 'sometimes'",
        ),
        (
            {"proxy_optional_wait": 0},
            "proxy_optional_wait: must be more than 0 and at most 10 seconds, got 0",
        ),
        (
            {"proxy_optional_wait": 250},
            "proxy_optional_wait: must be more than 0 and at most 10 seconds, got 250",
        ),
        ({"proxy_v1_implies_tls": "true"}, "proxy_v1_implies_tls: expected a boolean, got 'true'"),
        (
            {"proxy_allow_v1_mixed_family": 0},
            "proxy_allow_v1_mixed_family: expected a boolean, got 0",
        ),
        ({"max_connections": 0}, "max_connections: must be at least 1, got 0"),
        ({"max_connections": 1.5}, "max_connections: expected an integer, got 1.5"),
        ({"max_connections_per_ip": -3}, "max_connections_per_ip: must be at least 1, got -3"),
        (
            {"idle_timeout": 7200},
            "idle_timeout: must be more than 0 and at most 3600 seconds, got 7200",
        ),
        (
            {"tls_handshake_timeout": 0},
            "tls_handshake_timeout: must be more than 0 and at most 60 seconds, got 0",
        ),
        (
            {"rate_limit_connections": b"60/1m"},
            "rate_limit_connections: expected a RateLimit or None, got b'60/1m'",
        ),
        (
            {"rate_limit_messages": 60},
            "rate_limit_messages: expected a RateLimit or None, got 60",
        ),
        ({"rate_limit_ipv6_prefix": 31}, "rate_limit_ipv6_prefix: must be from 32 to 128, got 31"),
        (
            {"rate_limit_ipv6_prefix": 129},
            "rate_limit_ipv6_prefix: must be from 32 to 128, got 129",
        ),
        (
            {"rate_limit_ipv6_prefix": True},
            "rate_limit_ipv6_prefix: expected an integer, got True",
        ),
    ],
)
def test_listener_validation(fields: dict[str, Any], message: str) -> None:
    name = fields.pop("name", "smtp")
    with pytest.raises(InvalidSettingError) as caught:
        listener(name, **fields)
    assert str(caught.value) == message
    field, _, detail = message.partition(": ")
    assert caught.value.field == field
    assert caught.value.detail == detail
    assert isinstance(caught.value, ValueError)


def test_port_zero_may_repeat() -> None:
    # Each bind to port 0 gets its own free port, so listing it twice is not a conflict.
    zero = BindAddress.parse("127.0.0.1:0")
    assert listener(bind=(zero, zero)).bind == (zero, zero)


def test_listener_is_frozen() -> None:
    smtp = listener()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        smtp.tls = True  # type: ignore[misc]


def test_listener_repr_shows_what_differs_from_the_defaults() -> None:
    assert repr(listener()) == (
        "NetworkListener(name='smtp', protocol='smtp', bind=('127.0.0.1:2525',))"
    )
    custom = listener(
        "imaps",
        protocol=ListenerProtocol.IMAP,
        bind=(BindAddress.parse("[::]:993"), BindAddress.parse("0.0.0.0:993")),
        tls=True,
        override_proxy_trusted_networks=TrustedNetworks(),
        proxy_header_mode=HeaderMode.OPTIONAL,
    )
    assert repr(custom) == (
        "NetworkListener(name='imaps', protocol='imap', bind=('[::]:993', '0.0.0.0:993'), "
        "tls=True, override_proxy_trusted_networks=TrustedNetworks([]), "
        "proxy_header_mode='optional')"
    )


# -- Settings -----------------------------------------------------------------------------------


def test_settings_defaults_are_empty() -> None:
    settings = Settings()
    assert settings.system == SystemSettings()
    assert settings.listeners == ()
    assert not settings.all_proxy_trusted_networks()


def test_listener_lookup() -> None:
    smtp, imap = listener("smtp"), listener("imap", protocol=ListenerProtocol.IMAP)
    settings = Settings(SYSTEM, (smtp, imap))
    assert settings.listener("imap") is imap
    assert settings.effective_proxy_trusted_networks("smtp") == SYSTEM.proxy_trusted_networks
    with pytest.raises(KeyError) as caught:
        settings.listener("pop3")
    assert isinstance(caught.value, UnknownListenerError)
    assert str(caught.value) == "no listener named 'pop3'; the listeners are 'smtp', 'imap'"
    with pytest.raises(UnknownListenerError, match=r"^no listener named 'smtp'; there are none$"):
        Settings().listener("smtp")


def test_listener_names_are_unique() -> None:
    with pytest.raises(InvalidSettingError) as caught:
        Settings(listeners=(listener("smtp"), listener("imap"), listener("smtp")))
    assert str(caught.value) == (
        "listeners: duplicate listener name 'smtp' (listeners[0] and listeners[2])"
    )
    assert caught.value.field == "listeners"


def test_settings_type_checks() -> None:
    with pytest.raises(
        InvalidSettingError, match=r"^listeners: expected a tuple of NetworkListener"
    ):
        Settings(listeners=frozenset([listener()]))
    with pytest.raises(InvalidSettingError, match=r"^listeners: expected a NetworkListener"):
        Settings(listeners=("smtp",))  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingError, match=r"^system: expected a SystemSettings"):
        Settings(system=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingError, match=r"^proxy_trusted_networks: expected a Trusted"):
        SystemSettings(proxy_trusted_networks="127.0.0.1")


def test_all_proxy_trusted_networks_covers_every_override() -> None:
    settings = Settings(
        SYSTEM,
        (
            listener("smtp", override_proxy_trusted_networks=TrustedNetworks(["10.0.0.0/8"])),
            listener("submission"),
            listener("imap", override_proxy_trusted_networks=TrustedNetworks()),
            listener("http", override_proxy_trusted_networks=TrustedNetworks(["2001:db8::/32"])),
        ),
    )
    every = settings.all_proxy_trusted_networks()
    assert [str(network) for network in every] == [
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "2001:db8::/32",
    ]
    # A proxy trusted only by one listener's override is still a proxy: never ban it.
    assert ip_address("10.0.0.5") in every
    assert ip_address("2001:db8::5") in every
    assert ip_address("192.0.2.1") not in every


def test_settings_are_values() -> None:
    one = Settings(SYSTEM, (listener(),))
    two = Settings(SystemSettings(TrustedNetworks(["::1", "127.0.0.0/8"])), (listener(),))
    assert one == two
    assert hash(one) == hash(two)


# -- rates ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "period", "shown"),
    [
        ("60/1m", 60, 60.0, "60/1m"),
        ("200/1h", 200, 3600.0, "200/1h"),
        ("5/10s", 5, 10.0, "5/10s"),
        ("1/1d", 1, 86400.0, "1/1d"),
        ("100/60s", 100, 60.0, "100/1m"),
        ("10/90s", 10, 90.0, "10/90s"),
        ("1000000/24h", 1_000_000, 86400.0, "1000000/1d"),
    ],
)
def test_rate_parse(text: str, count: int, period: float, shown: str) -> None:
    rate = RateLimit.parse(text)
    assert (rate.count, rate.period) == (count, period)
    assert str(rate) == shown
    assert repr(rate) == f"RateLimit({shown!r})"
    assert RateLimit.parse(str(rate)) == rate


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "60 per minute",
            "'60 per minute' is not a rate: write a count, '/', a number and a unit "
            "(s, m, h or d), such as '60/1m' or '200/1h'",
        ),
        ("60/m", "'60/m' is not a rate: write a count"),
        ("60/1M", "'60/1M' is not a rate: write a count"),
        ("60 /1m", "'60 /1m' is not a rate: write a count"),
        ("+60/1m", "'+60/1m' is not a rate: write a count"),
        ("60/1.5m", "'60/1.5m' is not a rate: write a count"),
        ("60/1m ", "'60/1m ' is not a rate: write a count"),
        ("\uff16\uff10/1m", "'\uff16\uff10/1m' is not a rate: write a count"),
        ("060/1m", "'060/1m' is not a rate: '060' has a leading zero"),
        ("0/1m", "'0/1m' has a count of 0; it must be from 1 to 1000000"),
        ("1000001/1d", "'1000001/1d' has a count of 1000001; it must be from 1 to 1000000"),
        ("5/0s", "'5/0s' has a period of 0 seconds; it must be from 1 second to 86400 (1d)"),
        ("5/2d", "'5/2d' has a period of 172800 seconds; it must be from 1 second to 86400 (1d)"),
    ],
)
def test_bad_rates(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        RateLimit.parse(text)


def test_rate_limit_validates_when_built_directly() -> None:
    assert RateLimit(3, 0.5).emission_interval == pytest.approx(1 / 6)
    with pytest.raises(InvalidSettingError, match=r"^count: must be from 1 to 1000000, got 0$"):
        RateLimit(0, 60.0)
    with pytest.raises(InvalidSettingError, match=r"^count: expected an integer, got 1.5$"):
        RateLimit(1.5, 60.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingError, match=r"^period: must be more than 0 and at most"):
        RateLimit(1, 86401.0)
    with pytest.raises(TypeError, match="a rate is a string"):
        RateLimit.parse(60)  # type: ignore[arg-type]


def test_gcra_parameters() -> None:
    rate = RateLimit.parse("60/1m")
    assert rate.emission_interval == 1.0
    # count events at once from rest: the first at TAT = now, the last (count - 1) * T ahead.
    assert rate.burst_tolerance == 59.0
    assert RateLimit(1, 10.0).burst_tolerance == 0.0


def test_listener_repr_shows_rate_limits() -> None:
    smtp = listener(rate_limit_connections=RateLimit.parse("60/1m"), rate_limit_ipv6_prefix=56)
    assert repr(smtp) == (
        "NetworkListener(name='smtp', protocol='smtp', bind=('127.0.0.1:2525',), "
        "rate_limit_connections=RateLimit('60/1m'), rate_limit_ipv6_prefix=56)"
    )


# -- auto-ban -------------------------------------------------------------------------------------


def test_auto_ban_defaults() -> None:
    policy = Settings().auto_ban
    assert policy == AutoBanSettings()
    assert (policy.enable, policy.failures, policy.window, policy.duration) == (
        True,
        10,
        600.0,
        3600.0,
    )
    assert policy.ipv6_prefix == 64


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"enable": 1}, "enable: expected a boolean, got 1"),
        ({"failures": 0}, "failures: must be from 1 to 1000, got 0"),
        ({"failures": 1001}, "failures: must be from 1 to 1000, got 1001"),
        ({"failures": 2.0}, "failures: expected an integer, got 2.0"),
        ({"window": 0}, "window: must be more than 0 and at most 86400 seconds, got 0"),
        (
            {"duration": 2592001},
            "duration: must be more than 0 and at most 2592000 seconds, got 2592001",
        ),
        ({"ipv6_prefix": 24}, "ipv6_prefix: must be from 32 to 128, got 24"),
    ],
)
def test_auto_ban_validation(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSettingError) as caught:
        AutoBanSettings(**fields)
    assert str(caught.value) == message


def test_settings_check_the_auto_ban_type() -> None:
    with pytest.raises(InvalidSettingError, match=r"^auto_ban: expected an AutoBanSettings"):
        Settings(auto_ban=None)  # type: ignore[arg-type]


def test_listener_takes_the_short_spellings() -> None:
    short = NetworkListener(name="smtp", protocol="smtp", bind=["127.0.0.1:2526"])
    assert short == NetworkListener(
        name="smtp", protocol=ListenerProtocol.SMTP, bind=(BindAddress.parse("127.0.0.1:2526"),)
    )
    one = NetworkListener(
        name="imap",
        protocol="imap",
        bind="[::1]:143",
        override_proxy_trusted_networks=["10.0.0.0/8"],
        proxy_header_mode="optional",
        rate_limit_connections="60/1m",
        rate_limit_messages="100/1h",
    )
    assert one.bind == (BindAddress.parse("[::1]:143"),)
    assert one.override_proxy_trusted_networks == TrustedNetworks(["10.0.0.0/8"])
    assert one.proxy_header_mode is HeaderMode.OPTIONAL
    assert one.rate_limit_connections == RateLimit.parse("60/1m")
    assert one.rate_limit_messages == RateLimit.parse("100/1h")
    # An empty list still turns PROXY off on the listener, as an empty TrustedNetworks does.
    off = NetworkListener(
        name="x", protocol="http", bind="127.0.0.1:80", override_proxy_trusted_networks=[]
    )
    assert off.proxy_disabled_explicitly


def test_settings_take_the_short_spellings() -> None:
    system = SystemSettings(proxy_trusted_networks=["10.0.0.0/8", "::1"])
    assert system.proxy_trusted_networks == TrustedNetworks(["10.0.0.0/8", "::1"])
    settings = Settings(system=system, listeners=[listener()])
    assert settings.listeners == (listener(),)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"rate_limit_messages": "60 per minute"},
            "rate_limit_messages: '60 per minute' is not a rate",
        ),
        ({"override_proxy_trusted_networks": ["10.0.0.1/8"]}, "host bits set"),
        ({"bind": "127.0.0.1"}, "bind: '127.0.0.1' has no port"),
    ],
)
def test_short_spellings_that_do_not_convert_name_the_field(
    fields: dict[str, object], message: str
) -> None:
    values: dict[str, object] = {"name": "x", "protocol": "smtp", "bind": "127.0.0.1:25"}
    with pytest.raises(ValueError, match=re.escape(message)):
        NetworkListener(**(values | fields))  # type: ignore[arg-type]


def test_the_limits_keep_their_old_import_path_for_one_release() -> None:
    with pytest.warns(DeprecationWarning, match="moved to mailedge.defaults.MAX_IDLE_TIMEOUT"):
        from mailedge.settings import MAX_IDLE_TIMEOUT
    assert MAX_IDLE_TIMEOUT == 3600.0
    with pytest.raises(AttributeError):
        mailedge.settings.NO_SUCH_LIMIT  # noqa: B018


# -- SystemSettings.nat64_prefixes -----------------------------------------------------------------


def test_nat64_prefixes_default_to_none_and_take_text_or_networks() -> None:
    assert SystemSettings().nat64_prefixes == ()
    operator = IPv6Network("2001:db8:64::/96")
    assert SystemSettings(nat64_prefixes=["2001:db8:64::/96"]).nat64_prefixes == (operator,)
    assert SystemSettings(nat64_prefixes=(operator,)).nat64_prefixes == (operator,)
    # A value, so that a reload with the same prefixes compares equal.
    assert SystemSettings(nat64_prefixes=[operator]) == SystemSettings(nat64_prefixes=[operator])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["2001:db8:64::/64"], "nat64_prefixes: [0]: '2001:db8:64::/64' is a /64"),
        (["64:ff9b::/96", "2001:db8::/32"], "nat64_prefixes: [1]: '2001:db8::/32' is a /32"),
        (["10.0.0.0/8"], "nat64_prefixes: [0]: '10.0.0.0/8' is not a NAT64 prefix"),
        (["64:ff9b::"], "nat64_prefixes: [0]: '64:ff9b::' is not a NAT64 prefix"),
        ([IPv6Network("2001:db8::/64")], "nat64_prefixes: [0]: '2001:db8::/64' is a /64"),
        ([96], "nat64_prefixes: [0]: a NAT64 prefix is a string or an IPv6Network, not int"),
        (
            ["2001:db8:64::/96", "2001:db8:64::/96"],
            "nat64_prefixes: [1]: 2001:db8:64::/96 is listed twice (first at [0])",
        ),
        (
            [f"2001:db8:{index:x}::/96" for index in range(65)],
            "nat64_prefixes: lists 65 prefixes; at most 64 are allowed",
        ),
        ("2001:db8:64::/96", "nat64_prefixes: expected a tuple of /96 IPv6Network"),
    ],
)
def test_nat64_prefixes_are_checked(value: Any, message: str) -> None:
    with pytest.raises(InvalidSettingError, match=re.escape(message)) as raised:
        SystemSettings(nat64_prefixes=value)
    assert raised.value.field == "nat64_prefixes"
