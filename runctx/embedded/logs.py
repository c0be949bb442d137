"""The log files of an embedded stack (``DATA_DIR/logs``): one each for the supervisor and the servers."""

from __future__ import annotations

import os
from pathlib import Path

from runctx.embedded.layout import Layout

LOG_NAMES = ("supervisor", "redis", "postgres")
MAX_LOG_BYTES = 5 << 20


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def rotate_logs(layout: Layout) -> None:
    """Keep one previous file (``.log.1``) of each log that outgrew MAX_LOG_BYTES."""
    for name in LOG_NAMES:
        path = layout.log_file(name)
        if path.exists() and path.stat().st_size > MAX_LOG_BYTES:
            os.replace(path, path.with_suffix(".log.1"))
