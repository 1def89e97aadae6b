"""A real ``redis-server`` for the store tests, on a unix socket in a temporary directory.

:class:`RedisServer` starts Debian's ``redis-server`` with no TCP port, no persistence and a
socket in its own directory, so tests never clash over ports or files. It can be paused
(SIGSTOP), resumed, killed and started again on the same socket, which is what the outage tests
need. :func:`require_redis` finds the binary or skips with the package to install; with
``MAILEDGE_REQUIRE_INTEROP=1`` (CI) it fails instead, like the interop tests' binaries.

Waiting for the server is bounded and polls the socket (a real external server is the one
place the tests wait on the wall clock).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import attrs
from interop_support import require_binary

__all__ = ["STARTUP_TIMEOUT", "RedisServer", "require_redis"]

# redis-server answers within 10-20 ms of starting; 10 s covers a loaded CI machine.
STARTUP_TIMEOUT = 10.0


def require_redis() -> str:
    """The path of ``redis-server``; skip (or fail, in CI) when the package is missing."""
    return require_binary("redis-server", "redis-server")


@attrs.define
class RedisServer:
    """One ``redis-server`` process on ``directory/redis.sock``."""

    directory: Path
    binary: str = attrs.field(factory=require_redis)
    process: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False)

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self._answers():
                return
            time.sleep(0.01)
        raise RuntimeError(f"redis-server did not answer within {STARTUP_TIMEOUT} s")

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1.0)
                sock.connect(str(self.socket_path))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one command (RESP) and return the raw reply, for set-up behind the store's back."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5.0)
            sock.connect(str(self.socket_path))
            encoded = [arg.encode() for arg in args]
            frame = b"*%d\r\n" % len(encoded) + b"".join(
                b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in encoded
            )
            sock.sendall(frame)
            return sock.recv(65536)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.kill()
        self.process.wait(timeout=STARTUP_TIMEOUT)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
