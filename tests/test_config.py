"""Tests for mailedge.config: the documented example, and every error with its exact message."""

from __future__ import annotations

import json
import pathlib
import re
from ipaddress import IPv6Network, ip_address

import pytest

from mailedge import config
from mailedge.config import (
    ConfigError,
    listener_changes,
    load,
    load_document,
    loads,
    loads_document,
    rebind_problem,
    require_listeners,
)
from mailedge.networks import TrustedNetworks
from mailedge.settings import (
    AutoBanSettings,
    BindAddress,
    HeaderMode,
    ListenerProtocol,
    NetworkListener,
    RateLimit,
    Settings,
    SystemSettings,
)

EXAMPLE_TOML = """\
[SystemSettings]
proxyTrustedNetworks = ["127.0.0.0/8", "::1"]

[[NetworkListener]]
name = "smtp"
protocol = "smtp"
bind = ["127.0.0.1:2525", "[::1]:2525"]
overrideProxyTrustedNetworks = ["10.0.0.0/8"]   # optional; [] turns PROXY off here
"""

EXAMPLE_JSON = """\
{
  "SystemSettings": {"proxyTrustedNetworks": ["127.0.0.0/8", "::1"]},
  "NetworkListener": [
    {
      "name": "smtp",
      "protocol": "smtp",
      "bind": ["127.0.0.1:2525", "[::1]:2525"],
      "overrideProxyTrustedNetworks": ["10.0.0.0/8"]
    }
  ]
}
"""

EXAMPLE = Settings(
    system=SystemSettings(TrustedNetworks(["127.0.0.0/8", "::1"])),
    listeners=(
        NetworkListener(
            name="smtp",
            protocol=ListenerProtocol.SMTP,
            bind=(BindAddress.parse("127.0.0.1:2525"), BindAddress.parse("[::1]:2525")),
            override_proxy_trusted_networks=TrustedNetworks(["10.0.0.0/8"]),
        ),
    ),
)

# Every key, none at its default: the JSON twin of the full example in docs/configuration.md.
FULL = {
    "SystemSettings": {"proxyTrustedNetworks": ["127.0.0.0/8", "::1", "10.0.0.0/8"]},
    "AutoBan": {"enable": True, "failures": 5, "window": 300, "duration": 7200, "ipv6Prefix": 56},
    "NetworkListener": [
        {
            "name": "submissions",
            "protocol": "smtp",
            "bind": ["0.0.0.0:465"],
            "tls": True,
            "overrideProxyTrustedNetworks": ["192.0.2.10", "2001:db8::/32"],
            "proxyHeaderTimeout": 3,
            "proxyMaxHeaderLength": 8192,
            "maxConnections": 256,
            "maxConnectionsPerIp": 8,
            "idleTimeout": 120,
            "tlsHandshakeTimeout": 5,
            "rateLimitConnections": "60/1m",
            "rateLimitMessages": "200/1h",
            "rateLimitIpv6Prefix": 56,
        },
        {
            "name": "submission-nginx",
            "protocol": "smtp",
            "bind": ["127.0.0.1:10587", "[::1]:10587"],
            "proxyHeaderMode": "optional",
            "proxyOptionalWait": 0.5,
            "proxyV1ImpliesTls": True,
            "proxyAllowV1MixedFamily": True,
        },
        {
            "name": "imap",
            "protocol": "imap",
            "bind": ["0.0.0.0:143"],
            "overrideProxyTrustedNetworks": [],
        },
    ],
}


