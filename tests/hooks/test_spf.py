"""The SPF hook against a real DNS server, alone and behind the PROXY path."""

from __future__ import annotations

import pathlib
import re
import smtplib

import policy_support
import pytest
import trio
import trio.testing
from dns_support import FORBIDDEN_IP, PERMITTED_IP, PROXY_IP, ZoneServer, make_context, message
from policy_support import RECEIVER, mx, receiving, stored, unfolded

from mailedge.context import AddressSource
from mailedge.hooks.dns import ResolverSettings
from mailedge.hooks.spf import SPFHook, SPFResult, received_spf
from mailedge.policy import Action, Verdict

server = policy_support.zone_server


@pytest.fixture
def hook(server: ZoneServer) -> SPFHook:
    return SPFHook(RECEIVER, server.settings())


def result_of(verdict: Verdict) -> str:
    (flag,) = verdict.flags
    assert flag.startswith("spf:")
    return flag[4:]


def header_of(verdict: Verdict) -> str:
    (header,) = verdict.headers
    return header


# RFC 7208 9.1: "Received-SPF:" result [comment] [key-value-list] (loosely, for the shape).
RECEIVED_SPF = re.compile(
    r"Received-SPF: (?P<result>[a-z]+) \((?P<comment>(?:[^()\\]|\\.)*)\)"
    r"(?P<pairs>(?: [a-z-]+=(?:[^ ;\"]+|\"(?:[^\"\\]|\\.)*\");)+)"
)


def pairs(header: str) -> dict[str, str]:
    match = RECEIVED_SPF.fullmatch(header)
    assert match is not None, header
    found = re.findall(r" ([a-z-]+)=([^ ;\"]+|\"(?:[^\"\\]|\\.)*\");", match["pairs"])
    return dict(found)


# -- results -------------------------------------------------------------------------------------


async def test_pass_for_the_permitted_client(hook: SPFHook) -> None:
    verdict = await hook.on_mail_from(
        make_context(PERMITTED_IP), "client.example", "a@example.test"
    )
    assert verdict.action is Action.ACCEPT
    assert verdict.flags == {"spf:pass"}
    assert header_of(verdict) == (
        "Received-SPF: pass (mx.example: domain of a@example.test designates 198.51.100.7 as "
        'permitted sender) client-ip=198.51.100.7; envelope-from="a@example.test"; '
        "helo=client.example; receiver=mx.example; identity=mailfrom;"
    )


async def test_fail_for_another_client_is_tagged_by_default(hook: SPFHook) -> None:
    verdict = await hook.on_mail_from(
        make_context(FORBIDDEN_IP), "client.example", "a@example.test"
    )
    assert verdict.action is Action.ACCEPT
    assert result_of(verdict) == "fail"
    assert header_of(verdict).startswith(
        "Received-SPF: fail (mx.example: domain of a@example.test does not designate "
        "203.0.113.9 as permitted sender) client-ip=203.0.113.9;"
    )


async def test_fail_is_rejected_with_5_7_23_when_configured(server: ZoneServer) -> None:
    hook = SPFHook(RECEIVER, server.settings(), reject_fail=True)
    verdict = await hook.on_mail_from(
        make_context(FORBIDDEN_IP), "client.example", "a@example.test"
    )
    assert verdict == Verdict.reject(
        "SPF fail: 203.0.113.9 is not allowed to send mail for example.test", status="5.7.23"
    )
    # The permitted client still passes.
    verdict = await hook.on_mail_from(
        make_context(PERMITTED_IP), "client.example", "a@example.test"
    )
    assert result_of(verdict) == "pass"


@pytest.mark.parametrize(
    ("sender", "result", "comment"),
    [
        ("a@soft.test", "softfail", "transitioning domain of a@soft.test does not designate"),
        ("a@neutral.test", "neutral", "203.0.113.9 is neither permitted nor denied by domain"),
        ("a@nospf.test", "none", "domain of a@nospf.test does not provide an SPF record"),
        ("a@missing.test", "none", "domain of a@missing.test does not provide an SPF record"),
        ("a@bad.test", "permerror", "permanent error in processing domain of a@bad.test"),
    ],
)
async def test_other_results_are_accepted_with_their_header(
    hook: SPFHook, sender: str, result: str, comment: str
) -> None:
    verdict = await hook.on_mail_from(make_context(FORBIDDEN_IP), "client.example", sender)
    assert verdict.action is Action.ACCEPT
    assert result_of(verdict) == result
    header = header_of(verdict)
    assert header.startswith(f"Received-SPF: {result} (mx.example: {comment}")
    assert pairs(header)["client-ip"] == FORBIDDEN_IP


