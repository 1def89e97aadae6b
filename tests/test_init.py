"""The package's public API: everything in __all__ exists, and the codec stays sans-IO."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import mailedge
import mailedge.policy
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


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("mailedge", "Protocol", "ListenerProtocol"),
        ("mailedge", "ProxyHeaderRejected", "UntrustedHeaderError"),
        ("mailedge.settings", "Protocol", "ListenerProtocol"),
        ("mailedge.gate", "ProxyHeaderRejected", "UntrustedHeaderError"),
    ],
)
def test_old_names_work_for_one_release_and_warn(module: str, old: str, new: str) -> None:
    namespace = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{old} is now .*{new}"):
        value = getattr(namespace, old)
    assert value is getattr(namespace, new)
    assert old not in getattr(namespace, "__all__", ())


def test_the_hook_interface_keeps_its_old_module_for_one_release() -> None:
    sys.modules.pop("mailedge.hooks.base", None)
    with pytest.warns(DeprecationWarning, match="moved to mailedge.policy"):
        base = importlib.import_module("mailedge.hooks.base")
    assert base.HookChain is mailedge.policy.HookChain
