"""One background step repeated every few seconds on the event loop (health checks, queue polls)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("presafe")


class Periodic:
    """Run ``step`` every ``interval`` seconds (first at once, or after one interval) until :meth:`stop`.

    A step that raises is logged and the loop goes on: one bad poll must not freeze the readings for good."""

    def __init__(self, step: Callable[[], Awaitable[object]], interval: float, *, name: str, at_once: bool = True):
        self.step, self.interval, self.name, self.at_once = step, interval, name, at_once
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        if not self.at_once:
            await asyncio.sleep(self.interval)
        while True:
            try:
                await self.step()
            except Exception:
                log.warning("%s failed; next try in %.1f s", self.name, self.interval, exc_info=True)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if not self.running:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Cancel the loop and wait until it has stopped (a step in progress is cancelled too)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
