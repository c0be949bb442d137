"""A raw MONITOR connection to a Redis server, for tests that must see every command it runs
(the commands scripts run inside, too)."""

from __future__ import annotations

import re
import socket
import threading
import uuid
from urllib.parse import unquote, urlparse

import redis

from tests.support.waiting import wait_for

_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "a": b"\a", "b": b"\b", '"': b'"', "\\": b"\\"}
_TOKEN = re.compile(rb'"((?:[^"\\]|\\.)*)"')


def _unrepr(quoted: bytes) -> bytes:
    """Undo Redis' sdscatrepr quoting of one MONITOR argument."""
    out = bytearray()
    i = 0
    while i < len(quoted):
        char = quoted[i : i + 1]
        if char == b"\\":
            nxt = quoted[i + 1 : i + 2].decode()
            if nxt == "x":
                out += bytes([int(quoted[i + 2 : i + 4], 16)])
                i += 4
                continue
            out += _ESCAPES.get(nxt, nxt.encode())
            i += 2
            continue
        out += char
        i += 1
    return bytes(out)


class RedisMonitor:
    """A raw MONITOR connection read by a thread: every command the server runs, as argument lists."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        url = urlparse(redis_url)
        if url.scheme == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(unquote(url.path))
        else:
            self.sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379), timeout=10)
        if url.password:
            user = unquote(url.username) if url.username else None
            self._command(*(["AUTH", user, unquote(url.password)] if user else ["AUTH", unquote(url.password)]))
        self._command("MONITOR")
        self.sock.settimeout(0.2)
        self.commands: list[list[bytes]] = []
        self._buffer = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-monitor", daemon=True)
        self._thread.start()

    def _command(self, *args: str) -> None:
        self.sock.sendall(f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args))
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += self.sock.recv(1)
        assert reply.startswith(b"+OK"), reply

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\r\n")
            for line in lines:
                if line.startswith(b"+"):
                    # +<time> [<db> <client>] "CMD" "arg" ...
                    _, _, rest = line.partition(b"] ")
                    self.commands.append([_unrepr(token) for token in _TOKEN.findall(rest)])

    def stop(self) -> list[list[bytes]]:
        """Stop once every command the server ran before this call has been read."""
        # MONITOR shows commands in the order the server runs them: once it shows a marker sent
        # now, it has shown everything before it.
        token = f"redis-monitor-stop-{uuid.uuid4().hex}".encode()
        seen = len(self.commands)
        client = redis.Redis.from_url(self.redis_url)
        try:
            client.echo(token)
        finally:
            client.close()

        def is_marker(command: list[bytes]) -> bool:
            return len(command) == 2 and command[0].upper() == b"ECHO" and command[1] == token

        wait_for(lambda: any(map(is_marker, self.commands[seen:])), 10, "MONITOR to show a marker sent after the run")
        self.commands = [command for command in self.commands if not is_marker(command)]
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        return self.commands


def keys_of(command: list[bytes]) -> list[bytes]:
    """The keys (or channel) a command works on, as far as this test needs to know."""
    name = command[0].upper()
    if name in (b"EVAL", b"EVALSHA", b"EVALSHA_RO", b"EVAL_RO", b"FCALL"):
        count = int(command[2])
        return command[3 : 3 + count]
    return command[1:2]


