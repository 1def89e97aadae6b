"""Shared test configuration."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from redis_support import RedisServer

# "dev" keeps the local loop quick; "ci" is deterministic and a little deeper; "fuzz" is
# what `make fuzz` (and so CI) runs over the codec's properties: ten times "ci".
settings.register_profile("dev", max_examples=200)
settings.register_profile(
    "ci", max_examples=500, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("fuzz", max_examples=5_000, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real ``redis-server`` on a unix socket in the test's temporary directory."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
