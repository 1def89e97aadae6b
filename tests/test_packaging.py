"""The package as a user gets it: a wheel and an sdist, installed into a fresh venv.

Slower than the rest (a build and a pip install, about 15 s here), yet part of the normal
suite: a broken package is found by ``make test``, not by the first user. Dependencies come
from the package index pip is configured with, never from this venv's site-packages.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tarfile
import zipfile

ROOT = pathlib.Path(__file__).parents[1]
# Each step's bound, within the suite's 120 s per test: a build or an install that hangs
# fails the test instead.
STEP_TIMEOUT = 60
# A v1 header, as `mailedge decode` reads it from standard input.
HEADER = b"PROXY TCP4 198.51.100.7 192.0.2.25 40123 25\r\n"


def run(*args: str | pathlib.Path, stdin: bytes = b"") -> str:
    done = subprocess.run(
        [str(a) for a in args], input=stdin, capture_output=True, timeout=STEP_TIMEOUT
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    return done.stdout.decode()


def test_the_wheel_installs_into_a_fresh_venv_and_runs(tmp_path: pathlib.Path) -> None:
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    (wheel,) = dist.glob("mailedge-*.whl")
    (sdist,) = dist.glob("mailedge-*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert any(name.endswith("licenses/LICENSE") for name in names)
    assert "mailedge/__main__.py" in names
    assert "mailedge_examples/mailserver.py" in names
    # The console's page ships with the package: no build step, no CDN.
    for asset in ("index.html", "console.css", "console.js"):
        assert f"mailedge_examples/console/{asset}" in names
    with tarfile.open(sdist) as archive:
        assert any(name.endswith("/LICENSE") for name in archive.getnames())

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python, mailedge = venv / "bin" / "python", venv / "bin" / "mailedge"
    run(python, "-m", "pip", "install", "--quiet", f"{wheel}[server]")

    version = run(mailedge, "--version").strip()
    assert version.startswith("mailedge ") and version.split()[1][0].isdigit()
    assert run(python, "-m", "mailedge", "--version").strip() == version
    decoded = run(mailedge, "decode", "--raw", "-", stdin=HEADER)
    assert "198.51.100.7" in decoded
    # The example server's own dependencies come with the [server] extra.
    run(python, "-c", "import mailedge_examples.mailserver")
