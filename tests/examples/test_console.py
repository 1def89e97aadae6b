"""The console in a real browser: Debian's headless Chromium, driven through chromedriver.

A real example server runs in a subprocess with a config file in ``tmp_path``; real
connections arrive while the page is open, and each decision must show within a second
with the gate's diagnosis. Skipped (naming the packages) without chromium and
chromium-driver, unless ``MAILEDGE_REQUIRE_INTEROP=1``.
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import shutil
import socket
import time
from collections.abc import Iterator

import pytest
from interop_support import missing
from mailserver_support import CLIENT_TIMEOUT, Script

from mailedge.proxy import InetAddress, encode_v1

pytest.importorskip("selenium", reason="selenium is a dev extra: pip install -e '.[dev]'")

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PACKAGES = (
    "the Debian packages chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
)
# "Each decision appears within a second."
APPEARS_WITHIN = 1.0
# The smtp-proxy listener's header timeout: the silent peer's decision comes this late.
HEADER_TIMEOUT = 1.0
# Where to also save the screenshot (docs/images/ when regenerating the docs' picture).
SCREENSHOT_DIR_ENV = "MAILEDGE_SCREENSHOT_DIR"


CONFIG = """\
# The console test's server. This comment must survive the page's edit.
[SystemSettings]
proxyTrustedNetworks = ["127.0.0.0/8"]  # the local proxy

[[NetworkListener]]
name = "http"
protocol = "http"
bind = ["127.0.0.1:0"]
overrideProxyTrustedNetworks = []

[[NetworkListener]]
name = "smtp"
protocol = "smtp"
bind = ["127.0.0.1:0", "[::1]:0"]
overrideProxyTrustedNetworks = []

[[NetworkListener]]
name = "smtp-proxy"
protocol = "smtp"
bind = ["127.0.0.1:0"]
proxyHeaderTimeout = {timeout}

[AutoBan]
failures = 1

[Example]
stateDir = "{state}"
"""


@pytest.fixture
def config(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "mailedge.toml"
    path.write_text(CONFIG.format(timeout=HEADER_TIMEOUT, state=tmp_path))
    return path


@pytest.fixture
def server(tmp_path: pathlib.Path, config: pathlib.Path) -> Iterator[Script]:
    running = Script(tmp_path, "--config", str(config))
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def browser(tmp_path: pathlib.Path) -> Iterator[WebDriver]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        missing(f"{CHROMIUM} or {CHROMEDRIVER} is not installed: install {PACKAGES}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1500,1100",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def exchange(address: tuple[str, int], data: bytes, *, source: str | None = None) -> bytes:
    """Connect, read the greeting if one comes first, send ``data``, read what follows."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(CLIENT_TIMEOUT)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(address)
        sock.sendall(data)
        received = b""
        try:
            # Until the server closes or has answered the command; bounded by the timeout.
            for _ in range(20):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
                if received.count(b"\r\n") >= 2 or received.startswith(b"421"):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return received


def proxy_header(client: str = "203.0.113.7") -> bytes:
    import ipaddress

    return encode_v1(
        InetAddress(ipaddress.ip_address(client), 40000),
        InetAddress(ipaddress.ip_address("192.0.2.25"), 25),
    )


def decision_row(driver: WebDriver, event: str, within: float, **match: str) -> WebElement:
    """The first decision row for ``event`` whose cells contain ``match``'s texts."""

    def find(d: WebDriver) -> WebElement | bool:
        for row in d.find_elements(By.CSS_SELECTOR, f'#decisions tbody tr[data-event="{event}"]'):
            text = row.text
            if all(value in text for value in match.values()):
                return row
        return False

    try:
        found = WebDriverWait(driver, within, poll_frequency=0.05).until(find)
    except TimeoutException:
        rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#decisions tbody tr")]
        pytest.fail(f"no {event} row with {match} within {within} s; rows: {rows}")
    assert isinstance(found, WebElement)
    return found


def open_console(driver: WebDriver, server: Script) -> str:
    host, port = server.address("http")
    url = f"http://{host}:{port}/admin/"
    driver.get(url)
    WebDriverWait(driver, CLIENT_TIMEOUT).until(
        lambda d: d.find_element(By.ID, "stream").text == "live"
    )
    return url