def listener(**fields: object) -> str:
    """A TOML listener with the three required keys, plus ``fields`` written as JSON values."""
    lines = ["[[NetworkListener]]", 'name = "smtp"', 'protocol = "smtp"', 'bind = ["0.0.0.0:25"]']
    lines += [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def toml_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        loads(text, format="toml")
    return caught.value


def json_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        loads(text, format="json")
    return caught.value


# -- what loads ---------------------------------------------------------------------------------


def test_the_example_and_its_json_twin_load_to_equal_settings() -> None:
    from_toml = loads(EXAMPLE_TOML, format="toml")
    from_json = loads(EXAMPLE_JSON, format="json")
    assert from_toml == from_json == EXAMPLE
    smtp = from_toml.listener("smtp")
    assert smtp.effective_proxy_trusted_networks(from_toml.system) == TrustedNetworks(
        ["10.0.0.0/8"]
    )


def test_every_key() -> None:
    settings = loads(json.dumps(FULL), format="json")
    submissions = settings.listener("submissions")
    assert submissions.tls is True
    assert submissions.override_proxy_trusted_networks == TrustedNetworks(
        ["192.0.2.10", "2001:db8::/32"]
    )
    assert submissions.proxy_header_timeout == 3
    assert submissions.proxy_max_header_length == 8192
    assert (submissions.max_connections, submissions.max_connections_per_ip) == (256, 8)
    assert (submissions.idle_timeout, submissions.tls_handshake_timeout) == (120, 5)
    assert submissions.rate_limit_connections == RateLimit(60, 60.0)
    assert submissions.rate_limit_messages == RateLimit(200, 3600.0)
    assert submissions.rate_limit_ipv6_prefix == 56
    assert settings.auto_ban == AutoBanSettings(
        enable=True, failures=5, window=300, duration=7200, ipv6_prefix=56
    )
    nginx = settings.listener("submission-nginx")
    assert nginx.rate_limit_connections is None
    assert nginx.rate_limit_messages is None
    assert nginx.rate_limit_ipv6_prefix == 64
    assert nginx.bind == (BindAddress.parse("127.0.0.1:10587"), BindAddress.parse("[::1]:10587"))
    assert nginx.override_proxy_trusted_networks is None
    assert nginx.effective_proxy_trusted_networks(settings.system) == TrustedNetworks(
        ["127.0.0.0/8", "::1", "10.0.0.0/8"]
    )
    assert nginx.proxy_header_mode is HeaderMode.OPTIONAL
    assert nginx.proxy_optional_wait == 0.5
    assert nginx.proxy_v1_implies_tls is True
    assert nginx.proxy_allow_v1_mixed_family is True
    imap = settings.listener("imap")
    assert imap.protocol is ListenerProtocol.IMAP
    assert imap.proxy_disabled_explicitly
    assert not imap.effective_proxy_trusted_networks(settings.system)
    every = settings.all_proxy_trusted_networks()
    assert ip_address("192.0.2.10") in every
    assert ip_address("10.1.1.1") in every


def test_the_documented_full_example_matches_its_json_twin() -> None:
    docs = pathlib.Path(__file__).parent.parent / "docs" / "configuration.md"
    blocks = re.findall(r"```(toml|json)\n(.*?)```", docs.read_text(), re.S)
    loaded = [loads(text, format=kind) for kind, text in blocks if "submissions" in text]
    # One TOML block and one JSON block hold the full example.
    assert [kind for kind, text in blocks if "submissions" in text] == ["toml", "json"]
    assert loaded[0] == loaded[1] == loads(json.dumps(FULL), format="json")
    short = [loads(text, format=kind) for kind, text in blocks if "2525" in text]
    assert short == [EXAMPLE, EXAMPLE]


def test_every_key_is_documented() -> None:
    docs = (pathlib.Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for section in config._SECTIONS:
        assert f"## `{section.name}`" in docs
        for key in section.keys:
            assert f"| `{key.name}` |" in docs, key.name


@pytest.mark.parametrize(("text", "kind"), [("", "toml"), ("{}", "json")])
def test_an_empty_config_has_no_listeners_and_no_trusted_networks(text: str, kind: str) -> None:
    settings = loads(text, format=kind)  # type: ignore[arg-type]
    assert settings == Settings()
    assert not settings.system.proxy_trusted_networks


def test_either_table_may_be_missing() -> None:
    only_system = loads('[SystemSettings]\nproxyTrustedNetworks = ["::1"]\n', format="toml")
    assert only_system.listeners == ()
    only_listener = loads(listener(), format="toml")
    assert not only_listener.system.proxy_trusted_networks
    assert loads("[SystemSettings]\n", format="toml") == Settings()


def test_load_picks_the_format_by_suffix(tmp_path: pathlib.Path) -> None:
    (tmp_path / "mailedge.toml").write_text(EXAMPLE_TOML)
    (tmp_path / "mailedge.json").write_text(EXAMPLE_JSON)
    (tmp_path / "UPPER.TOML").write_text(EXAMPLE_TOML)
    assert load(tmp_path / "mailedge.toml") == EXAMPLE
    assert load(str(tmp_path / "mailedge.json")) == EXAMPLE
    assert load(tmp_path / "UPPER.TOML") == EXAMPLE


def test_load_skips_a_byte_order_mark(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mailedge.json"
    path.write_bytes(b"\xef\xbb\xbf" + EXAMPLE_JSON.encode())
    assert load(path) == EXAMPLE


# -- errors: values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        (
            EXAMPLE_TOML + listener(overrideProxyTrustedNetworks=["::1", "10.0.0.300/8"]),
            "NetworkListener[1].overrideProxyTrustedNetworks[1]",
            "NetworkListener[1].overrideProxyTrustedNetworks[1]: "
            "'10.0.0.300/8' is not an IP network",
        ),
        (
            '[SystemSettings]\nproxyTrustedNetworks = ["10.0.0.1/8"]\n',
            "SystemSettings.proxyTrustedNetworks[0]",
            "SystemSettings.proxyTrustedNetworks[0]: '10.0.0.1/8' has host bits set: "
            "write '10.0.0.0/8' for the network or '10.0.0.1' for one host",
        ),
        (
            '[SystemSettings]\nproxyTrustedNetworks = ["fe80::1%eth0"]\n',
            "SystemSettings.proxyTrustedNetworks[0]",
            "SystemSettings.proxyTrustedNetworks[0]: 'fe80::1%eth0' is not an IP network: "
            "zone ids ('%eth0') are not allowed",
        ),
        (
            '[SystemSettings]\nproxyTrustedNetworks = ["127.0.0.1", 10]\n',
            "SystemSettings.proxyTrustedNetworks[1]",
            "SystemSettings.proxyTrustedNetworks[1]: expected a string, got 10",
        ),
        (
            '[SystemSettings]\nproxyTrustedNetworks = "127.0.0.0/8"\n',
            "SystemSettings.proxyTrustedNetworks",
            "SystemSettings.proxyTrustedNetworks: expected an array of strings, "
            "got '127.0.0.0/8'; write [\"127.0.0.0/8\"]",
        ),
        (
            "[SystemSettings]\nproxyTrustedNetworks = {}\n",
            "SystemSettings.proxyTrustedNetworks",
            "SystemSettings.proxyTrustedNetworks: expected an array of strings, got a table",
        ),
        (
            listener(tls="yes"),
            "NetworkListener[0].tls",
            "NetworkListener[0].tls: expected a boolean, got 'yes'",
        ),
        (
            listener(tls=1),
            "NetworkListener[0].tls",
            "NetworkListener[0].tls: expected a boolean, got 1",
        ),
        (
            listener(proxyHeaderTimeout=True),
            "NetworkListener[0].proxyHeaderTimeout",
            "NetworkListener[0].proxyHeaderTimeout: expected a number of seconds, got true",
        ),
        (
            listener(proxyHeaderTimeout="5s"),
            "NetworkListener[0].proxyHeaderTimeout",
            "NetworkListener[0].proxyHeaderTimeout: expected a number of seconds, got '5s'",
        ),
        (
            listener(proxyHeaderTimeout=0),
            "NetworkListener[0].proxyHeaderTimeout",
            "NetworkListener[0].proxyHeaderTimeout: "
            "must be more than 0 and at most 300 seconds, got 0",
        ),
        (
            listener() + "proxyHeaderTimeout = inf\n",
            "NetworkListener[0].proxyHeaderTimeout",
            "NetworkListener[0].proxyHeaderTimeout: "
            "must be more than 0 and at most 300 seconds, got inf",
        ),
        (
            listener(proxyMaxHeaderLength=4096.0),
            "NetworkListener[0].proxyMaxHeaderLength",
            "NetworkListener[0].proxyMaxHeaderLength: expected an integer, got 4096.0",
        ),
        (
            listener(proxyMaxHeaderLength=False),
            "NetworkListener[0].proxyMaxHeaderLength",
            "NetworkListener[0].proxyMaxHeaderLength: expected an integer, got false",
        ),
        (
            listener(proxyMaxHeaderLength=100),
            "NetworkListener[0].proxyMaxHeaderLength",
            "NetworkListener[0].proxyMaxHeaderLength: must be from 232 (a v2 header with a "
            "UNIX address and no TLVs) to 65551 bytes, got 100",
        ),
        (
            listener(proxyHeaderMode="Required"),
            "NetworkListener[0].proxyHeaderMode",
            "NetworkListener[0].proxyHeaderMode: "
            "expected one of 'required', 'optional', got 'Required'",
        ),
        (
            listener(proxyOptionalWait=250),
            "NetworkListener[0].proxyOptionalWait",
            "NetworkListener[0].proxyOptionalWait: "
            "must be more than 0 and at most 10 seconds, got 250",
        ),
        (
            listener(proxyV1ImpliesTls="true"),
            "NetworkListener[0].proxyV1ImpliesTls",
            "NetworkListener[0].proxyV1ImpliesTls: expected a boolean, got 'true'",
        ),
        (
            listener(proxyAllowV1MixedFamily=[]),
            "NetworkListener[0].proxyAllowV1MixedFamily",
            "NetworkListener[0].proxyAllowV1MixedFamily: expected a boolean, got an array",
        ),
        (
            listener() + "tls = 2024-01-01\n",
            "NetworkListener[0].tls",
            "NetworkListener[0].tls: expected a boolean, got a date",
        ),
        (
            '[[NetworkListener]]\nname = "smtp"\nprotocol = "pop3"\nbind = ["0.0.0.0:110"]\n',
            "NetworkListener[0].protocol",
            "NetworkListener[0].protocol: expected one of 'smtp', 'imap', 'http', got 'pop3'",
        ),
        (
            '[[NetworkListener]]\nname = "smtp in"\nprotocol = "smtp"\nbind = ["0.0.0.0:25"]\n',
            "NetworkListener[0].name",
            "NetworkListener[0].name: "
            "must be non-empty, without whitespace or control characters, got 'smtp in'",
        ),
        (
            '[[NetworkListener]]\nname = 25\nprotocol = "smtp"\nbind = ["0.0.0.0:25"]\n',
            "NetworkListener[0].name",
            "NetworkListener[0].name: expected a string, got 25",
        ),
        (
            '[[NetworkListener]]\nname = "smtp"\nprotocol = "smtp"\nbind = "0.0.0.0:25"\n',
            "NetworkListener[0].bind",
            "NetworkListener[0].bind: expected an array of strings, got '0.0.0.0:25'; "
            'write ["0.0.0.0:25"]',
        ),
        (
            '[[NetworkListener]]\nname = "smtp"\nprotocol = "smtp"\nbind = []\n',
            "NetworkListener[0].bind",
            "NetworkListener[0].bind: must list at least one address",
        ),
        (
            '[[NetworkListener]]\nname = "smtp"\nprotocol = "smtp"\n'
            'bind = ["0.0.0.0:25", "localhost:25"]\n',
            "NetworkListener[0].bind[1]",
            "NetworkListener[0].bind[1]: 'localhost:25' is not an address and port: "
            "'localhost' is not an IP address (listeners bind IP addresses, not host names)",
        ),
        (
            '[[NetworkListener]]\nname = "smtp"\nprotocol = "smtp"\nbind = ["::1:25"]\n',
            "NetworkListener[0].bind[0]",
            "NetworkListener[0].bind[0]: '::1:25' needs brackets around an IPv6 address, "
            "such as '127.0.0.1:25' or '[::1]:25'",
        ),
        (
            '[[NetworkListener]]\nname = "smtp"\nprotocol = "smtp"\n'
            'bind = ["0.0.0.0:25", "0.0.0.0:25"]\n',
            "NetworkListener[0].bind",
            "NetworkListener[0].bind: 0.0.0.0:25 is listed twice",
        ),
        (
            listener(rateLimitConnections="60 per minute"),
            "NetworkListener[0].rateLimitConnections",
            "NetworkListener[0].rateLimitConnections: '60 per minute' is not a rate: write a "
            "count, '/', a number and a unit (s, m, h or d), such as '60/1m' or '200/1h'",
        ),
        (
            listener(rateLimitConnections=60),
            "NetworkListener[0].rateLimitConnections",
            "NetworkListener[0].rateLimitConnections: expected a rate such as '60/1m', got 60",
        ),
        (
            listener(rateLimitMessages="10/2d"),
            "NetworkListener[0].rateLimitMessages",
            "NetworkListener[0].rateLimitMessages: '10/2d' has a period of 172800 seconds; "
            "it must be from 1 second to 86400 (1d)",
        ),
        (
            listener(rateLimitMessages="0/1h"),
            "NetworkListener[0].rateLimitMessages",
            "NetworkListener[0].rateLimitMessages: '0/1h' has a count of 0; "
            "it must be from 1 to 1000000",
        ),
        (
            listener(rateLimitMessages="60/01m"),
            "NetworkListener[0].rateLimitMessages",
            "NetworkListener[0].rateLimitMessages: '60/01m' is not a rate: '01' has a leading zero",
        ),
        (
            listener(rateLimitIpv6Prefix=16),
            "NetworkListener[0].rateLimitIpv6Prefix",
            "NetworkListener[0].rateLimitIpv6Prefix: must be from 32 to 128, got 16",
        ),
        (
            listener(rateLimitIpv6Prefix=64.0),
            "NetworkListener[0].rateLimitIpv6Prefix",
            "NetworkListener[0].rateLimitIpv6Prefix: expected an integer, got 64.0",
        ),
        (
            "[AutoBan]\nipv6Prefix = 16\n",
            "AutoBan.ipv6Prefix",
            "AutoBan.ipv6Prefix: must be from 32 to 128, got 16",
        ),
        (
            "[AutoBan]\nenable = 1\n",
            "AutoBan.enable",
            "AutoBan.enable: expected a boolean, got 1",
        ),
        (
            "[AutoBan]\nfailures = 0\n",
            "AutoBan.failures",
            "AutoBan.failures: must be from 1 to 1000, got 0",
        ),
        (
            "[AutoBan]\nwindow = '10m'\n",
            "AutoBan.window",
            "AutoBan.window: expected a number of seconds, got '10m'",
        ),
        (
            "[AutoBan]\nduration = 0\n",
            "AutoBan.duration",
            "AutoBan.duration: must be more than 0 and at most 2592000 seconds, got 0",
        ),
    ],
)
def test_value_errors_name_the_path_and_the_value(text: str, path: str, message: str) -> None:
    error = toml_error(text)
    assert str(error) == message
    assert error.path == path
    assert error.file is None
    assert error.line is None
    assert isinstance(error, ValueError)


