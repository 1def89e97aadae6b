"""The DMARC hook against a real DNS server, alone and behind the PROXY path."""

from __future__ import annotations

import mailbox
import pathlib
import smtplib
import threading

import attrs
import authres
import policy_support
import pytest
import trio
import trio.testing
from dns_support import (
    FORBIDDEN_IP,
    PERMITTED_IP,
    ZoneServer,
    dkim_key,
    make_context,
    message,
    sign_message,
)
from mailedge_examples.smtp_handler import QUARANTINE_FOLDER, SMTPHandler
from policy_support import RECEIVER as AUTHSERV_ID
from policy_support import mx, receiving, stored, unfolded

from mailedge.context import AddressSource
from mailedge.hooks.dmarc import DMARCHook
from mailedge.hooks.dns import ResolverSettings
from mailedge.hooks.spf import SPFHook
from mailedge.policy import Action, Envelope, Message, Verdict

server = policy_support.zone_server


@pytest.fixture
def hook(server: ZoneServer) -> DMARCHook:
    return DMARCHook(AUTHSERV_ID, server.settings())


def envelope(mail_from: str = "alice@example.test", helo: str = "client.example") -> Envelope:
    return Envelope(helo=helo, mail_from=mail_from, rcpt_to=("bob@example.net",))


def signed(sender: str = "alice@example.test", domain: str = "example.test") -> bytes:
    return sign_message(message(sender), domain=domain, key=dkim_key())


def results(verdict: Verdict) -> dict[str, str]:
    """method -> result of the verdict's one Authentication-Results header."""
    (header,) = verdict.headers
    assert header.startswith(f"Authentication-Results: {AUTHSERV_ID}; ")
    assert "\n" not in header and "\r" not in header
    parsed = authres.AuthenticationResultsHeader.parse(header)
    return {str(r.method): str(r.result) for r in parsed.results}


# -- policy ----------------------------------------------------------------------------------------


async def test_an_aligned_dkim_signature_passes_even_from_a_forbidden_client(
    hook: DMARCHook,
) -> None:
    verdict = await hook.on_data(
        make_context(FORBIDDEN_IP), envelope(), Message.from_bytes(signed())
    )
    assert verdict.action is Action.ACCEPT
    assert verdict.flags == {"dmarc:pass"}
    assert results(verdict) == {"spf": "fail", "dkim": "pass", "dmarc": "pass"}
    (header,) = verdict.headers
    assert "header.d=example.test" in header and "header.from=example.test" in header


async def test_aligned_spf_passes_an_unsigned_message(hook: DMARCHook) -> None:
    verdict = await hook.on_data(
        make_context(PERMITTED_IP), envelope(), Message.from_bytes(message())
    )
    assert verdict.flags == {"dmarc:pass"}
    # RFC 8601 2.7.1: an unsigned message is dkim=none, not fail.
    assert results(verdict) == {"dkim": "none", "spf": "pass", "dmarc": "pass"}


async def test_a_failure_under_p_reject_is_rejected(hook: DMARCHook) -> None:
    verdict = await hook.on_data(
        make_context(FORBIDDEN_IP), envelope(), Message.from_bytes(message())
    )
    assert verdict == Verdict.reject(
        "DMARC policy of example.test rejects this message", status="5.7.1"
    )


async def test_a_broken_signature_fails(hook: DMARCHook) -> None:
    tampered = signed().replace(b"Hi Bob.", b"Hi Eve.")
    verdict = await hook.on_data(
        make_context(FORBIDDEN_IP), envelope(), Message.from_bytes(tampered)
    )
    assert verdict.action is Action.REJECT


async def test_a_signature_by_another_organization_does_not_align(hook: DMARCHook) -> None:
    # Signed by example.test, From example.org: DKIM passes, DMARC does not.
    data = signed("alice@example.org", domain="example.test")
    verdict = await hook.on_data(make_context(FORBIDDEN_IP), envelope(), Message.from_bytes(data))
    assert verdict == Verdict.reject(
        "DMARC policy of example.org rejects this message", status="5.7.1"
    )


