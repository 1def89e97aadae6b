"""The configuration as values: the server-wide settings, the listeners and their gate knobs.

The names follow Stalwart's configuration model in snake_case: a server-wide
``proxy_trusted_networks`` list (:class:`SystemSettings`), and per listener an optional
``override_proxy_trusted_networks`` that replaces it (:class:`NetworkListener`).

Unlike Stalwart, an explicitly *empty* override turns PROXY off on that listener instead of
inheriting the server-wide list (Stalwart issue #557): ``None`` inherits, ``TrustedNetworks()``
disables.

Every value validates itself when built and raises :class:`InvalidSettingError` (a
``ValueError``) naming the field; :mod:`mailedge.config` maps those fields back to the keys
of the configuration file.
"""

from __future__ import annotations

import enum
import re
import warnings
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from typing import Any, cast

import attrs

from mailedge import defaults
from mailedge.clients import Nat64Prefixes, parse_nat64_prefix
from mailedge.networks import (
    IPAddress,
    NetworkEntry,
    TrustedNetworks,
    format_endpoint,
    split_host_port,
)
from mailedge.store_settings import StoreSettings
from mailedge.validation import (
    InvalidSettingError,
    count,
    enum_value,
    expect_int,
    of_type,
    parsed,
    seconds,
)

__all__ = [
    "AutoBanSettings",
    "BindAddress",
    "HeaderMode",
    "InvalidSettingError",
    "NetworkListener",
    "ListenerProtocol",
    "RateLimit",
    "Settings",
    "SystemSettings",
    "UnknownListenerError",
]

# A listener name appears in every event about its connections; whitespace would split it.
_NAME = re.compile(r"[^\s\x00-\x1f\x7f]+")
# A rate: a count, "/", a number and a unit, in plain ASCII decimal: "60/1m", "200/1h".
# The digit counts only bound the work; the ranges are checked on the numbers.
_RATE = re.compile(r"([0-9]{1,9})/([0-9]{1,9})([smhd])")
_RATE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE_EXAMPLE = "such as '60/1m' or '200/1h'"