async def test_permerror_names_the_problem_and_can_be_rejected(server: ZoneServer) -> None:
    tagged = await SPFHook(RECEIVER, server.settings()).on_mail_from(
        make_context(FORBIDDEN_IP), "client.example", "a@bad.test"
    )
    assert "frobnicate" in pairs(header_of(tagged))["problem"]
    hook = SPFHook(RECEIVER, server.settings(), reject_permerror=True)
    verdict = await hook.on_mail_from(make_context(FORBIDDEN_IP), "client.example", "a@bad.test")
    assert verdict == Verdict.reject(
        "SPF permerror: the SPF record of bad.test is invalid", status="5.7.24"
    )


async def test_servfail_is_a_temporary_failure(hook: SPFHook) -> None:
    verdict = await hook.on_mail_from(make_context(FORBIDDEN_IP), "client.example", "a@broken.test")
    assert verdict == Verdict.tempfail(
        "SPF check of broken.test failed temporarily, try again later", status="4.7.24"
    )


async def test_a_silent_server_is_a_temporary_failure_within_the_resolver_lifetime(
    server: ZoneServer,
) -> None:
    hook = SPFHook(RECEIVER, server.silent_settings())
    with trio.fail_after(5):
        verdict = await hook.on_mail_from(
            make_context(PERMITTED_IP), "client.example", "a@slow.test"
        )
    assert verdict.action is Action.TEMPFAIL
    assert verdict.status == "4.7.24"


async def test_past_its_querytime_the_check_is_a_temporary_failure(server: ZoneServer) -> None:
    # pyspf's own budget (querytime) is shorter than one lookup's lifetime here.
    hook = SPFHook(RECEIVER, server.settings(timeout=2, lifetime=4), querytime=0.3)
    with trio.fail_after(5):
        verdict = await hook.on_mail_from(
            make_context(PERMITTED_IP), "client.example", "a@slow.test"
        )
    assert verdict.action is Action.TEMPFAIL


async def test_the_null_sender_is_checked_by_its_helo_identity(
    hook: SPFHook, server: ZoneServer
) -> None:
    # RFC 7208 2.4: for the null reverse-path, the mailbox is postmaster@<HELO>.
    verdict = await hook.on_mail_from(make_context(PERMITTED_IP), "mail.example.test", "")
    assert result_of(verdict) == "pass"
    header = header_of(verdict)
    assert "domain of postmaster@mail.example.test designates 198.51.100.7" in header
    assert pairs(header) == {
        "client-ip": PERMITTED_IP,
        "envelope-from": '""',
        "helo": "mail.example.test",
        "receiver": RECEIVER,
        "identity": "helo",
    }
    verdict = await hook.on_mail_from(make_context(FORBIDDEN_IP), "mail.example.test", "")
    assert result_of(verdict) == "fail"


@pytest.mark.parametrize("helo", ["[198.51.100.7]", "localhost", "[IPv6:2001:db8::7]"])
async def test_a_helo_that_is_not_a_domain_is_not_evaluated(
    hook: SPFHook, server: ZoneServer, helo: str
) -> None:
    verdict = await hook.on_mail_from(make_context(PERMITTED_IP), helo, "")
    assert result_of(verdict) == "none"
    assert "HELO is not a domain name, SPF not evaluated" in header_of(verdict)
    assert server.queries == []


async def test_an_ipv6_client(hook: SPFHook) -> None:
    verdict = await hook.on_mail_from(make_context("2001:db8::7"), "client.example", "a@v6.test")
    assert result_of(verdict) == "pass"
    assert pairs(header_of(verdict))["client-ip"] == "2001:db8::7"
    verdict = await hook.on_mail_from(make_context("2001:db8::8"), "client.example", "a@v6.test")
    assert result_of(verdict) == "fail"


@pytest.mark.parametrize("source", [AddressSource.PROXY_LOCAL, AddressSource.UNKNOWN])
async def test_without_a_known_client_the_proxys_address_is_never_evaluated(
    hook: SPFHook, server: ZoneServer, source: AddressSource
) -> None:
    context = make_context(source=source)
    assert str(context.client_ip) == PROXY_IP and not context.client_known
    verdict = await hook.on_mail_from(context, "client.example", "a@example.test")
    assert verdict.action is Action.ACCEPT
    assert result_of(verdict) == "none"
    header = header_of(verdict)
    assert header == (
        "Received-SPF: none (mx.example: client address unknown, SPF not evaluated) "
        'envelope-from="a@example.test"; helo=client.example; receiver=mx.example; '
        "identity=mailfrom;"
    )
    assert PROXY_IP not in header
    assert server.queries == []