async def test_a_signature_by_a_subdomain_aligns_relaxed(hook: DMARCHook) -> None:
    data = signed("alice@example.org", domain="mail.example.org")
    verdict = await hook.on_data(make_context(FORBIDDEN_IP), envelope(), Message.from_bytes(data))
    assert verdict.flags == {"dmarc:pass"}
    assert results(verdict) == {"spf": "fail", "dkim": "pass", "dmarc": "pass"}


async def test_a_failure_under_p_quarantine_is_accepted_and_flagged(hook: DMARCHook) -> None:
    verdict = await hook.on_data(
        make_context(FORBIDDEN_IP), envelope(), Message.from_bytes(message("alice@quarantine.test"))
    )
    assert verdict.action is Action.ACCEPT
    assert verdict.flags == {"dmarc:fail", "quarantine"}
    (header,) = verdict.headers
    assert "policy.dmarc=quarantine" in header


@pytest.mark.parametrize(
    ("sender", "policy", "action"),
    [
        # The organizational domain's own mail gets p=, never sp= (authheaders 0.16 gets this
        # wrong: it would let p=reject; sp=none forgeries of example.net through).
        ("alice@example.org", "reject", Action.REJECT),
        ("alice@example.net", "reject", Action.REJECT),
        # A subdomain without a record of its own gets the organizational domain's sp=.
        ("alice@sub.example.org", "quarantine", Action.ACCEPT),
        ("alice@sub.example.net", "none", Action.ACCEPT),
        # RFC 9091: np= for a subdomain that does not exist, sp= for one that does.
        ("alice@ghost.example.com", "reject", Action.REJECT),
        ("alice@real.example.com", "none", Action.ACCEPT),
    ],
)
async def test_the_policy_that_applies(
    server: ZoneServer, sender: str, policy: str, action: Action
) -> None:
    hook = DMARCHook(AUTHSERV_ID, server.settings(), enforce=False)
    tagged = await hook.on_data(
        make_context(FORBIDDEN_IP), envelope(), Message.from_bytes(message(sender))
    )
    (header,) = tagged.headers
    assert f"dmarc=fail header.from={sender.partition('@')[2]} policy.dmarc={policy}" in header
    enforced = await DMARCHook(AUTHSERV_ID, server.settings()).on_data(
        make_context(FORBIDDEN_IP), envelope(), Message.from_bytes(message(sender))
    )
    assert enforced.action is action
    assert ("quarantine" in enforced.flags) == (policy == "quarantine")


@pytest.mark.parametrize(
    ("sender", "result"), [("alice@monitor.test", "fail"), ("alice@nospf.test", "none")]
)
async def test_p_none_and_no_record_are_accepted(hook: DMARCHook, sender: str, result: str) -> None:
    verdict = await hook.on_data(
        make_context(FORBIDDEN_IP), envelope(sender), Message.from_bytes(message(sender))
    )
    assert verdict.action is Action.ACCEPT
    assert verdict.flags == {f"dmarc:{result}"}


async def test_a_malformed_dmarc_record_is_a_permerror_and_accepted(hook: DMARCHook) -> None:
    sender = "alice@malformed.test"
    verdict = await hook.on_data(
        make_context(FORBIDDEN_IP), envelope(sender), Message.from_bytes(message(sender))
    )
    assert verdict.action is Action.ACCEPT
    assert verdict.flags == {"dmarc:permerror"}


async def test_without_enforcement_a_failure_is_only_tagged(server: ZoneServer) -> None:
    hook = DMARCHook(AUTHSERV_ID, server.settings(), enforce=False)
    verdict = await hook.on_data(
        make_context(FORBIDDEN_IP), envelope(), Message.from_bytes(message())
    )
    assert verdict.action is Action.ACCEPT
    assert verdict.flags == {"dmarc:fail"}


