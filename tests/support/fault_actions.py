"""User actions with an outside effect, for the recovery tests (referenced as "tests.support.fault_actions:<name>").

An action runs in a worker's pool process each time its step is executed, whether or not the
step's commit then applies: what it does outside the context shows how often steps really ran.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from tasks.changes import Change

_clients: dict[tuple[int, str], redis.Redis] = {}


def _client(url: str) -> redis.Redis:
    key = (os.getpid(), url)  # a forked pool process never uses its parent's connection
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url, socket_timeout=10)
    return _clients[key]


def tick(view: Any, args: dict[str, Any]) -> list[Change]:
    """Count this execution outside runctx (HINCRBY ``effects_key`` ``step`` 1 on the Redis at
    ``effects_url``), sleep ``sleep`` seconds if asked, then append ``value`` to the context's ``log``."""
    _client(args["effects_url"]).hincrby(args["effects_key"], args["step"], 1)
    if args.get("sleep"):
        time.sleep(float(args["sleep"]))
    return [Change.append(args.get("log", "log"), args["value"])]