# -- errors: structure ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        (
            listener(overideProxyTrustedNetworks=[]),
            "NetworkListener[0]",
            "NetworkListener[0]: unknown key 'overideProxyTrustedNetworks' "
            "(did you mean 'overrideProxyTrustedNetworks'?)",
        ),
        (
            listener(proxyTrustedNetworks=[]),
            "NetworkListener[0]",
            "NetworkListener[0]: unknown key 'proxyTrustedNetworks' "
            "(did you mean 'overrideProxyTrustedNetworks'?)",
        ),
        (
            listener(proxy_header_timeout=3),
            "NetworkListener[0]",
            "NetworkListener[0]: unknown key 'proxy_header_timeout' "
            "(did you mean 'proxyHeaderTimeout'?)",
        ),
        (
            listener(TLS=True),
            "NetworkListener[0]",
            "NetworkListener[0]: unknown key 'TLS' (did you mean 'tls'?)",
        ),
        (
            listener(maxSessions=100),
            "NetworkListener[0]",
            "NetworkListener[0]: unknown key 'maxSessions' (did you mean 'maxConnections'?)",
        ),
        (
            "[SystemSettings]\nproxyTrustedNetwork = []\n",
            "SystemSettings",
            "SystemSettings: unknown key 'proxyTrustedNetwork' "
            "(did you mean 'proxyTrustedNetworks'?)",
        ),
        (
            "[NetworkListeners]\n",
            None,
            "unknown key 'NetworkListeners' (did you mean 'NetworkListener'?)",
        ),
        ("[server]\n", None, "unknown key 'server'"),
        (
            "[Autoban]\n",
            None,
            "unknown key 'Autoban' (did you mean 'AutoBan'?)",
        ),
        (
            "[AutoBan]\nfailure = 3\n",
            "AutoBan",
            "AutoBan: unknown key 'failure' (did you mean 'failures'?)",
        ),
        (
            listener(rateLimit="60/1m"),
            "NetworkListener[0]",
            "NetworkListener[0]: unknown key 'rateLimit' (did you mean 'rateLimitMessages'?)",
        ),
        (
            '[[NetworkListener]]\nname = "smtp"\nprotocol = "smtp"\n',
            "NetworkListener[0]",
            "NetworkListener[0]: missing required key 'bind'",
        ),
        (
            '[[NetworkListener]]\nname = "smtp"\nbind = ["0.0.0.0:25"]\n',
            "NetworkListener[0]",
            "NetworkListener[0]: missing required key 'protocol'",
        ),
        (
            EXAMPLE_TOML + '[[NetworkListener]]\nprotocol = "imap"\nbind = ["0.0.0.0:143"]\n',
            "NetworkListener[1]",
            "NetworkListener[1]: missing required key 'name'",
        ),
        (
            '[NetworkListener]\nname = "smtp"\n',
            "NetworkListener",
            "NetworkListener: expected an array of tables, got a table "
            "(write [[NetworkListener]] for each one)",
        ),
        (
            "NetworkListener = [1]\n",
            "NetworkListener[0]",
            "NetworkListener[0]: expected a table, got 1",
        ),
        (
            "SystemSettings = []\n",
            "SystemSettings",
            "SystemSettings: expected a table, got an array",
        ),
        (
            EXAMPLE_TOML + listener(),
            "NetworkListener[1].name",
            "NetworkListener[1].name: duplicate listener name 'smtp' "
            "(already used by NetworkListener[0])",
        ),
    ],
)
def test_structure_errors(text: str, path: str | None, message: str) -> None:
    error = toml_error(text)
    assert str(error) == message
    assert error.path == path


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("[]", None, "the document must be an object, got an array"),
        ("null", None, "the document must be an object, got null"),
        (
            '{"NetworkListener": {}}',
            "NetworkListener",
            "NetworkListener: expected an array of objects, got an object",
        ),
        (
            '{"SystemSettings": null}',
            "SystemSettings",
            "SystemSettings: expected an object, got null",
        ),
        (
            '{"SystemSettings": {"proxyTrustedNetworks": ["::1"], "proxyTrustedNetworks": []}}',
            "SystemSettings",
            "SystemSettings: duplicate key 'proxyTrustedNetworks'",
        ),
        ('{"SystemSettings": {}, "SystemSettings": {}}', None, "duplicate key 'SystemSettings'"),
        (
            '{"NetworkListener": [{"name": "smtp", "protocol": "smtp", "bind": ["[::]:25"],'
            ' "proxyOptionalWait": NaN}]}',
            "NetworkListener[0].proxyOptionalWait",
            "NetworkListener[0].proxyOptionalWait: "
            "must be more than 0 and at most 10 seconds, got nan",
        ),
        (
            '{"NetworkListener": [{"name": "smtp", "protocol": "smtp", "bind": ["[::]:25"],'
            ' "tls": "false"}]}',
            "NetworkListener[0].tls",
            "NetworkListener[0].tls: expected a boolean, got 'false'",
        ),
        (
            '{"NetworkListener": [{"name": "smtp", "protocol": "smtp", "bind": ["[::]:25"],'
            ' "tls": {}}]}',
            "NetworkListener[0].tls",
            "NetworkListener[0].tls: expected a boolean, got an object",
        ),
    ],
)
def test_json_structure_errors(text: str, path: str | None, message: str) -> None:
    error = json_error(text)
    assert str(error) == message
    assert error.path == path


