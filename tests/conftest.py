"""Shared test configuration."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# "dev" keeps the local loop quick; "ci" is deterministic and a little deeper; "fuzz" is
# what `make fuzz` (and so CI) runs over the codec's properties: ten times "ci".
settings.register_profile("dev", max_examples=200)
settings.register_profile(
    "ci", max_examples=500, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("fuzz", max_examples=5_000, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
