"""The example server as a person runs it: ``python examples/mailserver.py`` in a subprocess."""

from __future__ import annotations

import http.client
import pathlib
import subprocess
import sys
import time

__all__ = ["CLIENT_TIMEOUT", "EXAMPLES", "Script"]

EXAMPLES = pathlib.Path(__file__).parents[2] / "examples"
# Every blocking wait on the script (its start, its log, its exit) has this bound, so a hung
# server fails a test instead of hanging it.
CLIENT_TIMEOUT = 10.0


class Script:
    """``python examples/mailserver.py`` in a subprocess, stopped in ``close``."""

    def __init__(
        self,
        tmp_path: pathlib.Path,
        *args: str,
        cwd: pathlib.Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log = tmp_path / "server.log"
        self._log = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "mailserver.py"), *args],
            cwd=tmp_path if cwd is None else cwd,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        assert self.process.stdout is not None
        self.listeners: dict[str, list[tuple[str, int]]] = {}
        self.announced: list[str] = []
        # The script prints one line per bound address, a "try:" line per listener, then
        # "ready"; the loop is bounded in case it prints something else forever.
        for _ in range(100):
            line = self.process.stdout.readline().decode()
            if not line or line.strip() == "ready":
                break
            self.announced.append(line)
            fields = line.split()
            if len(fields) >= 3 and fields[1] in ("smtp", "imap", "http"):
                host, _, port = fields[2].rpartition(":")
                self.listeners.setdefault(fields[0], []).append((host.strip("[]"), int(port)))
        assert self.listeners, self.log.read_text()

    def address(self, name: str, family: int | None = None) -> tuple[str, int]:
        """The listener's first address, or its first of that IP version."""
        return next(
            (h, p) for h, p in self.listeners[name] if family is None or (":" in h) == (family == 6)
        )

    def wait_for_log(self, text: str, timeout: float = CLIENT_TIMEOUT) -> None:
        """Wait (bounded) until the server's log shows ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.02)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=CLIENT_TIMEOUT)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self._log.close()


def scrape_metrics(
    address: tuple[str, int], source: str = "127.0.0.1", timeout: float = CLIENT_TIMEOUT
) -> str:
    """The text of ``GET /metrics`` at ``address``, asked from ``source`` (a loopback address)."""
    connection = http.client.HTTPConnection(*address, timeout=timeout, source_address=(source, 0))
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        connection.close()