# -- errors: syntax -----------------------------------------------------------------------------


def test_toml_syntax_error_names_the_line() -> None:
    error = toml_error('[SystemSettings]\nproxyTrustedNetworks = ["::1",\n  "10.0.0.0/8"\n  oops\n')
    assert str(error) == "line 4, column 3: invalid TOML: Unclosed array"
    assert (error.line, error.column, error.path) == (4, 3, None)


def test_toml_syntax_error_at_the_end_names_the_last_line() -> None:
    error = toml_error('[SystemSettings]\nproxyTrustedNetworks = ["::1"\n')
    assert str(error) == "line 3: invalid TOML: Unclosed array"
    assert (error.line, error.column) == (3, None)


def test_json_syntax_error_names_the_line() -> None:
    error = json_error('{\n  "SystemSettings": {\n    "proxyTrustedNetworks": ["::1",]\n  }\n}\n')
    assert str(error) == "line 3, column 36: invalid JSON: Expecting value"
    assert (error.line, error.column) == (3, 36)


def test_load_prefixes_the_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mailedge.toml"
    path.write_text(EXAMPLE_TOML + listener(tls="yes"))
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == f"{path}: NetworkListener[1].tls: expected a boolean, got 'yes'"
    assert caught.value.path == "NetworkListener[1].tls"
    assert caught.value.file == str(path)


