"""A work queue in the manner of client-go's: a key is queued at most once and handled by one worker at a
time; a key added while it is being handled runs again right after. Timers (``add_after``) keep only
the earliest wake-up per key. Every method runs on the event loop; threads use ``add_threadsafe``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable


class WorkQueue:
    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._loop = asyncio.get_running_loop()

    def add(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_threadsafe(self, key: Hashable) -> None:
        self._loop.call_soon_threadsafe(self.add, key)

    def add_after(self, key: Hashable, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        when = self._loop.time() + delay
        current = self._timers.get(key)
        if current is not None:
            if current.when() <= when:
                return
            current.cancel()
        self._timers[key] = self._loop.call_at(when, self._fire, key)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: Hashable) -> None:
        """Drop a key's timer (its object is gone)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    async def get(self) -> Hashable:
        key = await self._queue.get()
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: Hashable) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def __len__(self) -> int:
        return len(self._queued)

    def pending_timers(self) -> int:
        return len(self._timers)
