"""Tests for mailedge/cli/_main.py: the ``mailedge`` command and its subcommands."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mailedge.cli import main


def exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else -1


def test_help_lists_the_probe(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status(["--help"]) == 0
    assert "probe" in capsys.readouterr().out


def test_python_m_runs_the_command_without_warnings() -> None:
    completed = subprocess.run(
        [sys.executable, "-W", "error", "-m", "mailedge.cli", "--help"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith(b"usage: mailedge ")
    assert completed.stderr == b""
