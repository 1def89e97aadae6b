"""``[Store]``'s URL forms: what each parses to, and the errors a wrong one gets."""

from __future__ import annotations

import pytest

from mailedge.config import ConfigError, loads
from mailedge.store_settings import StoreSettings, StoreTopology, StoreURL, parse_store_url
from mailedge.validation import InvalidSettingError


@pytest.mark.parametrize(
    ("url", "topology", "tls"),
    [
        ("redis://127.0.0.1:6379/0", StoreTopology.SINGLE, False),
        ("redis://app:pw@[2001:db8::1]:6380/2", StoreTopology.SINGLE, False),
        ("rediss://redis.example:6380", StoreTopology.SINGLE, True),
        ("unix:///run/redis/redis.sock", StoreTopology.SINGLE, False),
    ],
)
def test_single_server_urls_go_to_coredis_as_they_are(
    url: str, topology: StoreTopology, tls: bool
) -> None:
    parsed = parse_store_url(url)
    assert (parsed.url, parsed.topology, parsed.tls) == (url, topology, tls)


def test_a_sentinel_url_names_every_sentinel_the_service_and_the_db() -> None:
    parsed = parse_store_url("redis+sentinel://app:s%40cret@10.0.0.1,10.0.0.2:26380,[::1]/mail/2")
    assert parsed == StoreURL(
        "redis+sentinel://app:s%40cret@10.0.0.1,10.0.0.2:26380,[::1]/mail/2",
        StoreTopology.SENTINEL,
        tls=False,
        hosts=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26379)),
        service="mail",
        db=2,
        username="app",
        password="s@cret",
    )
    assert parse_store_url("rediss+sentinel://s1:26379/mail").tls
    assert parse_store_url("redis+sentinel://:pw@s1/mail").password == "pw"


def test_a_cluster_url_names_its_startup_nodes() -> None:
    parsed = parse_store_url("rediss+cluster://10.0.0.1:7000,10.0.0.2")
    assert parsed.topology is StoreTopology.CLUSTER
    assert parsed.tls
    assert parsed.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 6379))
    assert parse_store_url("redis+cluster://n1:7000/").hosts == (("n1", 7000),)


def test_the_password_stays_out_of_the_repr() -> None:
    assert "secret" not in repr(parse_store_url("redis+cluster://u:secret@n1"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1", "expected a redis://, rediss://, unix://, redis+sentinel://"),
        ("sentinel://s1/mail", "expected a redis://"),
        ("redis+sentinel:///mail", "no hosts in"),
        ("redis+cluster://", "no hosts in"),
        ("redis+cluster://n1,,n2", "bad host ''"),
        ("redis+sentinel://s1", "no service name"),
        ("redis+sentinel://s1/mail/two", "bad database 'two'"),
        ("redis+sentinel://s1/mail/2/x", "expected /service_name[/db]"),
        ("redis+cluster://n1:0", "bad port '0'"),
        ("redis+cluster://n1:70000", "bad port '70000'"),
        ("redis+cluster://n1:x", "bad port 'x'"),
        ("redis+cluster://[::1", "bad host"),
        ("redis+cluster://n1/1", "takes no path"),
        ("redis+cluster://n1?timeout=1", "takes no query"),
        ("redis://127.0.0.1:65536/0", "bad port '65536'"),
        ("redis://a:6379,b:6379/0", "use redis+sentinel:// or redis+cluster://"),
    ],
)
def test_wrong_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(InvalidSettingError) as caught:
        StoreSettings(url=url)
    assert caught.value.field == "url"
    assert message in caught.value.detail


def test_an_error_never_shows_the_password() -> None:
    with pytest.raises(InvalidSettingError) as caught:
        StoreSettings(url="redis+cluster://app:hunter2@n1:badport")
    assert "hunter2" not in str(caught.value)
    assert "app:***@n1:badport" in str(caught.value)


def test_the_config_file_takes_every_form() -> None:
    for url in ("redis+sentinel://s1,s2,s3/mail", "redis+cluster://n1:7000,n2:7000"):
        settings = loads(f'[Store]\nbackend = "redis"\nurl = "{url}"\n', format="toml")
        assert settings.store.url == url
    with pytest.raises(ConfigError, match="url"):
        loads('[Store]\nurl = "redis+sentinel://s1"\n', format="toml")
