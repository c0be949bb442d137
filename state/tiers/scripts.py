"""The Lua scripts of the Redis tier, kept as ``lua/<name>.lua`` files and read once at start."""

from __future__ import annotations

from functools import cache
from importlib import resources

SCRIPTS = ("read", "commit", "fill", "mark_flushed", "claim_due", "evict", "lease", "start_fan_out", "end_item")


@cache
def lua(name: str) -> str:
    """The source of one script (each file says what its KEYS and ARGV are)."""
    if name not in SCRIPTS:
        raise ValueError(f"no Lua script {name!r}")
    return resources.files("state.tiers").joinpath("lua", f"{name}.lua").read_text()
