"""How a setting's value is checked and converted: the one error, and the shared checks.

Every settings value validates itself when built (:mod:`mailedge.settings`) and raises
:class:`InvalidSettingError`, a ``ValueError`` naming the field; :mod:`mailedge.config` maps
the field back to the key of the configuration file. The attrs validators and converters here
are the ones several settings share.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

__all__ = [
    "InvalidSettingError",
    "Validator",
    "count",
    "enum_value",
    "expect_int",
    "number",
    "of_type",
    "parsed",
    "seconds",
]


class InvalidSettingError(ValueError):
    """A setting with a wrong type or an out-of-range value. The message names the field."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        # The attribute's name ("proxy_header_timeout"); mailedge.config maps it to its key.
        self.field = field
        # The message without the field, e.g. "must be more than 0 ..., got 0".
        self.detail = detail


Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def of_type(kind: str, *types: type) -> Validator:
    """An attrs validator: ``value`` is one of ``types`` (and a bool only if bool is listed)."""

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise InvalidSettingError(attribute.name, f"expected {kind}, got {value!r}")

    return check


def expect_int(attribute: attrs.Attribute[Any], value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSettingError(attribute.name, f"expected an integer, got {value!r}")
    return value


def number(value: float) -> str:
    """A limit as a person writes it: 2592000, not 2.592e+06; 0.25 as is."""
    return str(int(value)) if value == int(value) else f"{value:g}"


def seconds(maximum: float) -> Validator:
    """An attrs validator: a number of seconds, more than 0 and at most ``maximum``."""

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidSettingError(
                attribute.name, f"expected a number of seconds, got {value!r}"
            )
        # Written so that NaN, which compares false with everything, fails too.
        if not 0 < value <= maximum:
            raise InvalidSettingError(
                attribute.name,
                f"must be more than 0 and at most {number(maximum)} seconds, got {value!r}",
            )

    return check


def count(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if expect_int(attribute, value) < 1:
        raise InvalidSettingError(attribute.name, f"must be at least 1, got {value!r}")


_E = TypeVar("_E", bound=enum.Enum)
_S = TypeVar("_S")
_T = TypeVar("_T")


def parsed(field: str, parse: Callable[[_S], _T], value: _S) -> _T:
    try:
        return parse(value)
    except ValueError as error:
        raise InvalidSettingError(field, str(error)) from None


def enum_value(kind: type[_E], field: str, value: _E | str) -> _E:
    if isinstance(value, kind) or not isinstance(value, str):
        return value
    try:
        return kind(value)
    except ValueError:
        raise InvalidSettingError(field, f"expected a {kind.__name__}, got {value!r}") from None
