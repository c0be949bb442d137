"""The ``sentinel://`` URL (`state.sentinel`): parsed for L2, spelled for kombu's Sentinel transport,
and refused in one line naming what is wrong, never with its password."""

from __future__ import annotations

import pytest

from runctx.embedded.servers import broker_transport_options, celery_broker_url
from state.errors import InvalidValue
from state.sentinel import SentinelURL
from state.settings import Settings


def test_a_url_names_the_sentinels_the_master_its_database_and_credentials() -> None:
    url = SentinelURL.parse("sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380/2?master=main&sentinel_password=watch&ssl=true")
    assert url.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (url.master, url.db, url.password, url.sentinel_password, url.ssl) == ("main", 2, "s3cret", "watch", True)
    assert url.kombu_url() == "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://:s3cret@10.0.0.2:26380/2"
    assert url.kombu_options() == {"master_name": "main", "sentinel_kwargs": {"password": "watch", "ssl": True}}


def test_the_broker_follows_the_redis_url_behind_sentinel_unless_it_is_named() -> None:
    settings = Settings(redis_url="sentinel://h1:26379,h2:26379/0?master=m", database_url="postgresql://x/y")
    assert celery_broker_url(settings.redis_url) == "sentinel://h1:26379/0;sentinel://h2:26379/0"
    assert broker_transport_options(settings) == {"master_name": "m"}
    elsewhere = Settings(redis_url="sentinel://h1:26379/0?master=m", database_url="postgresql://x/y", broker_url="amqp://guest@h/")
    assert broker_transport_options(elsewhere) == {}


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sentinel://:pw@h1:26379/0", "name the master it watches (?master=NAME)"),
        ("sentinel://:pw@/0?master=m", "name at least one Sentinel"),
        ("sentinel://:pw@h1/0?master=m", "'h1' is not host:port"),
        ("sentinel://:pw@h1:26379/zero?master=m", "the database must be a number"),
    ],
)
def test_a_malformed_url_is_one_line_without_its_password(url: str, says: str) -> None:
    with pytest.raises(InvalidValue) as caught:
        SentinelURL.parse(url)
    message = str(caught.value)
    assert says in message and "pw" not in message and "\n" not in message
