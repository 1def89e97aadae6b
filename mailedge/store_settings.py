"""``[Store]``: where rate-limit and ban state lives, one process's memory or a shared Redis.

A value like the other settings (:mod:`mailedge.settings` holds it as ``Settings.store``);
:mod:`mailedge.hooks.redis` builds a store from it. docs/scale-out.md says what each choice
means.
"""

from __future__ import annotations

import enum
import urllib.parse
from typing import Any

import attrs

from mailedge import defaults
from mailedge.validation import InvalidSettingError, enum_value, of_type, seconds

__all__ = [
    "StoreBackend",
    "StoreFailurePolicy",
    "StoreSettings",
    "StoreTopology",
    "StoreURL",
    "parse_store_url",
]


class StoreBackend(enum.StrEnum):
    """Where rate-limit and ban state lives."""

    MEMORY = "memory"
    REDIS = "redis"


class StoreFailurePolicy(enum.StrEnum):
    """What a Redis store answers while Redis does not (docs/scale-out.md)."""

    # A per-process memory store, and the bans this process knows: limits per process.
    LOCAL = "local"
    # Everyone is allowed; known bans still hold.
    OPEN = "open"
    # Every rate-limited event is refused; known bans still hold.
    CLOSED = "closed"


class StoreTopology(enum.StrEnum):
    """How the store finds its Redis: one server, a Sentinel-watched primary, or a Cluster."""

    SINGLE = "single"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


# One server: passed to coredis as it is (coredis parses the db, the TLS query options).
_SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
# The scheme of a URL naming several hosts: its topology, and whether it speaks TLS.
_MULTI_SCHEMES = {
    "redis+sentinel": (StoreTopology.SENTINEL, False),
    "rediss+sentinel": (StoreTopology.SENTINEL, True),
    "redis+cluster": (StoreTopology.CLUSTER, False),
    "rediss+cluster": (StoreTopology.CLUSTER, True),
}
# Sentinel's and Redis's own default ports, as redis-cli and redis-py assume them.
_DEFAULT_PORTS = {StoreTopology.SENTINEL: 26379, StoreTopology.CLUSTER: 6379}
_SCHEMES_TEXT = "redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, " + (
    "redis+cluster:// or rediss+cluster://"
)


@attrs.frozen
class StoreURL:
    """``[Store] url``, parsed: where the store connects and how (docs/configuration.md).

    For ``SINGLE`` only ``url`` matters (coredis reads it). For Sentinel, ``hosts`` are the
    Sentinels and ``service`` the monitored primary's name; for Cluster, ``hosts`` are the
    startup nodes. The user and password are the data nodes', never the Sentinels'.
    """

    url: str = attrs.field(repr=False)
    topology: StoreTopology
    tls: bool = False
    hosts: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = attrs.field(default=None, repr=False)
    password: str | None = attrs.field(default=None, repr=False)