class UnknownListenerError(KeyError):
    """:meth:`Settings.listener` was asked for a name that no listener has."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__(name)
        self.name = name
        self.message = f"no listener named {name!r}; " + (
            f"the listeners are {', '.join(map(repr, known))}" if known else "there are none"
        )

    def __str__(self) -> str:
        # KeyError's own __str__ would print the message as a quoted repr.
        return self.message


class ListenerProtocol(enum.StrEnum):
    """What a listener speaks after the PROXY header."""

    SMTP = "smtp"
    IMAP = "imap"
    HTTP = "http"

    @property
    def server_first(self) -> bool:
        """True when the server speaks first (a greeting), so a client may send nothing."""
        return self is not ListenerProtocol.HTTP


class HeaderMode(enum.StrEnum):
    """Whether a trusted peer must send a PROXY header."""

    # The spec: a receiver must not guess whether a header is coming.
    REQUIRED = "required"
    # Opt-in: trusted peers may also connect directly (health checks, local tools).
    OPTIONAL = "optional"


def _check_header_length(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    length = expect_int(attribute, value)
    if not defaults.MIN_PROXY_MAX_HEADER_LENGTH <= length <= defaults.MAX_PROXY_MAX_HEADER_LENGTH:
        raise InvalidSettingError(
            attribute.name,
            f"must be from {defaults.MIN_PROXY_MAX_HEADER_LENGTH} (a v2 header with a UNIX address "
            f"and no TLVs) to {defaults.MAX_PROXY_MAX_HEADER_LENGTH} bytes, got {length!r}",
        )


def _check_name(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise InvalidSettingError(attribute.name, f"expected a string, got {value!r}")
    if not _NAME.fullmatch(value):
        raise InvalidSettingError(
            attribute.name,
            f"must be non-empty, without whitespace or control characters, got {value!r}",
        )


def _check_host(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    of_type("an IPv4Address or IPv6Address", IPv4Address, IPv6Address)(_instance, attribute, value)
    if isinstance(value, IPv6Address):
        if value.scope_id is not None:
            raise InvalidSettingError(attribute.name, f"zone ids are not supported, got {value}")
        if value.ipv4_mapped is not None:
            raise InvalidSettingError(
                attribute.name, f"bind the IPv4 address {value.ipv4_mapped}, not {value!r}"
            )


def _check_port(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    # Port 0 asks the system for a free port: tests bind that way.
    if not 0 <= expect_int(attribute, value) <= 0xFFFF:
        raise InvalidSettingError(attribute.name, f"must be from 0 to 65535, got {value!r}")


def _bind_error(text: str, detail: str) -> ValueError:
    return ValueError(f"{text!r} {detail}")


@attrs.frozen(repr=False)
class BindAddress:
    """An IP address and port a listener binds: ``127.0.0.1:2525`` or ``[::1]:2525``."""

    host: IPAddress = attrs.field(validator=_check_host)
    port: int = attrs.field(validator=_check_port)

    @classmethod
    def parse(cls, text: str) -> BindAddress:
        """Parse ``"127.0.0.1:25"`` or ``"[::1]:25"``; raise ``ValueError`` naming ``text``.

        IPv6 must be bracketed, and host names are refused: a mail server binds addresses,
        and a name that resolves differently tomorrow would move the listener silently.
        """
        if not isinstance(text, str):
            raise TypeError(f"a bind address is a string, not {type(text).__name__}")
        split = split_host_port(text)
        host_text = split.host
        host: IPAddress
        if split.bracketed:
            if "%" in host_text:
                raise _bind_error(text, "has a zone id; zone ids are not supported")
            try:
                host = IPv6Address(host_text)
            except ValueError:
                raise _bind_error(
                    text, f"is not an address and port: {host_text!r} is not an IPv6 address"
                ) from None
        else:
            try:
                host = IPv4Address(host_text)
            except ValueError:
                raise _bind_error(
                    text,
                    f"is not an address and port: {host_text!r} is not an IP address "
                    "(listeners bind IP addresses, not host names)",
                ) from None
        if isinstance(host, IPv6Address) and host.ipv4_mapped is not None:
            raise _bind_error(
                text,
                f"is an IPv4-mapped address; write '{host.ipv4_mapped}:{split.port}' instead",
            )
        return cls(host, split.port)

    def __str__(self) -> str:
        return format_endpoint(self.host, self.port)

    def __repr__(self) -> str:
        return f"BindAddress({str(self)!r})"


def _check_networks(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    of_type("a TrustedNetworks", TrustedNetworks)(_instance, attribute, value)


def _check_override(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        of_type("a TrustedNetworks or None", TrustedNetworks)(_instance, attribute, value)


def _check_bind(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, tuple):
        raise InvalidSettingError(attribute.name, f"expected a tuple of BindAddress, got {value!r}")
    if not value:
        # A listener that binds nothing is a mistake, not a way to disable it.
        raise InvalidSettingError(attribute.name, "must list at least one address")
    seen: set[BindAddress] = set()
    for item in value:
        if not isinstance(item, BindAddress):
            raise InvalidSettingError(attribute.name, f"expected a BindAddress, got {item!r}")
        # Port 0 picks a fresh port on each bind, so it may repeat.
        if item in seen and item.port != 0:
            raise InvalidSettingError(attribute.name, f"{item} is listed twice")
        seen.add(item)


def _rate_count(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not 1 <= expect_int(attribute, value) <= defaults.MAX_RATE_LIMIT_COUNT:
        raise InvalidSettingError(
            attribute.name, f"must be from 1 to {defaults.MAX_RATE_LIMIT_COUNT}, got {value!r}"
        )


def _rate_error(text: str, detail: str) -> ValueError:
    return ValueError(f"{text!r} {detail}")


@attrs.frozen(repr=False)
class RateLimit:
    """At most ``count`` events per ``period`` seconds: ``RateLimit.parse("60/1m")``.

    Enforced with GCRA (see :mod:`mailedge.hooks.ratelimit`): a client may use all ``count``
    at once, and then one every ``period / count`` seconds.
    """

    count: int = attrs.field(validator=_rate_count)
    period: float = attrs.field(validator=seconds(defaults.MAX_RATE_LIMIT_PERIOD))

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """Parse ``"<count>/<number><unit>"``, the unit one of s, m, h, d; strictly.

        Raises ``ValueError`` naming ``text``: no spaces, no signs, no leading zeros, no
        fractions, and lower-case units only, so that a typo is an error, not another limit.
        """
        if not isinstance(text, str):
            raise TypeError(f"a rate is a string, not {type(text).__name__}")
        match = _RATE.fullmatch(text)
        if match is None:
            raise _rate_error(
                text,
                "is not a rate: write a count, '/', a number and a unit (s, m, h or d), "
                + _RATE_EXAMPLE,
            )
        count_text, amount_text, unit = match.groups()
        for number in (count_text, amount_text):
            if number.startswith("0") and number != "0":
                raise _rate_error(text, f"is not a rate: {number!r} has a leading zero")
        count, amount = int(count_text), int(amount_text)
        if not 1 <= count <= defaults.MAX_RATE_LIMIT_COUNT:
            raise _rate_error(
                text,
                f"has a count of {count}; it must be from 1 to {defaults.MAX_RATE_LIMIT_COUNT}",
            )
        period = amount * _RATE_UNITS[unit]
        if not 1 <= period <= defaults.MAX_RATE_LIMIT_PERIOD:
            raise _rate_error(
                text,
                f"has a period of {period} seconds; it must be from 1 second to "
                f"{defaults.MAX_RATE_LIMIT_PERIOD:g} (1d)",
            )
        return cls(count, float(period))

    @property
    def emission_interval(self) -> float:
        """GCRA's T: the steady-state spacing between two events, ``period / count``."""
        return self.period / self.count

    @property
    def burst_tolerance(self) -> float:
        """GCRA's tau: how far ahead of schedule a client may run, ``(count - 1) * T``.

        With it, ``count`` events are allowed at once from a rested state, no more.
        """
        return self.emission_interval * (self.count - 1)

    def __str__(self) -> str:
        if self.period == int(self.period):
            seconds = int(self.period)
            for unit, size in reversed(_RATE_UNITS.items()):
                if seconds % size == 0:
                    return f"{self.count}/{seconds // size}{unit}"
        return f"{self.count}/{self.period:g}s"

    def __repr__(self) -> str:
        return f"RateLimit({str(self)!r})"


