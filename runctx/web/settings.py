"""The web inspector's settings (``RUNCTX_WEB_*``), each default declared here once."""

from __future__ import annotations

import ipaddress
import secrets

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from state.errors import SettingsError

DEFAULT_BIND = "127.0.0.1:8642"


class WebSettings(BaseSettings):
    """Where ``runctx web`` listens and who may use it: a user name and password (HTTP basic auth,
    what a browser asks for) and/or a bearer token (for scripts; also good as the password)."""

    model_config = SettingsConfigDict(env_prefix="RUNCTX_WEB_", extra="ignore", env_ignore_empty=True)

    bind: str = Field(default=DEFAULT_BIND, description="host:port the inspector listens on")
    user: str = Field(default="runctx", description="the user name of basic auth")
    password: str | None = Field(default=None, description="the password of basic auth")
    token: str | None = Field(default=None, description="a bearer token (Authorization: Bearer ...)")

    @property
    def has_credentials(self) -> bool:
        return bool(self.password or self.token)

    def host_and_port(self) -> tuple[str, int]:
        host, sep, port = self.bind.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise SettingsError("--bind", f"{self.bind!r}: expected HOST:PORT, e.g. {DEFAULT_BIND}")
        return host.strip("[]"), int(port)

    def checked(self) -> WebSettings:
        """These settings, ready to serve: on a loopback address without credentials, a password is
        made for this start (``runctx web`` prints it); elsewhere, none is refused."""
        host, _ = self.host_and_port()
        if self.has_credentials:
            return self
        if not is_loopback(host):
            raise SettingsError(
                "RUNCTX_WEB_PASSWORD", f"the inspector listens on {host}, not a loopback address: set RUNCTX_WEB_PASSWORD or RUNCTX_WEB_TOKEN"
            )
        return self.model_copy(update={"password": secrets.token_urlsafe(18)})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
