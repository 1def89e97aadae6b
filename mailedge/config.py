"""Load :class:`~mailedge.settings.Settings` from a TOML or JSON file, with Stalwart's names.

The file has three optional top-level parts: one ``SystemSettings`` table and an array of
``NetworkListener`` tables, spelled as in Stalwart, and one ``AutoBan`` table::

    [SystemSettings]
    proxyTrustedNetworks = ["127.0.0.0/8", "::1"]

    [[NetworkListener]]
    name = "smtp"
    protocol = "smtp"
    bind = ["127.0.0.1:2525", "[::1]:2525"]
    overrideProxyTrustedNetworks = ["10.0.0.0/8"]

Every mistake raises :class:`ConfigError` naming where it is and what was found, e.g.
``NetworkListener[1].overrideProxyTrustedNetworks[0]: '10.0.0.300/8' is not an IP network``.
Unknown keys are errors (with a "did you mean" when one is close), and types are checked
exactly: ``true`` is not a number, ``4096.0`` is not an integer.

The structurer is hand-written rather than cattrs: the messages above, the per-entry paths
and the suggestions are the point, and a table of keys reads more plainly than hooks. To add
a key, add a row to ``_LISTENER_KEYS`` (or a new ``_Section``) and a field to the settings.
"""

from __future__ import annotations

import datetime
import difflib
import enum
import errno
import json
import os
import pathlib
import re
import tomllib
from collections.abc import Callable, Collection
from ipaddress import IPv6Network
from typing import Any, Literal

import attrs

from mailedge.clients import Nat64Prefixes, parse_nat64_prefix
from mailedge.networks import (
    InvalidNetworkError,
    TrustedNetworks,
    format_endpoint,
    parse_network,
)
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
from mailedge.store_settings import StoreBackend, StoreFailurePolicy, StoreSettings
from mailedge.validation import InvalidSettingError

__all__ = [
    "ConfigError",
    "ConfigFileNotFoundError",
    "Document",
    "listener_changes",
    "load",
    "load_document",
    "loads",
    "loads_document",
    "require_listeners",
    "rebind_problem",
]

Format = Literal["toml", "json"]

# The suffixes load() understands; anything else is refused rather than guessed.
_SUFFIXES: dict[str, Format] = {".toml": "toml", ".json": "json"}


