"""docs/embedding.md's ten-line server, run exactly as the page writes it."""

from __future__ import annotations

import ipaddress
import pathlib
import re
import socket
import subprocess
import sys

from mailedge.proxy import InetAddress, encode_v1

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "embedding.md"
# Generous for a subprocess starting on a loaded 2-core machine; the per-test timeout backs it.
TIMEOUT = 30.0
# The server's start-up line stands within the first few lines of its log.
MAX_LOG_LINES = 20
# Runs the page's block as written, with the server's INFO lines on stderr so the test knows
# when it listens (the block itself logs nothing).
RUNNER = "import logging, sys; logging.basicConfig(level=logging.INFO); exec(sys.stdin.read())"


def page_snippet() -> str:
    blocks = [
        block
        for block in re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
        if "trio.run(" in block
    ]
    assert len(blocks) == 1, "docs/embedding.md should show one whole server"
    return str(blocks[0])


def free_port() -> int:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port: int = spare.getsockname()[1]
        return port


def test_the_snippet_is_about_ten_lines_of_code() -> None:
    assert len([line for line in page_snippet().splitlines() if line.strip()]) <= 11


def test_the_page_snippet_serves_a_proxied_client() -> None:
    snippet = page_snippet()
    assert "127.0.0.1:2526" in snippet
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", RUNNER],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdin is not None and process.stderr is not None
        process.stdin.write(snippet.replace("127.0.0.1:2526", f"127.0.0.1:{port}"))
        process.stdin.close()
        seen = []
        for _ in range(MAX_LOG_LINES):
            seen.append(process.stderr.readline())
            if f"listener smtp on 127.0.0.1:{port}" in seen[-1] or not seen[-1]:
                break
        assert f"listener smtp on 127.0.0.1:{port}" in seen[-1], seen
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as connection:
            client = InetAddress(ipaddress.ip_address("198.51.100.7"), 40000)
            server = InetAddress(ipaddress.ip_address("127.0.0.1"), port)
            connection.sendall(encode_v1(client, server))
            with connection.makefile("rb") as replies:
                reply = replies.readline()
        assert reply == b"220 you are 198.51.100.7\r\n"
    finally:
        process.kill()
        process.wait(timeout=TIMEOUT)
        if process.stderr is not None:
            process.stderr.close()
