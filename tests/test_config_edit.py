"""Editing trusted networks in a config file: validated, atomic, backed up, layout kept."""

from __future__ import annotations

import os
import pathlib

import pytest

from mailedge.config import load_document
from mailedge.config_edit import EditRefused, edit_trusted_networks
from mailedge.settings import Settings

ORIGINAL = """\
# The edge of mail.example: comments like this one must survive an edit.
[SystemSettings]
# Our two HAProxy hosts.
proxyTrustedNetworks = ["10.0.0.0/8"]  # the load balancers

[[NetworkListener]]
name = "smtp"   # port 25
protocol = "smtp"
bind = ["127.0.0.1:2525"]

[[NetworkListener]]
name = "submission"
protocol = "smtp"
bind = ["127.0.0.1:2587"]
overrideProxyTrustedNetworks = []

[Example]
hostname = "mx.example"
"""


@pytest.fixture
def config(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "mailedge.toml"
    path.write_text(ORIGINAL)
    path.chmod(0o640)
    return path


def test_the_server_wide_list_is_replaced_keeping_comments(config: pathlib.Path) -> None:
    document = edit_trusted_networks(
        config, listener=None, networks=["10.0.0.0/8", "192.0.2.1"], extra_sections=["Example"]
    )
    text = config.read_text()
    assert text == ORIGINAL.replace('["10.0.0.0/8"]  # the', '["10.0.0.0/8", "192.0.2.1"]  # the')
    assert [str(n) for n in document.settings.system.proxy_trusted_networks] == [
        "10.0.0.0/8",
        "192.0.2.1/32",
    ]
    assert (config.parent / "mailedge.toml.bak").read_text() == ORIGINAL
    assert config.stat().st_mode & 0o777 == 0o640


def test_a_listener_override_is_set_and_removed(config: pathlib.Path) -> None:
    edit_trusted_networks(
        config, listener="smtp", networks=["172.16.0.0/12"], extra_sections=["Example"]
    )
    settings = load_with_example(config)
    assert [str(n) for n in settings.listener("smtp").override_proxy_trusted_networks or []] == [
        "172.16.0.0/12"
    ]
    edit_trusted_networks(config, listener="submission", networks=None, extra_sections=["Example"])
    assert load_with_example(config).listener("submission").override_proxy_trusted_networks is None
    assert "overrideProxyTrustedNetworks = []" not in config.read_text()
    assert 'name = "smtp"   # port 25' in config.read_text()


def load_with_example(path: pathlib.Path) -> Settings:
    return load_document(path, extra_sections=["Example"]).settings


@pytest.mark.parametrize(
    ("listener", "networks", "message"),
    [
        ("smtp", ["10.0.0.300/8"], "'10.0.0.300/8' is not an IP network"),
        (None, ["10.0.0.1/8"], "host bits"),
        ("nope", ["10.0.0.0/8"], "no [[NetworkListener]] named 'nope'"),
        (None, None, "cannot be removed"),
    ],
)
def test_an_invalid_edit_is_refused_and_the_file_untouched(
    config: pathlib.Path, listener: str | None, networks: list[str] | None, message: str
) -> None:
    with pytest.raises(EditRefused, match=message.replace("[", r"\[")):
        edit_trusted_networks(
            config, listener=listener, networks=networks, extra_sections=["Example"]
        )
    assert config.read_text() == ORIGINAL
    assert not (config.parent / "mailedge.toml.bak").exists()


def test_the_caller_check_can_refuse(config: pathlib.Path) -> None:
    def check(settings: Settings) -> None:
        raise ValueError("a reload cannot apply this")

    with pytest.raises(EditRefused, match="a reload cannot apply this"):
        edit_trusted_networks(
            config, listener=None, networks=[], extra_sections=["Example"], check=check
        )
    assert config.read_text() == ORIGINAL


def test_unknown_sections_are_still_errors(config: pathlib.Path) -> None:
    with pytest.raises(EditRefused, match="Example"):
        edit_trusted_networks(config, listener=None, networks=[])
    assert config.read_text() == ORIGINAL


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_an_unwritable_file_is_refused(config: pathlib.Path) -> None:
    config.chmod(0o440)
    with pytest.raises(EditRefused, match="not writable"):
        edit_trusted_networks(config, listener=None, networks=[], extra_sections=["Example"])


def test_a_json_file_is_refused(tmp_path: pathlib.Path) -> None:
    # JSON has no comments to keep, and the console edits only what it can write back as is.
    json_file = tmp_path / "mailedge.json"
    json_file.write_text("{}")
    with pytest.raises(EditRefused, match="only a TOML file"):
        edit_trusted_networks(json_file, listener=None, networks=[])
    assert json_file.read_text() == "{}"
