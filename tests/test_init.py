"""The package's public API: everything in __all__ exists, and the codec stays sans-IO."""

from __future__ import annotations

import subprocess
import sys

import mailedge
import mailedge.proxy


def test_every_public_name_exists() -> None:
    for module in (mailedge, mailedge.proxy):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert missing == [], module.__name__
        assert len(set(module.__all__)) == len(module.__all__)


def test_the_codec_imports_neither_trio_nor_socket() -> None:
    code = (
        "import sys, mailedge.proxy\n"
        "print(sorted(m for m in ('trio', 'socket') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_lazy_exports_match_all() -> None:
    assert sorted(mailedge._EXPORTS) == sorted(mailedge.__all__)
    assert mailedge.ProxyGate.__module__ == "mailedge.gate"
