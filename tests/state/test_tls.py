"""TLS to the servers: a TLS URL verifies certificates and host names unless told otherwise, for L2
(redis-py), the broker (Celery's broker_use_ssl) and L3 with its LISTEN connection (libpq)."""

from __future__ import annotations

import ssl

import pytest
import redis
from psycopg.conninfo import conninfo_to_dict

from state.change_events import libpq_url
from state.errors import SettingsError
from state.settings import Settings


def test_a_tls_broker_verifies_certificates_by_default() -> None:
    settings = Settings(_env_file=None)
    assert settings.broker_tls_options("redis://127.0.0.1:6379/0") is None
    assert settings.broker_tls_options("amqp://guest:guest@127.0.0.1//") is None
    assert settings.broker_tls_options("rediss://broker.example:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert settings.broker_tls_options("amqps://u:p@broker.example//") == {"cert_reqs": ssl.CERT_REQUIRED}


def test_broker_tls_options_come_from_the_setting() -> None:
    settings = Settings(_env_file=None, broker_tls='{"ca_certs": "/etc/ca.pem", "cert_reqs": "CERT_REQUIRED"}')
    assert settings.broker_tls_options("amqps://u:p@broker.example//") == {"ca_certs": "/etc/ca.pem", "cert_reqs": ssl.CERT_REQUIRED}
    for bad in ("{not json", "[1, 2]"):
        with pytest.raises(SettingsError, match="RUNCTX_BROKER_TLS"):
            Settings(_env_file=None, broker_tls=bad).broker_tls_options("amqps://broker.example//")


def test_l2_over_rediss_verifies_certificate_and_host_name() -> None:
    client = redis.Redis.from_url("rediss://cache.example:6380/0")
    options = client.connection_pool.connection_kwargs
    assert options.get("ssl_cert_reqs", "required") in ("required", ssl.CERT_REQUIRED)
    assert options.get("ssl_check_hostname", True) is True
    client.close()


def test_the_listen_connection_keeps_the_tls_settings_of_the_database_url() -> None:
    url = "postgresql+psycopg://runctx:pw@db.example:5432/runctx?sslmode=verify-full&sslrootcert=/etc/ca.pem"
    parsed = conninfo_to_dict(libpq_url(url))  # as libpq reads it
    assert (parsed["sslmode"], parsed["sslrootcert"], parsed["host"]) == ("verify-full", "/etc/ca.pem", "db.example")
