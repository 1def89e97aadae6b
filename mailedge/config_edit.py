"""Editing the trusted networks in a TOML config file, keeping the user's comments and layout.

:func:`edit_trusted_networks` changes ``SystemSettings.proxyTrustedNetworks`` or one
listener's ``overrideProxyTrustedNetworks`` with tomlkit, which keeps every comment, blank
line and key order it does not touch. The edited text must load exactly as
:func:`mailedge.config.loads_document` loads a file (and pass the caller's own check, such
as "a reload cannot rebind") before anything is written. Then the old file is copied to
``<file>.bak`` and the new text replaces the file atomically: a temporary file in the same
directory, flushed to disk, renamed over it. A reader (a SIGHUP reload, a crash) sees the old
file or the new one, never half of one.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Callable, Collection, Sequence
from typing import Any

import tomlkit
import tomlkit.items

from mailedge.config import ConfigError, Document, loads_document
from mailedge.settings import Settings

__all__ = ["BACKUP_SUFFIX", "EditRefused", "edit_trusted_networks"]

# The copy of the file as it was before the last edit, next to it.
BACKUP_SUFFIX = ".bak"

_SYSTEM = "SystemSettings"
_LISTENERS = "NetworkListener"
_SERVER_WIDE = "proxyTrustedNetworks"
_OVERRIDE = "overrideProxyTrustedNetworks"


class EditRefused(Exception):
    """The edit was not made; the message says why. The file is unchanged."""


def _networks_array(networks: Sequence[str]) -> tomlkit.items.Array:
    array = tomlkit.array()
    array.extend(networks)
    return array


def edit_trusted_networks(
    path: str | os.PathLike[str],
    *,
    listener: str | None,
    networks: Sequence[str] | None,
    extra_sections: Collection[str] = (),
    check: Callable[[Settings], None] | None = None,
) -> Document:
    """Set the server-wide trusted networks (``listener=None``) or one listener's override.

    For a listener, ``networks=None`` removes its override, so it uses the server-wide list;
    ``[]`` turns PROXY off for it. Returns the document the file now holds. Raises
    :class:`EditRefused` when the file cannot be edited (JSON, unwritable), does not load
    after the edit (the config loader's message), or ``check`` raises ``ValueError``.
    """
    file = pathlib.Path(path)
    if file.suffix.lower() != ".toml":
        raise EditRefused(f"{file}: only a TOML file can be edited in place")
    if not os.access(file, os.R_OK | os.W_OK) or not os.access(file.parent, os.W_OK | os.X_OK):
        raise EditRefused(f"{file}: the file or its directory is not writable by this process")
    old = file.read_bytes()
    try:
        document = tomlkit.parse(old.decode("utf-8-sig"))
    except (UnicodeDecodeError, tomlkit.exceptions.ParseError) as exc:
        raise EditRefused(f"{file}: {exc}") from None
    if listener is None:
        if networks is None:
            raise EditRefused("the server-wide list cannot be removed; give [] for none")
        if _SYSTEM not in document:
            document[_SYSTEM] = tomlkit.table()
        document[_SYSTEM][_SERVER_WIDE] = _networks_array(networks)
    else:
        table = _listener_table(document, listener)
        if networks is None:
            table.pop(_OVERRIDE, None)
        else:
            table[_OVERRIDE] = _networks_array(networks)
    text = tomlkit.dumps(document)
    try:
        loaded = loads_document(text, format="toml", extra_sections=extra_sections)
        if check is not None:
            check(loaded.settings)
    except (ConfigError, ValueError) as exc:
        raise EditRefused(str(exc)) from None
    _write_atomically(file.with_name(file.name + BACKUP_SUFFIX), old, like=file)
    _write_atomically(file, text.encode(), like=file)
    return loaded


def _listener_table(document: tomlkit.TOMLDocument, name: str) -> Any:
    for table in document.get(_LISTENERS, []):
        if isinstance(table, dict) and table.get("name") == name:
            return table
    raise EditRefused(f"no [[NetworkListener]] named {name!r} in the file")


def _write_atomically(target: pathlib.Path, data: bytes, *, like: pathlib.Path) -> None:
    """Replace ``target`` with ``data``: temp file, fsync, rename, fsync of the directory.

    The new file gets ``like``'s permission bits, so an edit never widens who can read it.
    """
    mode = like.stat().st_mode & 0o7777
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
