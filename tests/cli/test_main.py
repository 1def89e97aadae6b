"""Tests for mailedge/cli/_main.py: the ``mailedge`` command and its subcommands."""

from __future__ import annotations

import os
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


def test_version_and_python_m_mailedge() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mailedge", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("mailedge ") and done.stdout.split()[1][0].isdigit()


def test_a_reader_that_went_away_is_not_a_traceback() -> None:
    """``mailedge decode ... | head``: the pipe is closed before decode writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mailedge", "decode", "--raw", "-"],
            input=b"PROXY TCP4 198.51.100.7 192.0.2.25 40123 25\r\n",
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.stderr.decode() == ""
    assert done.returncode == 141
