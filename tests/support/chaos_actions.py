"""User actions for the chaos tests (referenced as ``tests.support.chaos_actions:<name>``).

They run in real worker processes, so they must be importable there: the chaos tests put the
repository on the workers' PYTHONPATH.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from tasks.changes import Change

_clients: dict[tuple[int, str], redis.Redis] = {}


def _client(url: str) -> redis.Redis:
    key = (os.getpid(), url)  # never a connection inherited across a fork
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url)
    return _clients[key]


def tally(view: Any, args: dict[str, Any]) -> list[Change]:
    """Count this execution outside the run (HINCRBY tally_key step 1 on tally_url, an outside
    effect no rewind or redelivery can take back), sleep a little if asked, then increment
    ``counter`` by 1 and append ``value`` to ``log``."""
    _client(args["tally_url"]).hincrby(args["tally_key"], args["step"], 1)
    if args.get("sleep"):
        time.sleep(float(args["sleep"]))
    return [Change.increment(args["counter"], 1), Change.append(args["log"], args["value"])]