class ConfigError(ValueError):
    """A configuration that cannot be loaded. The message says where, and what was found.

    ``path`` is the place in the configuration ("NetworkListener[1].tls") when the error is
    about one value or table; ``file``, ``line`` and ``column`` are set when known.
    """

    def __init__(
        self,
        detail: str,
        *,
        path: str | None = None,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.detail = detail
        self.path = path
        self.file = file
        self.line = line
        self.column = column
        prefix = ""
        if file is not None:
            prefix += f"{file}: "
        if line is not None:
            prefix += f"line {line}, column {column}: " if column is not None else f"line {line}: "
        if path:
            prefix += f"{path}: "
        super().__init__(prefix + detail)

    def in_file(self, file: str) -> ConfigError:
        """The same error, its message prefixed with ``file``."""
        return ConfigError(
            self.detail, path=self.path, file=file, line=self.line, column=self.column
        )


class ConfigFileNotFoundError(FileNotFoundError):
    """The config file does not exist: a ``FileNotFoundError`` whose message is a sentence."""

    def __init__(self, file: str) -> None:
        super().__init__(errno.ENOENT, "no such config file", file)

    def __str__(self) -> str:
        where = "" if os.path.isabs(self.filename) else f" (relative to {os.getcwd()})"
        return f"{self.filename}: there is no such config file{where}"


@attrs.frozen
class _Syntax:
    """How to name things in messages, so they match the file the user wrote."""

    name: str
    # What the format calls a mapping: TOML has tables, JSON objects.
    table: str
    tables: str


_TOML = _Syntax("TOML", "a table", "tables")
_JSON = _Syntax("JSON", "an object", "objects")

# A reader checks one value's type and turns it into what the settings field takes.
Reader = Callable[[object, str, _Syntax], Any]


def _show(value: object, syntax: _Syntax) -> str:
    """A found value, as the user would recognise it from the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return syntax.table
    if isinstance(value, datetime.datetime):
        return "a date-time"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    return type(value).__name__


def _expected(what: str, value: object, path: str, syntax: _Syntax) -> ConfigError:
    return ConfigError(f"expected {what}, got {_show(value, syntax)}", path=path)


def _read_bool(value: object, path: str, syntax: _Syntax) -> bool:
    if not isinstance(value, bool):
        raise _expected("a boolean", value, path, syntax)
    return value


def _read_string(value: object, path: str, syntax: _Syntax) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value, path, syntax)
    return value


def _read_integer(value: object, path: str, syntax: _Syntax) -> int:
    # bool is a subclass of int in Python, but `true` is not a length.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _expected("an integer", value, path, syntax)
    return value


def _read_seconds(value: object, path: str, syntax: _Syntax) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _expected("a number of seconds", value, path, syntax)
    return value


def _read_choice(choices: type[enum.Enum]) -> Reader:
    """A reader for one of an enum's values, written as the value itself ("smtp")."""

    def read(value: object, path: str, syntax: _Syntax) -> enum.Enum:
        names = ", ".join(repr(choice.value) for choice in choices)
        if not isinstance(value, str) or value not in {choice.value for choice in choices}:
            raise _expected(f"one of {names}", value, path, syntax)
        return choices(value)

    return read


def _read_strings(value: object, path: str, syntax: _Syntax) -> list[str]:
    if isinstance(value, str):
        # The commonest slip: one address where a list belongs. Show the fix in both syntaxes.
        raise ConfigError(
            f"expected an array of strings, got {value!r}; write {json.dumps([value])}",
            path=path,
        )
    if not isinstance(value, list):
        raise _expected("an array of strings", value, path, syntax)
    return [_read_string(item, f"{path}[{index}]", syntax) for index, item in enumerate(value)]


def _read_binds(value: object, path: str, syntax: _Syntax) -> tuple[BindAddress, ...]:
    binds = []
    for index, text in enumerate(_read_strings(value, path, syntax)):
        try:
            binds.append(BindAddress.parse(text))
        except ValueError as error:
            raise ConfigError(str(error), path=f"{path}[{index}]") from None
    return tuple(binds)


def _read_rate(value: object, path: str, syntax: _Syntax) -> RateLimit:
    if not isinstance(value, str):
        raise _expected("a rate such as '60/1m'", value, path, syntax)
    try:
        return RateLimit.parse(value)
    except ValueError as error:
        raise ConfigError(str(error), path=path) from None


def _read_networks(value: object, path: str, syntax: _Syntax) -> TrustedNetworks:
    networks = []
    for index, text in enumerate(_read_strings(value, path, syntax)):
        try:
            networks.append(parse_network(text))
        except InvalidNetworkError as error:
            raise ConfigError(str(error), path=f"{path}[{index}]") from None
    return TrustedNetworks(networks)


def _read_nat64_prefixes(value: object, path: str, syntax: _Syntax) -> Nat64Prefixes:
    prefixes: list[IPv6Network] = []
    for index, text in enumerate(_read_strings(value, path, syntax)):
        try:
            prefix = parse_nat64_prefix(text)
        except ValueError as error:
            raise ConfigError(str(error), path=f"{path}[{index}]") from None
        if prefix in prefixes:
            first = prefixes.index(prefix)
            raise ConfigError(
                f"{text!r} is listed twice (first at [{first}])", path=f"{path}[{index}]"
            )
        prefixes.append(prefix)
    return tuple(prefixes)


@attrs.frozen
class _Key:
    """One key of a table: its name in the file, the field it fills, and how to read it."""

    name: str
    field: str
    read: Reader
    required: bool = False


@attrs.frozen
class _Section:
    """One top-level part of the file, and the Settings field it becomes."""

    name: str
    field: str
    build: Callable[..., Any]
    keys: tuple[_Key, ...]
    # An array of tables ([[NetworkListener]]) rather than a single table ([SystemSettings]).
    many: bool = False
    # A key whose value must differ between the tables of a `many` section, and what one
    # table is called in the message about a repeat ("duplicate listener name 'smtp'").
    unique: str | None = None
    noun: str = ""


_SYSTEM_KEYS = (
    _Key("proxyTrustedNetworks", "proxy_trusted_networks", _read_networks),
    _Key("nat64Prefixes", "nat64_prefixes", _read_nat64_prefixes),
)

_LISTENER_KEYS = (
    _Key("name", "name", _read_string, required=True),
    _Key("protocol", "protocol", _read_choice(ListenerProtocol), required=True),
    _Key("bind", "bind", _read_binds, required=True),
    _Key("tls", "tls", _read_bool),
    _Key("overrideProxyTrustedNetworks", "override_proxy_trusted_networks", _read_networks),
    _Key("proxyHeaderTimeout", "proxy_header_timeout", _read_seconds),
    _Key("proxyMaxHeaderLength", "proxy_max_header_length", _read_integer),
    _Key("proxyHeaderMode", "proxy_header_mode", _read_choice(HeaderMode)),
    _Key("proxyOptionalWait", "proxy_optional_wait", _read_seconds),
    _Key("proxyV1ImpliesTls", "proxy_v1_implies_tls", _read_bool),
    _Key("proxyAllowV1MixedFamily", "proxy_allow_v1_mixed_family", _read_bool),
    _Key("maxConnections", "max_connections", _read_integer),
    _Key("maxConnectionsPerIp", "max_connections_per_ip", _read_integer),
    _Key("idleTimeout", "idle_timeout", _read_seconds),
    _Key("tlsHandshakeTimeout", "tls_handshake_timeout", _read_seconds),
    _Key("rateLimitConnections", "rate_limit_connections", _read_rate),
    _Key("rateLimitMessages", "rate_limit_messages", _read_rate),
    _Key("rateLimitIpv6Prefix", "rate_limit_ipv6_prefix", _read_integer),
)

_AUTO_BAN_KEYS = (
    _Key("enable", "enable", _read_bool),
    _Key("failures", "failures", _read_integer),
    _Key("window", "window", _read_seconds),
    _Key("duration", "duration", _read_seconds),
    _Key("ipv6Prefix", "ipv6_prefix", _read_integer),
)

_SECTIONS: tuple[_Section, ...] = (
    _Section("SystemSettings", "system", SystemSettings, _SYSTEM_KEYS),
    _Section(
        "NetworkListener",
        "listeners",
        NetworkListener,
        _LISTENER_KEYS,
        many=True,
        unique="name",
        noun="listener",
    ),
    _Section("AutoBan", "auto_ban", AutoBanSettings, _AUTO_BAN_KEYS),
)

# [Store]: where limits and bans live (docs/scale-out.md). Its own block, appended to the
# sections, so that the store's keys stay apart from the listeners' and the ban policy's.
_STORE_KEYS = (
    _Key("backend", "backend", _read_choice(StoreBackend)),
    _Key("url", "url", _read_string),
    _Key("keyPrefix", "key_prefix", _read_string),
    _Key("timeout", "timeout", _read_seconds),
    _Key("onFailure", "on_failure", _read_choice(StoreFailurePolicy)),
    _Key("resyncPeriod", "resync_period", _read_seconds),
)

_SECTIONS = (*_SECTIONS, _Section("Store", "store", StoreSettings, _STORE_KEYS))


def _fold(key: str) -> str:
    """A key reduced for comparison: "override_proxy_trusted_networks" ~ "overrideProxy..."."""
    return key.replace("_", "").replace("-", "").lower()


def _unknown_key(key: str, known: list[str], path: str) -> ConfigError:
    folded = {_fold(name): name for name in known}
    close = difflib.get_close_matches(_fold(key), folded, n=1)
    hint = f" (did you mean {folded[close[0]]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r}{hint}", path=path or None)


