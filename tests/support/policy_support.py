"""The world of the SPF and DMARC hook tests: one zone server, one receiving MX, its Maildir.

Imported by name (``import policy_support``): pytest's ``pythonpath`` and mypy's ``mypy_path``
include ``tests/support``. There is deliberately no conftest.py, so a test module takes the
:func:`zone_server` fixture by naming it: ``server = policy_support.zone_server`` (pytest
registers a fixture under the module attribute's name).

Both hooks run against :func:`dns_support.standard_zone` on a real DNS server, and their
end-to-end tests send real mail through ``mailedge.server.serve`` (:func:`receiving`) into
the example SMTP handler's Maildir, which :func:`stored` and :func:`unfolded` read back.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import mailbox
import pathlib
from collections.abc import AsyncIterator, Iterator

import attrs
import pytest
import trio
from dns_support import (
    DIRECT_LISTENER,
    PROXY_LISTENER,
    ZoneServer,
    deliver,
    dkim_key,
    running_smtp,
    serve_zone,
    standard_zone,
)
from mailedge_examples.smtp_handler import SMTPHandler

from mailedge.policy import HookChain, Hooks

__all__ = ["RECEIVER", "Receiving", "mx", "receiving", "stored", "unfolded", "zone_server"]

# The receiving MX: SPF's receiver, DMARC's authserv-id, the SMTP handler's hostname.
RECEIVER = "mx.example"
# The most an end-to-end test may take: a hung server fails it instead of hanging the run.
DELIVERY_LIMIT = 30


@pytest.fixture
def zone_server() -> Iterator[ZoneServer]:
    """:func:`dns_support.standard_zone` on a real DNS server on 127.0.0.1, for one test."""
    with serve_zone(standard_zone(dkim_key())) as running:
        yield running


def mx(maildir: pathlib.Path, *hooks: Hooks) -> SMTPHandler:
    """The example SMTP handler as :data:`RECEIVER`, delivering into ``maildir``, with
    ``hooks`` run in order."""
    return SMTPHandler(hostname=RECEIVER, maildir=maildir, hooks=HookChain(hooks))


@attrs.frozen
class Receiving:
    """A running :func:`receiving` server: where to send mail to it."""

    addresses: dict[str, tuple[str, int]]

    async def send(
        self, data: bytes, *, client_ip: str | None, mail_from: str = "alice@example.test"
    ) -> None:
        """One message through smtplib. With ``client_ip``, through the trusted proxy
        listener behind a PROXY header that claims it; with None, straight to the direct
        listener, where the socket peer (127.0.0.1) is the client. Refusals raise smtplib's
        errors."""
        listener = DIRECT_LISTENER if client_ip is None else PROXY_LISTENER
        await deliver(self.addresses[listener], data, mail_from=mail_from, client_ip=client_ip)


@contextlib.asynccontextmanager
async def receiving(handler: SMTPHandler) -> AsyncIterator[Receiving]:
    """:func:`dns_support.running_smtp` with ``handler`` until the block ends, which must end
    within :data:`DELIVERY_LIMIT` seconds."""
    with trio.fail_after(DELIVERY_LIMIT):
        async with running_smtp(handler) as addresses:
            yield Receiving(addresses)


def stored(maildir: pathlib.Path) -> list[email.message.Message]:
    """The messages in ``maildir`` (a Maildir or one of its folders)."""
    box = mailbox.Maildir(maildir, create=False)
    return [email.message_from_bytes(box.get_bytes(key)) for key in box.iterkeys()]


def unfolded(message: email.message.Message, name: str) -> str:
    """The value of ``message``'s header ``name``, which must be there, on one line."""
    value = message[name]
    assert isinstance(value, str), name
    return " ".join(value.split())
