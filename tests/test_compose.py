"""docker-compose.yml is for users (no Docker engine here): check that it describes a working deployment."""

from __future__ import annotations

from pathlib import Path

import yaml

from state.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_wires_workers_to_redis_and_postgres() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "worker", "flower"} <= set(services)
    for name in ("migrate", "worker", "flower"):
        env = services[name]["environment"]
        settings = Settings(**{key.removeprefix("RUNCTX_").lower(): value for key, value in env.items()})
        assert settings.redis_url and settings.redis_url.startswith("redis://redis:")
        assert settings.database_url and "@postgres:5432/" in settings.database_url
        assert services[name]["build"] == "."
    assert services["worker"]["command"][:4] == ["celery", "-A", "workers", "worker"]
    assert services["migrate"]["command"] == ["runctx", "migrate"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]  # not on every interface
    dockerfile = (ROOT / "Dockerfile").read_text()
    for part in ("state", "tasks", "workers", "runctx", "celeryconfig.py"):
        assert part in dockerfile