class _JSONObject(dict[str, Any]):
    """A JSON object that remembers keys it saw twice (json.loads keeps the last silently)."""

    duplicates: list[str]


def _json_object(pairs: list[tuple[str, Any]]) -> _JSONObject:
    obj = _JSONObject()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _table(value: object, path: str, known: list[str], syntax: _Syntax) -> dict[str, Any]:
    """Check that ``value`` is a table holding only ``known`` keys, each at most once."""
    if not isinstance(value, dict):
        if not path:
            raise ConfigError(f"the document must be {syntax.table}, got {_show(value, syntax)}")
        raise _expected(syntax.table, value, path, syntax)
    duplicates: list[str] = getattr(value, "duplicates", [])
    if duplicates:
        raise ConfigError(f"duplicate key {duplicates[0]!r}", path=path or None)
    for key in value:
        if key not in known:
            raise _unknown_key(key, known, path)
    return value


def _build(
    build: Callable[..., Any], keys: tuple[_Key, ...], value: object, path: str, syntax: _Syntax
) -> Any:
    """Read one table through its key table and build the settings value from it."""
    table = _table(value, path, [key.name for key in keys], syntax)
    by_name = {key.name: key for key in keys}
    kwargs = {
        by_name[name].field: by_name[name].read(item, f"{path}.{name}", syntax)
        for name, item in table.items()
    }
    for key in keys:
        if key.required and key.name not in table:
            raise ConfigError(f"missing required key {key.name!r}", path=path)
    try:
        return build(**kwargs)
    except InvalidSettingError as error:
        names = {key.field: key.name for key in keys}
        where = f"{path}.{names[error.field]}" if error.field in names else path
        raise ConfigError(error.detail, path=where) from None