async def test_a_direct_client_is_evaluated_by_its_socket_address(hook: SPFHook) -> None:
    context = make_context(PERMITTED_IP, source=AddressSource.SOCKET)
    verdict = await hook.on_mail_from(context, "client.example", "a@example.test")
    assert result_of(verdict) == "pass"


async def test_cancellation_is_never_swallowed(
    server: ZoneServer, autojump_clock: trio.testing.MockClock
) -> None:
    hook = SPFHook(RECEIVER, server.settings(timeout=2, lifetime=4))
    with trio.move_on_after(0.2) as scope:
        await hook.on_mail_from(make_context(PERMITTED_IP), "client.example", "a@slow.test")
    assert scope.cancelled_caught


async def test_a_bug_in_the_check_is_a_temporary_failure(
    hook: SPFHook, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> tuple[str, str]:
        raise ZeroDivisionError

    monkeypatch.setattr("spf.check2", broken)
    verdict = await hook.on_mail_from(
        make_context(PERMITTED_IP), "client.example", "a@example.test"
    )
    assert verdict.action is Action.TEMPFAIL
    assert "SPF check of a@example.test for 198.51.100.7 failed" in caplog.text


# -- the header ------------------------------------------------------------------------------------


def test_received_spf_quotes_and_escapes_what_it_must() -> None:
    result = SPFResult(
        "permerror",
        "192.0.2.1",
        "mailfrom",
        '"odd (name)"@example.test',
        "helo;with spaces",
        "example.test",
        explanation='bad "record"\r\nX-Injected: 1',
    )
    header = received_spf(result, RECEIVER)
    assert "\r" not in header and "\n" not in header
    assert pairs(header) == {
        "client-ip": "192.0.2.1",
        "envelope-from": r'"\"odd (name)\"@example.test"',
        "helo": '"helo;with spaces"',
        "problem": r'"bad \"record\"??X-Injected: 1"',
        "receiver": RECEIVER,
        "identity": "mailfrom",
    }
    # In the comment only parentheses and backslashes are escaped (RFC 5322 3.2.2 ctext).
    assert r'domain of "odd \(name\)"@example.test)' in header


def test_settings_are_validated_and_the_repr_is_short() -> None:
    with pytest.raises(ValueError, match="receiver"):
        SPFHook("mx example")
    with pytest.raises(ValueError, match="querytime"):
        SPFHook(RECEIVER, querytime=0)
    hook = SPFHook(RECEIVER, ResolverSettings.parse(["192.0.2.53"]), reject_fail=True)
    assert repr(hook) == (
        "<SPFHook mx.example <ResolverSettings 192.0.2.53:53 timeout=5 lifetime=10> reject-fail>"
    )


# -- through the PROXY path --------------------------------------------------------------------


async def test_a_proxied_client_is_judged_by_its_own_address_not_the_proxys(
    server: ZoneServer, tmp_path: pathlib.Path
) -> None:
    handler = mx(tmp_path / "Maildir", SPFHook(RECEIVER, server.settings()))
    async with receiving(handler) as smtp:
        # The trusted proxy (127.0.0.1) says the client is 198.51.100.7: pass.
        await smtp.send(message(subject="proxied"), client_ip=PERMITTED_IP)
        # The same message straight from 127.0.0.1: the socket peer is the client, and
        # example.test does not permit it. Without the header, this is what the proxied
        # client would have been judged as.
        await smtp.send(message(subject="direct"), client_ip=None)
    by_subject = {m["Subject"]: m for m in stored(handler.maildir)}
    proxied = unfolded(by_subject["proxied"], "Received-SPF")
    assert proxied.startswith("pass (mx.example: domain of alice@example.test designates")
    assert "client-ip=198.51.100.7;" in proxied
    assert "127.0.0.1" not in proxied
    direct = unfolded(by_subject["direct"], "Received-SPF")
    assert direct.startswith("fail (mx.example: domain of alice@example.test does not designate")
    assert "client-ip=127.0.0.1;" in direct


async def test_a_forbidden_proxied_client_is_refused_at_mail_from(
    server: ZoneServer, tmp_path: pathlib.Path
) -> None:
    handler = mx(tmp_path / "Maildir", SPFHook(RECEIVER, server.settings(), reject_fail=True))
    async with receiving(handler) as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            await smtp.send(message(), client_ip=FORBIDDEN_IP)
        await smtp.send(message(), client_ip=PERMITTED_IP)
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == (
        b"5.7.23 SPF fail: 203.0.113.9 is not allowed to send mail for example.test"
    )
    (delivered,) = stored(handler.maildir)
    assert unfolded(delivered, "Received-SPF").startswith("pass ")