def test_decisions_appear_live_with_their_diagnosis(
    server: Script, browser: WebDriver, tmp_path: pathlib.Path
) -> None:
    proxy = server.address("smtp-proxy")
    direct = server.address("smtp")
    # A decision from before the page opened comes with the stream's backlog, listed once.
    exchange(proxy, proxy_header("203.0.113.9") + b"QUIT\r\n")
    open_console(browser, server)
    decision_row(browser, "proxy.accepted", APPEARS_WITHIN, client="203.0.113.9:40000")
    rows = browser.find_elements(By.CSS_SELECTOR, "#decisions tbody tr")
    assert sum("203.0.113.9:40000" in r.text for r in rows) == 1
    ids = [r.get_attribute("data-id") for r in rows]
    assert all(ids) and len(set(ids)) == len(ids)

    # A good header from the trusted local proxy: the client is the header's.
    assert exchange(proxy, proxy_header() + b"QUIT\r\n").startswith(b"220")
    row = decision_row(browser, "proxy.accepted", APPEARS_WITHIN, client="203.0.113.7:40000")
    assert "smtp-proxy" in row.text

    # A header on a listener with PROXY off: refused, and the page says what to add.
    exchange(direct, proxy_header())
    row = decision_row(browser, "proxy.untrusted_header", APPEARS_WITHIN, listener="smtp")
    assert "the PROXY protocol is off on this listener" in row.text
    assert "list '127.0.0.1' in the listener's overrideProxyTrustedNetworks" in row.text

    # A TLS ClientHello where the header was due: the proxy is not sending headers.
    exchange(proxy, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32))
    row = decision_row(browser, "proxy.rejected", APPEARS_WITHIN, peer="127.0.0.1")
    assert "a TLS ClientHello arrived where a PROXY header was expected" in row.text

    # A silent peer: its decision comes when the header timeout ends.
    with socket.create_connection(proxy, timeout=CLIENT_TIMEOUT) as silent:
        started = time.monotonic()
        row = decision_row(browser, "proxy.timeout", HEADER_TIMEOUT + APPEARS_WITHIN)
        assert time.monotonic() - started >= HEADER_TIMEOUT - 0.2
        assert silent.recv(1) == b""  # closed without a byte sent
    assert "smtp-proxy" in row.text

    # The filters hide the rest.
    Select(browser.find_element(By.ID, "filter-event")).select_by_visible_text("proxy.timeout")
    shown = [
        r for r in browser.find_elements(By.CSS_SELECTOR, "#decisions tbody tr") if r.is_displayed()
    ]
    assert shown and all(r.get_attribute("data-event") == "proxy.timeout" for r in shown)
    Select(browser.find_element(By.ID, "filter-event")).select_by_visible_text("all")

    # The listeners table: where each listener's trusted networks come from, and the counts.
    table = browser.find_element(By.ID, "listeners").text
    assert "127.0.0.0/8 server-wide" in table
    assert "[] [] (PROXY off)" in table
    screenshot(browser, tmp_path)


def screenshot(driver: WebDriver, tmp_path: pathlib.Path) -> None:
    """Save the page as it is now; also under $MAILEDGE_SCREENSHOT_DIR when set (the docs)."""
    path = tmp_path / "console.png"
    assert driver.save_screenshot(str(path))
    target = os.environ.get(SCREENSHOT_DIR_ENV)
    if target:
        shutil.copyfile(path, pathlib.Path(target) / "console.png")


def read_events(response: http.client.HTTPResponse, count: int) -> list[dict[str, str]]:
    """The next ``count`` server-sent events' fields (comments skipped), read line by line."""
    events: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    # Bounded: each event is a few lines, comments and heartbeats a line each.
    for _ in range(count * 10 + 10):
        line = response.readline().decode()
        assert line, f"the stream ended after {events}"
        if line == "\n":
            if fields:
                events.append(fields)
                fields = {}
            if len(events) == count:
                return events
        elif not line.startswith(":"):
            name, _, value = line.rstrip("\n").partition(": ")
            fields[name] = value
    pytest.fail(f"no {count} events; got {events}")


def data(event: dict[str, str]) -> dict[str, str]:
    value = json.loads(event["data"])
    assert isinstance(value, dict)
    return value


def open_events(server: Script, *headers: tuple[str, str]) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection(*server.address("http"), timeout=CLIENT_TIMEOUT)
    connection.request("GET", "/admin/events", headers=dict(headers))
    return connection


def test_the_event_stream_starts_with_the_backlog_and_a_reconnect_loses_nothing(
    server: Script,
) -> None:
    # Over a real socket, as the page's EventSource does: the stream alone carries the recent
    # decisions and then the new ones, and a reconnect resumes from Last-Event-ID.
    proxy = server.address("smtp-proxy")
    direct = server.address("smtp")
    exchange(proxy, proxy_header("203.0.113.1") + b"QUIT\r\n")
    exchange(direct, proxy_header())
    connection = open_events(server)
    try:
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream"
        backlog = read_events(response, 4)
        assert [e["event"] for e in backlog] == ["backlog"] * 4
        # The direct listener serves the peer directly, then refuses its PROXY header; the
        # last is this very connection to the http listener.
        assert [(d["listener"], d["event"]) for d in map(data, backlog)] == [
            ("smtp-proxy", "proxy.accepted"),
            ("smtp", "proxy.direct"),
            ("smtp", "proxy.untrusted_header"),
            ("http", "proxy.direct"),
        ]
        epoch, _, first = backlog[0]["id"].rpartition("-")
        assert [e["id"] for e in backlog] == [f"{epoch}-{int(first) + n}" for n in range(4)]
        exchange(proxy, proxy_header("203.0.113.2") + b"QUIT\r\n")
        [live] = read_events(response, 1)
        assert "event" not in live
        assert data(live)["client"] == "203.0.113.2:40000"
    finally:
        connection.close()
    # The page is gone for a moment; a decision made meanwhile comes first when it is back.
    exchange(proxy, proxy_header("203.0.113.3") + b"QUIT\r\n")
    connection = open_events(server, ("Last-Event-ID", live["id"]))
    try:
        response = connection.getresponse()
        # What it missed, then (as before) this connection's own decision; nothing twice.
        missed = read_events(response, 2)
        assert all("event" not in e for e in missed)
        assert [(d["listener"], d["client"]) for d in map(data, missed)] == [
            ("smtp-proxy", "203.0.113.3:40000"),
            ("http", data(missed[1])["peer"]),
        ]
        after = int(live["id"].rpartition("-")[2])
        assert [e["id"] for e in missed] == [f"{epoch}-{after + 1}", f"{epoch}-{after + 2}"]
    finally:
        connection.close()