def _build_section(section: _Section, value: object, syntax: _Syntax) -> Any:
    if not section.many:
        return _build(section.build, section.keys, value, section.name, syntax)
    if not isinstance(value, list):
        hint = f" (write [[{section.name}]] for each one)" if syntax is _TOML else ""
        raise ConfigError(
            f"expected an array of {syntax.tables}, got {_show(value, syntax)}{hint}",
            path=section.name,
        )
    built = []
    first: dict[object, int] = {}
    for index, item in enumerate(value):
        path = f"{section.name}[{index}]"
        built.append(_build(section.build, section.keys, item, path, syntax))
        if section.unique is None:
            continue
        field = next(key.field for key in section.keys if key.name == section.unique)
        seen = getattr(built[-1], field)
        if seen in first:
            raise ConfigError(
                f"duplicate {section.noun} {section.unique} {seen!r} "
                f"(already used by {section.name}[{first[seen]}])",
                path=f"{path}.{section.unique}",
            )
        first[seen] = index
    return tuple(built)


def _parse(text: str, syntax: _Syntax) -> object:
    if syntax is _JSON:
        try:
            return json.loads(text, object_pairs_hook=_json_object)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"invalid JSON: {error.msg}", line=error.lineno, column=error.colno
            ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise _toml_error(error, text) from None


# tomllib before 3.14 puts the position only in the message: "... (at line 3, column 5)".
_TOML_POSITION = re.compile(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)", re.S)


def _toml_error(error: tomllib.TOMLDecodeError, text: str) -> ConfigError:
    message = str(error)
    line: int | None = getattr(error, "lineno", None)
    column: int | None = getattr(error, "colno", None)
    match = _TOML_POSITION.fullmatch(message)
    if match:
        message = match[1]
        if match[2] is not None:
            line, column = int(match[2]), int(match[3])
    if line is None:
        # "At end of document": the last line is where the reader gave up.
        line = text.count("\n") + 1
    return ConfigError(f"invalid TOML: {message}", line=line, column=column)


@attrs.frozen
class Document:
    """A loaded file: mailedge's settings, plus the extra tables the application asked for."""

    settings: Settings
    # Each requested extra section that the file has, raw (e.g. an example server's own table).
    extra: dict[str, dict[str, Any]] = attrs.field(factory=dict, repr=False)


def _loads(text: str, syntax: _Syntax, extra_sections: Collection[str] = ()) -> Document:
    document = _parse(text, syntax)
    known = [section.name for section in _SECTIONS] + list(extra_sections)
    table = _table(document, "", known, syntax)
    kwargs = {
        section.field: _build_section(section, table[section.name], syntax)
        for section in _SECTIONS
        if section.name in table
    }
    extra = {}
    for name in extra_sections:
        if name in table:
            if not isinstance(table[name], dict):
                raise _expected(syntax.table, table[name], name, syntax)
            extra[name] = dict(table[name])
    try:
        return Document(Settings(**kwargs), extra)
    except InvalidSettingError as error:
        names = {section.field: section.name for section in _SECTIONS}
        raise ConfigError(error.detail, path=names.get(error.field)) from None


