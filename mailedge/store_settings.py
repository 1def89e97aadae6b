"""``[Store]``: where rate-limit and ban state lives, one process's memory or a shared Redis.

A value like the other settings (:mod:`mailedge.settings` holds it as ``Settings.store``);
:mod:`mailedge.hooks.redis` builds a store from it. docs/scale-out.md says what each choice
means.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from mailedge import defaults
from mailedge.validation import InvalidSettingError, enum_value, of_type, seconds

__all__ = ["StoreBackend", "StoreFailurePolicy", "StoreSettings"]


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


_STORE_SCHEMES = ("redis://", "rediss://", "unix://")


def _check_store_url(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value.startswith(_STORE_SCHEMES):
        raise InvalidSettingError(
            attribute.name,
            f"expected a redis://, rediss:// or unix:// URL, got {value!r}",
        )


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
