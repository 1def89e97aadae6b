"""``mailedge check FILE``, run as a person runs it: the real command in a subprocess."""

from __future__ import annotations

import pathlib
import subprocess
import sys

CONFIG = """\
[SystemSettings]
proxyTrustedNetworks = ["10.0.0.0/8"]

[[NetworkListener]]
name = "smtp"
protocol = "smtp"
bind = ["0.0.0.0:25", "[::]:25"]

[[NetworkListener]]
name = "submission"
protocol = "smtp"
bind = ["127.0.0.1:587"]
overrideProxyTrustedNetworks = ["192.168.0.0/16"]
proxyHeaderMode = "optional"

[[NetworkListener]]
name = "imap"
protocol = "imap"
bind = ["127.0.0.1:143"]
overrideProxyTrustedNetworks = []
idleTimeout = 600
"""


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailedge", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_shows_what_is_in_effect_per_listener(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mailedge.toml"
    path.write_text(CONFIG)
    done = check(str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{path}: valid",
        "listener smtp (smtp) on 0.0.0.0:25, [::]:25",
        "  PROXY: on",
        "  trusted networks: [10.0.0.0/8] from server-wide (SystemSettings.proxyTrustedNetworks)",
        "  header mode: required",
        "  timeouts: proxyHeaderTimeout 5 s, idleTimeout 300 s, tlsHandshakeTimeout 10 s",
        "listener submission (smtp) on 127.0.0.1:587",
        "  PROXY: on",
        "  trusted networks: [192.168.0.0/16] from override (overrideProxyTrustedNetworks)",
        "  header mode: optional",
        "  timeouts: proxyHeaderTimeout 5 s, idleTimeout 300 s, tlsHandshakeTimeout 10 s",
        "listener imap (imap) on 127.0.0.1:143",
        "  PROXY: off",
        "  trusted networks: [] from override [] (overrideProxyTrustedNetworks = []: PROXY off)",
        "  header mode: required",
        "  timeouts: proxyHeaderTimeout 5 s, idleTimeout 600 s, tlsHandshakeTimeout 10 s",
    ]


def test_check_fails_on_any_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mailedge.toml"
    path.write_text(CONFIG.replace('"10.0.0.0/8"', '"10.0.0.300/8"'))
    done = check(str(path))
    assert done.returncode == 1
    assert "10.0.0.300/8" in done.stderr and str(path) in done.stderr
    assert done.stdout == ""


def test_check_refuses_a_file_without_listeners(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mailedge.toml"
    path.write_text('[SystemSettings]\nproxyTrustedNetworks = ["10.0.0.0/8"]\n')
    done = check(str(path))
    assert done.returncode == 1
    assert "no [[NetworkListener]] tables" in done.stderr


def test_check_names_a_missing_file_in_a_sentence(tmp_path: pathlib.Path) -> None:
    done = check(str(tmp_path / "missing.toml"))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"mailedge check: {tmp_path / 'missing.toml'}: there is no such config file"
    )


def test_check_allows_an_application_section(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mailedge.toml"
    path.write_text(CONFIG + '\n[Example]\nhostname = "mx.test"\n')
    assert check(str(path)).returncode == 1
    assert check(str(path), "--allow-section", "Example").returncode == 0
