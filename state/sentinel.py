"""Redis behind Sentinel: one URL names the Sentinels and the master they watch, for L2 and the broker.

    sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...][/DB]?master=NAME[&sentinel_password=P][&ssl=true]

``PASSWORD`` is the master's (and its replicas'), ``sentinel_password`` the Sentinels' own (their
``requirepass``), ``ssl=true`` speaks TLS to both. L2 asks the Sentinels for the master through
redis-py's `Sentinel` (its pool finds the new master after a failover, on the next command that
fails); the broker is kombu's Sentinel transport, given the same Sentinels in its own spelling
(``sentinel://h1:p1;sentinel://h2:p2``) and the master's name as a transport option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from state.errors import InvalidValue

SCHEME = "sentinel://"


def is_sentinel(url: str | None) -> bool:
    return bool(url) and url.startswith(SCHEME)


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``sentinel://`` URL: the Sentinels, the master's name, database and credentials."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        if not is_sentinel(url):
            raise InvalidValue(f"not a Sentinel URL (it starts with {SCHEME}): {url.split('@')[-1]}")
        parts = urlsplit(url)
        auth, _, hosts = parts.netloc.rpartition("@")
        username, _, password = auth.partition(":") if auth else ("", "", "")
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        master = query.get("master", "")
        if not master:
            raise InvalidValue(f"Sentinel URL {_shown(url)}: name the master it watches (?master=NAME)")
        sentinels = tuple(_host_port(item, url) for item in hosts.split(",") if item)
        if not sentinels:
            raise InvalidValue(f"Sentinel URL {_shown(url)}: name at least one Sentinel (host:port)")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise InvalidValue(f"Sentinel URL {_shown(url)}: the database must be a number, not {path!r}")
        return cls(
            sentinels=sentinels, master=master, db=int(path or 0), username=unquote(username) or None,
            password=unquote(password) or None, sentinel_password=query.get("sentinel_password") or None,
            ssl=query.get("ssl", "").lower() in ("1", "true", "yes"),
        )

    def _sentinel_kwargs(self) -> dict[str, Any]:
        return {**({"password": self.sentinel_password} if self.sentinel_password else {}), **({"ssl": True} if self.ssl else {})}

    def master_client(self, **options: Any) -> Any:
        """A redis-py client of the current master, that follows it across a failover."""
        from redis.sentinel import Sentinel

        credentials = {"username": self.username, "password": self.password}
        sentinel = Sentinel(
            list(self.sentinels), sentinel_kwargs={"socket_timeout": 5, **self._sentinel_kwargs()},
            **({"ssl": True} if self.ssl else {}), **{k: v for k, v in credentials.items() if v},
        )
        return sentinel.master_for(self.master, db=self.db, **options)

    def describe(self) -> dict[str, Any]:
        """The master and replicas the Sentinels name now: {master: "host:port", replicas: [...]}."""
        from redis.sentinel import Sentinel

        sentinel = Sentinel(list(self.sentinels), sentinel_kwargs={"socket_timeout": 5, **self._sentinel_kwargs()})
        host, port = sentinel.discover_master(self.master)
        replicas = [f"{h}:{p}" for h, p in sentinel.discover_slaves(self.master)]
        return {"master": f"{host}:{port}", "replicas": replicas}

    def kombu_url(self) -> str:
        """The same Sentinels as kombu's Sentinel transport spells them (the master's credentials in each)."""
        auth = ""
        if self.password or self.username:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(f"sentinel://{auth}{host}:{port}/{self.db}" for host, port in self.sentinels)

    def kombu_options(self) -> dict[str, Any]:
        """kombu's transport options for these Sentinels."""
        options: dict[str, Any] = {"master_name": self.master}
        if self._sentinel_kwargs():
            options["sentinel_kwargs"] = self._sentinel_kwargs()
        return options


def _host_port(item: str, url: str) -> tuple[str, int]:
    host, _, port = item.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidValue(f"Sentinel URL {_shown(url)}: {item!r} is not host:port")
    return host, int(port)


def _shown(url: str) -> str:
    """The URL without its credentials (a password never reaches a message)."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    return f"{SCHEME}{hosts}{parts.path}"