@attrs.frozen
class ThreadNoting(Message):
    """A message in a file that notes the thread each read of it runs in."""

    threads: list[threading.Thread] = attrs.field(factory=list, eq=False)

    def read_bytes(self) -> bytes:
        self.threads.append(threading.current_thread())
        return super().read_bytes()


async def test_the_message_is_read_from_its_file_in_the_worker_thread(
    hook: DMARCHook, tmp_path: pathlib.Path
) -> None:
    # What the SMTP handler hands on_data: the message in a file, not in memory.
    path = tmp_path / "message"
    path.write_bytes(signed())
    message = ThreadNoting(path.stat().st_size, path)
    verdict = await hook.on_data(make_context(FORBIDDEN_IP), envelope(), message)
    assert verdict.flags == {"dmarc:pass"}
    assert results(verdict) == {"spf": "fail", "dkim": "pass", "dmarc": "pass"}
    # Read once, and only where dkimpy verifies it: never in the event loop's thread.
    (thread,) = message.threads
    assert thread is not threading.main_thread()


# -- DNS failures ------------------------------------------------------------------------------


async def test_a_dmarc_record_that_cannot_be_fetched_is_a_temporary_failure(
    hook: DMARCHook,
) -> None:
    sender = "alice@broken.test"
    verdict = await hook.on_data(
        make_context(FORBIDDEN_IP), envelope(sender), Message.from_bytes(message(sender))
    )
    assert verdict == Verdict.tempfail(
        "DMARC check failed temporarily (DNS), try again later", status="4.4.3"
    )


async def test_a_dkim_key_that_cannot_be_fetched_defers_instead_of_rejecting(
    server: ZoneServer, hook: DMARCHook
) -> None:
    # Without the key, DKIM is temperror, and a message that may well pass must not be
    # rejected for it under p=reject.
    server.zone = server.zone.with_records("sel._domainkey.example.test", "TXT")
    server.zone = type(server.zone)(
        server.zone.records,
        servfail=server.zone.servfail | {"sel._domainkey.example.test"},
        silent=server.zone.silent,
    )
    verdict = await hook.on_data(
        make_context(FORBIDDEN_IP), envelope(), Message.from_bytes(signed())
    )
    assert verdict == Verdict.tempfail(
        "DMARC check of example.test failed temporarily (DNS), try again later", status="4.4.3"
    )


async def test_no_answer_within_the_deadline_is_a_temporary_failure(
    server: ZoneServer, autojump_clock: trio.testing.MockClock
) -> None:
    hook = DMARCHook(AUTHSERV_ID, server.settings(timeout=2, lifetime=4), deadline=0.3)
    sender = "alice@slow.test"
    with trio.fail_after(5):
        verdict = await hook.on_data(
            make_context(FORBIDDEN_IP), envelope(sender), Message.from_bytes(message(sender))
        )
    assert verdict.action is Action.TEMPFAIL
    assert verdict.status == "4.4.3"