def _redacted(url: str) -> str:
    """The URL with any password replaced, for error messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    if not at:
        return url
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{hosts}{slash}{path}"


def _parse_host(text: str, default_port: int, url: str) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad host {text!r} in {_redacted(url)!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = text.partition(":")
    if not host or any(ch.isspace() or ch in "/?#@" for ch in host):
        raise ValueError(f"bad host {text!r} in {_redacted(url)!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in {_redacted(url)!r}: expected 1 to 65535")
    return host, int(port_text)


def parse_store_url(url: str) -> StoreURL:
    """Parse ``[Store] url``; ValueError names what is wrong, never the password.

    ``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]`` and
    ``redis+cluster://[user:password@]host[:port][,host[:port]...]``, with ``rediss+`` for TLS,
    as the redis-py ecosystem spells them; a host may be ``[IPv6]``.
    """
    if url.startswith(_SINGLE_SCHEMES):
        if url.startswith(("redis://", "rediss://")):
            authority = url.partition("://")[2].partition("/")[0].partition("?")[0]
            host = authority.rpartition("@")[2]
            if host:
                if "," in host:
                    raise ValueError(
                        f"several hosts in {_redacted(url)!r}: use redis+sentinel:// or "
                        "redis+cluster:// for more than one server"
                    )
                _parse_host(host, 6379, url)
        return StoreURL(url, StoreTopology.SINGLE, tls=url.startswith("rediss://"))
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _MULTI_SCHEMES:
        raise ValueError(f"expected a {_SCHEMES_TEXT} URL, got {_redacted(url)!r}")
    topology, tls = _MULTI_SCHEMES[scheme]
    if "?" in rest or "#" in rest:
        raise ValueError(f"{scheme}:// takes no query or fragment: {_redacted(url)!r}")
    authority, _, path = rest.partition("/")
    userinfo, at, host_list = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
    if not host_list:
        raise ValueError(f"no hosts in {_redacted(url)!r}")
    hosts = tuple(_parse_host(item, _DEFAULT_PORTS[topology], url) for item in host_list.split(","))
    segments = [urllib.parse.unquote(part) for part in path.split("/")] if path else []
    while segments and not segments[-1]:
        segments.pop()
    service = None
    db = 0
    if topology is StoreTopology.SENTINEL:
        if not segments or not segments[0]:
            raise ValueError(
                f"no service name in {_redacted(url)!r}: expected "
                f"{scheme}://host:port[,host:port...]/service_name[/db]"
            )
        if len(segments) > 2:
            raise ValueError(f"expected /service_name[/db], got /{path}")
        service = segments[0]
        if len(segments) == 2:
            if not segments[1].isdigit():
                raise ValueError(f"bad database {segments[1]!r}: expected a number")
            db = int(segments[1])
    elif segments:
        raise ValueError(f"{scheme}:// takes no path (a Cluster has only database 0), got /{path}")
    return StoreURL(url, topology, tls, hosts, service, db, username, password)


def _check_store_url(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise InvalidSettingError(attribute.name, f"expected a URL string, got {value!r}")
    try:
        parse_store_url(value)
    except ValueError as error:
        raise InvalidSettingError(attribute.name, str(error)) from None


def _check_key_prefix(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidSettingError(attribute.name, f"expected a non-empty string, got {value!r}")
    # Braces would start a Cluster hash tag of their own and split one client's keys.
    if "{" in value or "}" in value or any(ch.isspace() for ch in value):
        raise InvalidSettingError(
            attribute.name, f"must not contain braces or whitespace, got {value!r}"
        )


def _to_store_backend(value: StoreBackend | str) -> StoreBackend:
    return enum_value(StoreBackend, "backend", value)


def _to_failure_policy(value: StoreFailurePolicy | str) -> StoreFailurePolicy:
    return enum_value(StoreFailurePolicy, "on_failure", value)


@attrs.frozen
class StoreSettings:
    """Where limits and bans live: this process's memory, or a Redis shared by many."""

    # Memory by default: one process needs nothing else, and `make serve` stays self-contained.
    backend: StoreBackend = attrs.field(
        default=StoreBackend.MEMORY,
        converter=_to_store_backend,
        validator=of_type("a StoreBackend", StoreBackend),
    )
    url: str = attrs.field(default=defaults.DEFAULT_STORE_URL, validator=_check_store_url)
    key_prefix: str = attrs.field(
        default=defaults.DEFAULT_STORE_KEY_PREFIX, validator=_check_key_prefix
    )
    # Seconds one store call may wait on Redis before the failure policy answers instead.
    timeout: float = attrs.field(
        default=defaults.DEFAULT_STORE_TIMEOUT, validator=seconds(defaults.MAX_STORE_TIMEOUT)
    )
    # The local fallback by default: a Redis outage must never become a mail outage.
    on_failure: StoreFailurePolicy = attrs.field(
        default=StoreFailurePolicy.LOCAL,
        converter=_to_failure_policy,
        validator=of_type("a StoreFailurePolicy", StoreFailurePolicy),
    )
    # Seconds between full re-reads of the mirrored ban list (a lost message's longest effect).
    resync_period: float = attrs.field(
        default=defaults.DEFAULT_STORE_RESYNC_PERIOD,
        validator=seconds(defaults.MAX_STORE_RESYNC_PERIOD),
    )