def test_load_prefixes_the_file_to_syntax_errors(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mailedge.json"
    path.write_text('{"SystemSettings": {"proxyTrustedNetworks": ["::1"]}\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == (f"{path}: line 2, column 1: invalid JSON: Expecting ',' delimiter")
    assert caught.value.line == 2


@pytest.mark.parametrize(
    ("name", "found"), [("mailedge.yaml", "the suffix '.yaml'"), ("mailedge", "no suffix")]
)
def test_load_refuses_other_suffixes(tmp_path: pathlib.Path, name: str, found: str) -> None:
    path = tmp_path / name
    path.write_text(EXAMPLE_TOML)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == f"{path}: name the file *.toml or *.json; it has {found}"


def test_load_refuses_invalid_utf8(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mailedge.toml"
    path.write_bytes(b'[SystemSettings]\nproxyTrustedNetworks = ["\xff"]\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == f"{path}: not valid UTF-8 (at byte 42)"


def test_missing_file_is_an_os_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.toml")


def test_a_missing_file_is_named_in_a_sentence(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        load(tmp_path / "missing.toml")
    assert str(caught.value) == f"{tmp_path / 'missing.toml'}: there is no such config file"
    assert "Errno" not in str(caught.value)


def test_settings_without_listeners_are_refused() -> None:
    settings = loads('[SystemSettings]\nproxyTrustedNetworks = ["10.0.0.0/8"]\n', format="toml")
    with pytest.raises(ConfigError, match=r"no \[\[NetworkListener\]\] tables"):
        require_listeners(settings, "x.toml")
    require_listeners(loads(EXAMPLE_TOML, format="toml"))


RELOAD_BASE = """[SystemSettings]
proxyTrustedNetworks = ["10.0.0.0/8"]

[[NetworkListener]]
name = "smtp"
protocol = "smtp"
bind = ["127.0.0.1:25"]

[[NetworkListener]]
name = "imap"
protocol = "imap"
bind = ["127.0.0.1:143"]
overrideProxyTrustedNetworks = []
"""


def test_reload_changes_are_named_per_listener() -> None:
    old = loads(RELOAD_BASE, format="toml")
    new = loads(RELOAD_BASE.replace('"10.0.0.0/8"', '"127.0.0.0/8"'), format="toml")
    assert listener_changes(old, new) == [
        "listener smtp: trusted networks [10.0.0.0/8] -> [127.0.0.0/8]"
    ]
    assert listener_changes(old, old) == []
    assert rebind_problem(old, new) is None


@pytest.mark.parametrize(
    ("old_text", "new_text", "problem"),
    [
        (
            'bind = ["127.0.0.1:143"]',
            'bind = ["127.0.0.1:993"]',
            "listener 'imap' binds 127.0.0.1:993 instead of 127.0.0.1:143",
        ),
        ('name = "imap"', 'name = "imap4"', "listener 'imap4' is new"),
    ],
)
def test_a_reload_that_rebinds_names_the_listener(
    old_text: str, new_text: str, problem: str
) -> None:
    old = loads(RELOAD_BASE, format="toml")
    new = loads(RELOAD_BASE.replace(old_text, new_text), format="toml")
    assert rebind_problem(old, new) == problem


def test_loads_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="format must be 'toml' or 'json', got 'yaml'"):
        loads("", format="yaml")  # type: ignore[arg-type]


# -- an application's own sections ------------------------------------------------------------


def test_extra_sections_are_returned_raw_and_others_still_refused(tmp_path: pathlib.Path) -> None:
    text = (
        '[SystemSettings]\nproxyTrustedNetworks = ["127.0.0.0/8"]\n\n'
        '[Example]\nhostname = "mx.test"\nusers = { demo = "pw" }\n'
    )
    document = loads_document(text, format="toml", extra_sections=["Example"])
    assert document.extra == {"Example": {"hostname": "mx.test", "users": {"demo": "pw"}}}
    assert document.settings.system.proxy_trusted_networks == TrustedNetworks(["127.0.0.0/8"])
    # Without asking for it, the same section is an unknown key, as before.
    with pytest.raises(ConfigError, match="unknown key 'Example'"):
        loads(text, format="toml")
    path = tmp_path / "server.toml"
    path.write_text(text)
    assert load_document(path, extra_sections=["Example"]) == document


def test_an_extra_section_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match=r"^Example: expected a table, got 3$"):
        loads_document("Example = 3\n", format="toml", extra_sections=["Example"])


# -- SystemSettings.nat64Prefixes ---------------------------------------------------------------


def test_nat64_prefixes_load_from_toml_and_json() -> None:
    toml = '[SystemSettings]\nnat64Prefixes = ["2001:db8:64::/96", "64:ff9b:1:abcd::/96"]\n'
    json_text = '{"SystemSettings": {"nat64Prefixes": ["2001:db8:64::/96", "64:ff9b:1:abcd::/96"]}}'
    expected = (IPv6Network("2001:db8:64::/96"), IPv6Network("64:ff9b:1:abcd::/96"))
    assert loads(toml, format="toml").system.nat64_prefixes == expected
    assert loads(json_text, format="json").system.nat64_prefixes == expected
    assert loads("", format="toml").system.nat64_prefixes == ()


@pytest.mark.parametrize(
    ("value", "path", "message"),
    [
        (
            '["2001:db8:64::/96", "2001:db8:64::/64"]',
            "SystemSettings.nat64Prefixes[1]",
            "'2001:db8:64::/64' is a /64; a NAT64 prefix must be given as a /96 "
            "(the IPv4 client in its last 32 bits)",
        ),
        (
            '["64:ff9b::"]',
            "SystemSettings.nat64Prefixes[0]",
            "'64:ff9b::' is not a NAT64 prefix: write it with its length, '64:ff9b::/96'",
        ),
        (
            '["2001:db8:64::1/96"]',
            "SystemSettings.nat64Prefixes[0]",
            "'2001:db8:64::1/96' is not a NAT64 prefix: expected an IPv6 network such as "
            "'2001:db8:64::/96', with no bits set after the prefix",
        ),
        (
            '["192.0.2.0/24"]',
            "SystemSettings.nat64Prefixes[0]",
            "'192.0.2.0/24' is not a NAT64 prefix: it is IPv4, not IPv6",
        ),
        (
            '["2001:db8:64::/96", "2001:DB8:64::/96"]',
            "SystemSettings.nat64Prefixes[1]",
            "'2001:DB8:64::/96' is listed twice (first at [0])",
        ),
        (
            '"2001:db8:64::/96"',
            "SystemSettings.nat64Prefixes",
            "expected an array of strings, got '2001:db8:64::/96'; write [\"2001:db8:64::/96\"]",
        ),
        ("[96]", "SystemSettings.nat64Prefixes[0]", "expected a string, got 96"),
    ],
)
def test_nat64_prefix_errors_name_the_entry(value: str, path: str, message: str) -> None:
    error = toml_error(f"[SystemSettings]\nnat64Prefixes = {value}\n")
    assert error.path == path
    assert str(error) == f"{path}: {message}"


def test_a_misspelt_nat64_key_gets_a_suggestion() -> None:
    error = toml_error('[SystemSettings]\nnat64Prefix = ["64:ff9b::/96"]\n')
    assert "unknown key 'nat64Prefix' (did you mean 'nat64Prefixes'?)" in str(error)