def test_lifting_a_ban_from_the_page_lets_the_client_back_in(
    server: Script, browser: WebDriver
) -> None:
    url = open_console(browser, server)
    direct6 = server.address("smtp", family=6)
    # ::1 is not a trusted proxy: one untrusted header bans its /64 ([AutoBan] failures = 1).
    exchange(direct6, proxy_header())
    decision_row(browser, "proxy.untrusted_header", APPEARS_WITHIN, peer="[::1]")
    assert exchange(direct6, b"QUIT\r\n").startswith(b"421")
    row = WebDriverWait(browser, 5.0).until(
        lambda d: d.find_element(By.CSS_SELECTOR, '#bans tbody tr[data-key="::/64"]')
    )

    # A page on another origin cannot lift it: its POST carries that origin (and no token).
    host, port = server.address("http")
    browser.get(f"http://localhost:{port}/healthz")
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('http://{host}:{port}/admin/bans/lift?ip=::/64',"
        " {method: 'POST', mode: 'no-cors'})"
        ".then(() => done('sent'), (e) => done(String(e)));"
    )
    assert status == "sent"
    assert exchange(direct6, b"QUIT\r\n").startswith(b"421")
    assert "admin request refused: origin 'http://localhost:" in server.log.read_text()

    browser.get(url)
    row = WebDriverWait(browser, 5.0).until(
        lambda d: d.find_element(By.CSS_SELECTOR, '#bans tbody tr[data-key="::/64"]')
    )
    row.find_element(By.CSS_SELECTOR, "button.lift").click()
    WebDriverWait(browser, 5.0).until(
        lambda d: d.find_element(By.ID, "bans-message").text == "lifted ::/64"
    )
    assert exchange(direct6, b"QUIT\r\n").startswith(b"220")


def test_editing_trusted_networks_changes_the_next_decision_and_the_file(
    server: Script, browser: WebDriver, config: pathlib.Path
) -> None:
    open_console(browser, server)
    proxy = server.address("smtp-proxy")
    Select(browser.find_element(By.ID, "trusted-target")).select_by_value("smtp-proxy")
    field = browser.find_element(By.ID, "trusted-networks")
    field.clear()
    field.send_keys("10.0.0.0/8, 192.0.2.0/24")
    browser.find_element(By.ID, "trusted-save").click()
    message = WebDriverWait(browser, 5.0).until(
        lambda d: d.find_element(By.ID, "trusted-message").text or False
    )
    assert "saved to" in message and "reloaded" in message

    text = config.read_text()
    assert 'overrideProxyTrustedNetworks = ["10.0.0.0/8", "192.0.2.0/24"]' in text
    assert "This comment must survive the page's edit." in text
    assert (config.parent / "mailedge.toml.bak").read_text() == CONFIG.format(
        timeout=HEADER_TIMEOUT, state=config.parent
    )
    # Loopback is no longer this listener's proxy: its header is now an untrusted one.
    exchange(proxy, proxy_header())
    row = decision_row(browser, "proxy.untrusted_header", APPEARS_WITHIN, listener="smtp-proxy")
    assert "add '127.0.0.1' to the listener's overrideProxyTrustedNetworks" in row.text

    # An invalid list is refused with the loader's reason, and the file is unchanged.
    field = browser.find_element(By.ID, "trusted-networks")
    field.clear()
    field.send_keys("10.0.0.300/8")
    browser.find_element(By.ID, "trusted-save").click()
    WebDriverWait(browser, 5.0).until(
        lambda d: "is not an IP network" in d.find_element(By.ID, "trusted-message").text
    )
    assert config.read_text() == text


def test_the_admin_token_is_an_example_setting() -> None:
    from mailedge_examples.mailserver import ExampleSettings

    from mailedge.config import ConfigError

    token = "0123456789abcdef0123"
    assert ExampleSettings.from_table({"adminToken": token}).admin_token == token
    assert token not in repr(ExampleSettings.from_table({"adminToken": token}))
    assert ExampleSettings.from_table({}).admin_token is None
    with pytest.raises(ConfigError, match="at least 16 characters"):
        ExampleSettings.from_table({"adminToken": "short"})