def _check_rate_limit(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        of_type("a RateLimit or None", RateLimit)(_instance, attribute, value)


def _ipv6_prefix(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not defaults.MIN_IPV6_PREFIX <= expect_int(attribute, value) <= defaults.MAX_IPV6_PREFIX:
        raise InvalidSettingError(
            attribute.name,
            f"must be from {defaults.MIN_IPV6_PREFIX} to {defaults.MAX_IPV6_PREFIX}, got {value!r}",
        )


def _check_failures(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not 1 <= expect_int(attribute, value) <= defaults.MAX_AUTO_BAN_FAILURES:
        raise InvalidSettingError(
            attribute.name, f"must be from 1 to {defaults.MAX_AUTO_BAN_FAILURES}, got {value!r}"
        )


# -- converters: the short spellings ------------------------------------------------------
#
# Each field also takes the text a person would write ("smtp", "127.0.0.1:25", "10.0.0.0/8",
# "60/1m") and converts it; a value of any other type passes through unchanged, so that the
# field's validator names it. Text that does not convert is an InvalidSettingError naming the
# field, like every other bad value.


def _networks(field: str, value: TrustedNetworks | Iterable[NetworkEntry]) -> TrustedNetworks:
    if isinstance(value, list | tuple):
        return parsed(field, TrustedNetworks, value)
    return cast(TrustedNetworks, value)


def _rate_limit(field: str, value: RateLimit | str | None) -> RateLimit | None:
    return parsed(field, RateLimit.parse, value) if isinstance(value, str) else value


# attrs' mypy plugin takes only named functions as converters: one per field.


def _to_protocol(value: ListenerProtocol | str) -> ListenerProtocol:
    return enum_value(ListenerProtocol, "protocol", value)


def _to_header_mode(value: HeaderMode | str) -> HeaderMode:
    return enum_value(HeaderMode, "proxy_header_mode", value)


def _to_trusted_networks(value: TrustedNetworks | Iterable[NetworkEntry]) -> TrustedNetworks:
    return _networks("proxy_trusted_networks", value)


def _to_override(
    value: TrustedNetworks | Iterable[NetworkEntry] | None,
) -> TrustedNetworks | None:
    return None if value is None else _networks("override_proxy_trusted_networks", value)


def _to_bind(value: str | BindAddress | Iterable[str | BindAddress]) -> tuple[BindAddress, ...]:
    if isinstance(value, str | BindAddress):
        value = (value,)
    if not isinstance(value, list | tuple):
        return cast(tuple[BindAddress, ...], value)
    return tuple(
        parsed("bind", BindAddress.parse, item) if isinstance(item, str) else item for item in value
    )


def _to_connections_limit(value: RateLimit | str | None) -> RateLimit | None:
    return _rate_limit("rate_limit_connections", value)


def _to_messages_limit(value: RateLimit | str | None) -> RateLimit | None:
    return _rate_limit("rate_limit_messages", value)


def _to_nat64_prefixes(value: Iterable[str | IPv6Network]) -> Nat64Prefixes:
    if not isinstance(value, list | tuple):
        return cast(Nat64Prefixes, value)
    prefixes = []
    for index, item in enumerate(value):
        try:
            prefixes.append(parse_nat64_prefix(item))
        except (ValueError, TypeError) as error:
            raise InvalidSettingError("nat64_prefixes", f"[{index}]: {error}") from None
    return tuple(prefixes)


def _check_nat64_prefixes(
    _instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if not isinstance(value, tuple):
        raise InvalidSettingError(
            attribute.name, f"expected a tuple of /96 IPv6Network, got {value!r}"
        )
    if len(value) > defaults.MAX_NAT64_PREFIXES:
        raise InvalidSettingError(
            attribute.name,
            f"lists {len(value)} prefixes; at most {defaults.MAX_NAT64_PREFIXES} are allowed",
        )
    seen: dict[IPv6Network, int] = {}
    for index, item in enumerate(value):
        if not isinstance(item, IPv6Network) or item.prefixlen != defaults.NAT64_PREFIX_LENGTH:
            raise InvalidSettingError(
                attribute.name, f"[{index}]: expected a /96 IPv6Network, got {item!r}"
            )
        if item in seen:
            raise InvalidSettingError(
                attribute.name, f"[{index}]: {item} is listed twice (first at [{seen[item]}])"
            )
        seen[item] = index


def _to_listeners(value: Iterable[NetworkListener]) -> tuple[NetworkListener, ...]:
    return tuple(value) if isinstance(value, list) else cast(tuple[NetworkListener, ...], value)


@attrs.frozen
class SystemSettings:
    """The server-wide settings."""

    # Peers whose PROXY headers are believed on every listener without an override. Empty by
    # default, as in Stalwart: PROXY stays off until you name the proxies.
    proxy_trusted_networks: TrustedNetworks = attrs.field(
        default=TrustedNetworks(),
        converter=_to_trusted_networks,
        validator=_check_networks,
    )
    # NAT64 prefixes (/96) besides 64:ff9b::/96 and 64:ff9b:1::/48, whose addresses are
    # counted, limited and banned as the IPv4 client they carry rather than by IPv6 prefix:
    # behind NAT64 every IPv4 client shares one /64, and would share one ban.
    nat64_prefixes: Nat64Prefixes = attrs.field(
        default=(), converter=_to_nat64_prefixes, validator=_check_nat64_prefixes
    )


@attrs.frozen(repr=False)
class NetworkListener:
    """One listener: where it binds, what it speaks, and how its PROXY gate behaves."""

    # Names the listener in events and in Settings.listener(); unique across the settings.
    name: str = attrs.field(validator=_check_name)
    protocol: ListenerProtocol = attrs.field(
        converter=_to_protocol, validator=of_type("a ListenerProtocol", ListenerProtocol)
    )
    # One or more addresses: "127.0.0.1:25", ["[::1]:25", ...] or BindAddress values.
    bind: tuple[BindAddress, ...] = attrs.field(converter=_to_bind, validator=_check_bind)
    # Implicit TLS: the server's own handshake follows the PROXY header (smtps, imaps, https).
    tls: bool = attrs.field(default=False, validator=of_type("a boolean", bool))
    # None inherits the server-wide list; a list replaces it; an empty list turns PROXY off.
    override_proxy_trusted_networks: TrustedNetworks | None = attrs.field(
        default=None, converter=_to_override, validator=_check_override
    )
    # How long a trusted peer has to deliver its whole header (see the constant for why 5 s).
    proxy_header_timeout: float = attrs.field(
        default=defaults.DEFAULT_PROXY_HEADER_TIMEOUT,
        validator=seconds(defaults.MAX_PROXY_HEADER_TIMEOUT),
    )
    # Cap on a whole v2 header, TLVs included (v1 is capped at 107 bytes by the spec).
    proxy_max_header_length: int = attrs.field(
        default=defaults.DEFAULT_PROXY_MAX_HEADER_LENGTH, validator=_check_header_length
    )
    # Required by default, as the spec says; optional lets trusted peers also connect directly.
    proxy_header_mode: HeaderMode = attrs.field(
        default=HeaderMode.REQUIRED,
        converter=_to_header_mode,
        validator=of_type("a HeaderMode", HeaderMode),
    )
    # Optional mode, server-first protocols: how long to wait for a trusted peer's first bytes
    # before greeting it as a direct client.
    proxy_optional_wait: float = attrs.field(
        default=defaults.DEFAULT_PROXY_OPTIONAL_WAIT,
        validator=seconds(defaults.MAX_PROXY_OPTIONAL_WAIT),
    )
    # nginx terminating TLS sends v1, which has no way to say so; off unless you know it is.
    proxy_v1_implies_tls: bool = attrs.field(default=False, validator=of_type("a boolean", bool))
    # nginx's out-of-spec "PROXY TCP6" line carrying IPv4 addresses; off, the spec forbids it.
    proxy_allow_v1_mixed_family: bool = attrs.field(
        default=False, validator=of_type("a boolean", bool)
    )

    # Open connections on this listener, from accept to close; over it, a protocol refusal.
    max_connections: int = attrs.field(default=defaults.DEFAULT_MAX_CONNECTIONS, validator=count)
    # Open connections per recovered client IP (IPv6: per /64); never counted on the proxy.
    max_connections_per_ip: int = attrs.field(
        default=defaults.DEFAULT_MAX_CONNECTIONS_PER_IP, validator=count
    )
    # A session in which the peer neither sends nor reads for this long is closed.
    idle_timeout: float = attrs.field(
        default=defaults.DEFAULT_IDLE_TIMEOUT, validator=seconds(defaults.MAX_IDLE_TIMEOUT)
    )
    # The server's own handshake (implicit TLS, STARTTLS) must finish within this.
    tls_handshake_timeout: float = attrs.field(
        default=defaults.DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        validator=seconds(defaults.MAX_TLS_HANDSHAKE_TIMEOUT),
    )
    # New connections per recovered client (see rate_limit_ipv6_prefix), checked by
    # RateLimitHooks.on_connect. Off by default: the right number depends on the site (an MX
    # and a submission port behind one webmail host differ by orders of magnitude).
    rate_limit_connections: RateLimit | None = attrs.field(
        default=None,
        converter=_to_connections_limit,
        validator=_check_rate_limit,
    )
    # SMTP transactions (MAIL FROM) per recovered client, checked by RateLimitHooks.on_mail_from.
    # Off by default, for the same reason.
    rate_limit_messages: RateLimit | None = attrs.field(
        default=None, converter=_to_messages_limit, validator=_check_rate_limit
    )
    # How many leading bits of an IPv6 client the rate limits count as one client.
    rate_limit_ipv6_prefix: int = attrs.field(
        default=defaults.DEFAULT_IPV6_PREFIX, validator=_ipv6_prefix
    )

    def effective_proxy_trusted_networks(self, system: SystemSettings) -> TrustedNetworks:
        """The networks this listener trusts: its override if set, else the server-wide list."""
        if self.override_proxy_trusted_networks is not None:
            return self.override_proxy_trusted_networks
        return system.proxy_trusted_networks

    @property
    def proxy_disabled_explicitly(self) -> bool:
        """True when an empty override turns PROXY off here, whatever the server-wide list."""
        override = self.override_proxy_trusted_networks
        return override is not None and not override

    def __repr__(self) -> str:
        # Name, protocol and bind always; the other fields only when they differ from the default.
        parts = [
            f"name={self.name!r}",
            f"protocol={str(self.protocol)!r}",
            f"bind={tuple(str(address) for address in self.bind)!r}",
        ]
        for field in attrs.fields(NetworkListener)[3:]:
            value = getattr(self, field.name)
            if value != field.default:
                shown = repr(str(value)) if isinstance(value, enum.Enum) else repr(value)
                parts.append(f"{field.name}={shown}")
        return f"NetworkListener({', '.join(parts)})"


@attrs.frozen
class AutoBanSettings:
    """The server-wide auto-ban policy: ``failures`` within ``window`` seconds ban a client.

    Every address in :meth:`Settings.all_proxy_trusted_networks` is exempt, always.
    """

    # On by default: it acts only on failures (bad logins, PROXY headers from untrusted peers,
    # protocol errors), and trusted proxies are exempt, so it cannot lock out a whole proxy.
    enable: bool = attrs.field(default=True, validator=of_type("a boolean", bool))
    # How many failures within the window ban the client (see the constant for why 10).
    failures: int = attrs.field(
        default=defaults.DEFAULT_AUTO_BAN_FAILURES, validator=_check_failures
    )
    # The sliding window the failures are counted in, in seconds.
    window: float = attrs.field(
        default=defaults.DEFAULT_AUTO_BAN_WINDOW, validator=seconds(defaults.MAX_AUTO_BAN_WINDOW)
    )
    # How long a ban lasts, in seconds.
    duration: float = attrs.field(
        default=defaults.DEFAULT_AUTO_BAN_DURATION,
        validator=seconds(defaults.MAX_AUTO_BAN_DURATION),
    )
    # How many leading bits of an IPv6 client one ban covers.
    ipv6_prefix: int = attrs.field(default=defaults.DEFAULT_IPV6_PREFIX, validator=_ipv6_prefix)


def _check_listeners(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, tuple):
        raise InvalidSettingError(
            attribute.name, f"expected a tuple of NetworkListener, got {value!r}"
        )
    first_index: dict[str, int] = {}
    for index, listener in enumerate(value):
        if not isinstance(listener, NetworkListener):
            raise InvalidSettingError(
                attribute.name, f"expected a NetworkListener, got {listener!r}"
            )
        if listener.name in first_index:
            raise InvalidSettingError(
                attribute.name,
                f"duplicate listener name {listener.name!r} "
                f"(listeners[{first_index[listener.name]}] and listeners[{index}])",
            )
        first_index[listener.name] = index


@attrs.frozen
class Settings:
    """The whole configuration: the server-wide settings and every listener."""

    system: SystemSettings = attrs.field(
        default=SystemSettings(), validator=of_type("a SystemSettings", SystemSettings)
    )
    # Listener names are unique, so events and Settings.listener() can name one unambiguously.
    listeners: tuple[NetworkListener, ...] = attrs.field(
        default=(), converter=_to_listeners, validator=_check_listeners
    )
    auto_ban: AutoBanSettings = attrs.field(
        default=AutoBanSettings(), validator=of_type("an AutoBanSettings", AutoBanSettings)
    )
    store: StoreSettings = attrs.field(
        default=StoreSettings(), validator=of_type("a StoreSettings", StoreSettings)
    )

    def listener(self, name: str) -> NetworkListener:
        """The listener called ``name``; raises :class:`UnknownListenerError` (a KeyError)."""
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise UnknownListenerError(name, tuple(listener.name for listener in self.listeners))

    def effective_proxy_trusted_networks(self, name: str) -> TrustedNetworks:
        """The networks the listener called ``name`` trusts, after its override."""
        return self.listener(name).effective_proxy_trusted_networks(self.system)

    def all_proxy_trusted_networks(self) -> TrustedNetworks:
        """The server-wide list and every listener's override: every proxy this server trusts.

        Auto-ban must exempt all of these; exempting only the server-wide list gets a proxy
        behind a per-listener override banned, and everyone behind it with it (Stalwart #2158).
        """
        overrides = (
            listener.override_proxy_trusted_networks
            for listener in self.listeners
            if listener.override_proxy_trusted_networks is not None
        )
        return self.system.proxy_trusted_networks.union(*overrides)


def __getattr__(name: str) -> Any:
    """Old names that still work for one release, each with a DeprecationWarning.

    ``Protocol`` is now ``ListenerProtocol`` (it collided with ``typing.Protocol``), and the
    limits and defaults moved to :mod:`mailedge.defaults`.
    """
    if name == "Protocol":
        warnings.warn(
            "mailedge.settings.Protocol is now ListenerProtocol", DeprecationWarning, stacklevel=2
        )
        return ListenerProtocol
    if name in defaults.__all__:
        warnings.warn(
            f"mailedge.settings.{name} moved to mailedge.defaults.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(defaults, name)
    raise AttributeError(f"module 'mailedge.settings' has no attribute {name!r}")
