"""What the hooks share: where they read the settings, and which proxies they exempt."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from mailedge.networks import TrustedNetworks
from mailedge.settings import Settings

__all__ = ["SettingsSource", "TrustedProxies"]

# The hooks read the settings through this on every call, so a reload reaches them at once.
SettingsSource = Callable[[], Settings]


@attrs.define(repr=False)
class TrustedProxies:
    """``settings.all_proxy_trusted_networks()``, rebuilt only when the settings object changes.

    The union builds a lookup table; per connection that would cost as much as the list is long.
    """

    _settings: Settings | None = None
    _networks: TrustedNetworks = attrs.field(factory=TrustedNetworks)

    def __repr__(self) -> str:
        return f"<TrustedProxies {len(self._networks)} networks>"

    def __call__(self, settings: Settings) -> TrustedNetworks:
        if settings is not self._settings:
            self._settings, self._networks = settings, settings.all_proxy_trusted_networks()
        return self._networks