def loads_document(text: str, *, format: Format, extra_sections: Collection[str] = ()) -> Document:
    """Like :func:`loads`, also returning the ``extra_sections`` tables the text has."""
    if format == "toml":
        return _loads(text, _TOML, extra_sections)
    if format == "json":
        return _loads(text, _JSON, extra_sections)
    raise ValueError(f"format must be 'toml' or 'json', got {format!r}")


def loads(text: str, *, format: Format) -> Settings:
    """Load settings from TOML or JSON text. Raises :class:`ConfigError`."""
    return loads_document(text, format=format).settings


def load(path: str | os.PathLike[str]) -> Settings:
    """Load settings from a ``.toml`` or ``.json`` file. Raises :class:`ConfigError`.

    Messages start with the file's path: ``mailedge.toml: NetworkListener[0].tls: ...``.
    A file that cannot be read raises the usual ``OSError``; a missing one
    :class:`ConfigFileNotFoundError`, whose message names the path in a sentence.
    """
    return load_document(path).settings


def load_document(
    path: str | os.PathLike[str], *, extra_sections: Collection[str] = ()
) -> Document:
    """Like :func:`load`, also returning the ``extra_sections`` tables the file has.

    An application keeps its own settings in the same file this way, and unknown sections
    are still errors.
    """
    file = os.fspath(path)
    suffix = pathlib.PurePath(file).suffix
    format = _SUFFIXES.get(suffix.lower())
    if format is None:
        found = f"the suffix {suffix!r}" if suffix else "no suffix"
        raise ConfigError(f"name the file *.toml or *.json; it has {found}", file=file)
    try:
        data = pathlib.Path(file).read_bytes()
    except FileNotFoundError:
        raise ConfigFileNotFoundError(file) from None
    try:
        # A byte-order mark, which some Windows editors add, is skipped.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"not valid UTF-8 (at byte {error.start})", file=file) from None
    try:
        return loads_document(text, format=format, extra_sections=extra_sections)
    except ConfigError as error:
        raise error.in_file(file) from None


def require_listeners(settings: Settings, file: str | None = None) -> None:
    """Refuse settings without a listener: a server made from them would accept nothing."""
    if not settings.listeners:
        raise ConfigError(
            "there are no [[NetworkListener]] tables, so a server would listen nowhere; add "
            'one, such as: [[NetworkListener]] name = "smtp", protocol = "smtp", '
            'bind = ["127.0.0.1:2525"]',
            file=file,
        )


def rebind_problem(old: Settings, new: Settings) -> str | None:
    """Why ``new`` cannot replace ``old`` on a reload, naming the listener; None if it can.

    A reload keeps the bound sockets, so it cannot add, remove or rebind a listener.
    """
    before = {conf.name: conf.bind for conf in old.listeners}
    after = {conf.name: conf.bind for conf in new.listeners}
    for name in after.keys() - before.keys():
        return f"listener {name!r} is new"
    for name in before.keys() - after.keys():
        return f"listener {name!r} is gone"
    for name, bind in after.items():
        if bind != before[name]:
            return f"listener {name!r} binds {_binds(bind)} instead of {_binds(before[name])}"
    return None


def listener_changes(old: Settings, new: Settings) -> list[str]:
    """What a reload changes, one line per listener whose effective trust changed."""
    lines = []
    for conf in new.listeners:
        previous = next((c for c in old.listeners if c.name == conf.name), None)
        if previous is None:
            continue
        was = previous.effective_proxy_trusted_networks(old.system)
        now = conf.effective_proxy_trusted_networks(new.system)
        if was != now:
            lines.append(
                f"listener {conf.name}: trusted networks {_networks(was)} -> {_networks(now)}"
            )
        if previous != conf and was == now:
            lines.append(f"listener {conf.name}: settings changed, trusted networks unchanged")
    return lines


def _networks(networks: TrustedNetworks) -> str:
    return "[" + ", ".join(map(str, networks)) + "]"


def _binds(binds: tuple[BindAddress, ...]) -> str:
    return ", ".join(format_endpoint(str(bind.host), bind.port) for bind in binds)
