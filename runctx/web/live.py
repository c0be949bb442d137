"""Live updates for the pages: server-sent events fed by the store's watch channel (`state.watch`).

One subscription per inspector process. Each watched run (and each runs list, keys ``*...``) has one
pump: when the watch channel says the run changed, it waits a moment for the changes to settle,
reads what the pages show once, and sends the same update to every page watching. A page never
makes the server poll Redis; a quiet run costs nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from state.watch import RunWatch

log = logging.getLogger(__name__)

ALL_RUNS = "*"
SETTLE_S = 0.25  # how long a pump lets changes gather before it reads (one read for a burst)
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream


class LiveHub:
    """Owns the watch subscription and the pumps. Promises: every page watching a key gets every
    update read after it subscribed (the first one at once); a change heard while a read runs is
    read again after it, never lost; a page that leaves costs nothing more."""

    def __init__(self, watch: Callable[[Callable[[dict[str, Any]], None]], RunWatch], read: Callable[[str], dict[str, Any]]) -> None:
        self._make_watch = watch
        self._read = read  # key -> the update pages of that key are sent (runs in a worker thread)
        self._pages: dict[str, set[asyncio.Queue[str]]] = {}
        self._dirty: dict[str, asyncio.Event] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: RunWatch | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._watch = self._make_watch(self._heard).start()

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        for task in self._pumps.values():
            task.cancel()

    def _heard(self, message: dict[str, Any]) -> None:
        """From the watch thread: mark the run (and the runs list) changed."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._changed, str(message.get("run", "")))

    def _changed(self, run_id: str) -> None:
        """Mark the run's pages and every runs list changed (``*``: everything, after a resubscription)."""
        for key, dirty in self._dirty.items():
            if run_id == ALL_RUNS or key == run_id or key.startswith(ALL_RUNS):
                dirty.set()

    async def stream(self, key: str) -> AsyncIterator[str]:
        """The event stream of one page watching ``key``: an update at once, then one per change."""
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=100)
        self._pages.setdefault(key, set()).add(queue)
        if key not in self._pumps:
            self._dirty[key] = asyncio.Event()
            self._pumps[key] = asyncio.create_task(self._pump(key))
        self._dirty[key].set()
        try:
            while True:
                try:
                    yield await asyncio.wait_for(queue.get(), timeout=KEEPALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            self._leave(key, queue)

    def _leave(self, key: str, queue: asyncio.Queue[str]) -> None:
        pages = self._pages.get(key, set())
        pages.discard(queue)
        if not pages:
            self._pages.pop(key, None)
            self._dirty.pop(key, None)
            task = self._pumps.pop(key, None)
            if task is not None:
                task.cancel()

    async def _pump(self, key: str) -> None:
        dirty = self._dirty[key]
        while True:
            await dirty.wait()
            await asyncio.sleep(SETTLE_S)
            dirty.clear()
            try:
                update = await asyncio.to_thread(self._read, key)
            except Exception as exc:  # the run was pruned, a server is away: say so, keep the stream
                log.warning("live update of %s failed: %s", key, exc)
                update = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            event = f"data: {json.dumps(update, default=str)}\n\n"
            for queue in list(self._pages.get(key, ())):
                if queue.full():  # a page that does not read: drop its oldest update, keep the newest
                    queue.get_nowait()
                queue.put_nowait(event)