async def test_a_bug_in_the_libraries_is_a_temporary_failure(
    hook: DMARCHook, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> str:
        raise KeyError("surprise")

    monkeypatch.setattr("authheaders.authenticate_message", broken)
    verdict = await hook.on_data(
        make_context(FORBIDDEN_IP), envelope(), Message.from_bytes(message())
    )
    assert verdict == Verdict.tempfail("DMARC check failed, try again later", status="4.3.0")
    assert "DMARC check of a message from <alice@example.test> failed" in caplog.text


async def test_cancellation_is_never_swallowed(
    server: ZoneServer, autojump_clock: trio.testing.MockClock
) -> None:
    hook = DMARCHook(AUTHSERV_ID, server.settings(timeout=2, lifetime=4))
    sender = "alice@slow.test"
    with trio.move_on_after(0.2) as scope:
        await hook.on_data(
            make_context(FORBIDDEN_IP), envelope(sender), Message.from_bytes(message(sender))
        )
    assert scope.cancelled_caught


# -- no known client ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", [AddressSource.PROXY_LOCAL, AddressSource.UNKNOWN])
async def test_without_a_known_client_nothing_is_evaluated(
    hook: DMARCHook, server: ZoneServer, source: AddressSource
) -> None:
    verdict = await hook.on_data(
        make_context(source=source), envelope(), Message.from_bytes(message())
    )
    assert verdict == Verdict.accept(
        headers=["Authentication-Results: mx.example; none (client address unknown)"],
        flags=frozenset({"dmarc:none"}),
    )
    assert server.queries == []


def test_settings_are_validated_and_the_repr_is_short() -> None:
    with pytest.raises(ValueError, match="authserv_id"):
        DMARCHook("mx.example; dmarc=pass")
    with pytest.raises(ValueError, match="deadline"):
        DMARCHook(AUTHSERV_ID, deadline=0)
    hook = DMARCHook(AUTHSERV_ID, ResolverSettings.parse(["192.0.2.53"]), enforce=False)
    assert repr(hook) == (
        "<DMARCHook mx.example <ResolverSettings 192.0.2.53:53 timeout=5 lifetime=10> tag-only>"
    )


# -- through the PROXY path ----------------------------------------------------------------------


@pytest.fixture
def handler(server: ZoneServer, tmp_path: pathlib.Path) -> SMTPHandler:
    limiter = trio.CapacityLimiter(4)
    return mx(
        tmp_path / "Maildir",
        SPFHook(AUTHSERV_ID, server.settings(), limiter=limiter),
        DMARCHook(AUTHSERV_ID, server.settings(), limiter=limiter),
    )


async def test_a_signed_aligned_message_through_the_proxy_is_delivered_with_dmarc_pass(
    handler: SMTPHandler,
) -> None:
    async with receiving(handler) as smtp:
        await smtp.send(signed(), client_ip=FORBIDDEN_IP)
    (delivered,) = stored(handler.maildir)
    assert unfolded(delivered, "Received-SPF").startswith("fail (mx.example: ")
    results = unfolded(delivered, "Authentication-Results")
    assert results.startswith("mx.example; spf=fail ")
    assert "dkim=pass header.d=example.test" in results
    assert "dmarc=pass" in results
    assert "client-ip=203.0.113.9;" in unfolded(delivered, "Received-SPF")
    # Folded, every stored header line stays within RFC 5322's 78 characters.
    raw = mailbox.Maildir(handler.maildir, create=False)
    (data,) = (raw.get_bytes(key) for key in raw.iterkeys())
    head = data.split(b"\n\n", 1)[0].split(b"\n")
    assert all(len(line) <= 78 for line in head if not line.startswith(b"DKIM-Signature"))


async def test_an_unsigned_forgery_through_the_proxy_is_refused_under_p_reject(
    handler: SMTPHandler,
) -> None:
    async with receiving(handler) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            await smtp.send(message(), client_ip=FORBIDDEN_IP)
        # The permitted client's unsigned message passes by SPF alignment.
        await smtp.send(message(subject="legit"), client_ip=PERMITTED_IP)
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == b"5.7.1 DMARC policy of example.test rejects this message"
    (delivered,) = stored(handler.maildir)
    assert delivered["Subject"] == "legit"
    assert "dmarc=pass" in unfolded(delivered, "Authentication-Results")
    assert unfolded(delivered, "Received-SPF").startswith("pass ")


async def test_a_failure_under_p_quarantine_through_the_proxy_goes_to_junk(
    handler: SMTPHandler,
) -> None:
    sender = "alice@quarantine.test"
    async with receiving(handler) as smtp:
        await smtp.send(message(sender), mail_from=sender, client_ip=FORBIDDEN_IP)
    assert stored(handler.maildir) == []
    (junk,) = stored(handler.maildir / f".{QUARANTINE_FOLDER}")
    assert (handler.maildir / f".{QUARANTINE_FOLDER}" / "maildirfolder").exists()
    results = unfolded(junk, "Authentication-Results")
    assert "dmarc=fail" in results and "policy.dmarc=quarantine" in results
