"""The post-call queue's counts, read from Postgres in the background every few seconds.

What shows them (the server's /health, the worker's queue gauges) reads the last answer and
never waits on Postgres: a read that fails or hangs past its timeout makes the counts
"unavailable" until a read succeeds again, and the readers go on at once either way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from streamsrv.jobs import bounded
from streamsrv.repositories import QueueOverview

log = structlog.get_logger(__name__)


class QueueWatch:
    def __init__(
        self,
        read: Callable[[], Awaitable[QueueOverview]],
        every: float = 5.0,
        timeout: float = 2.0,
        on_read: Callable[[QueueOverview], None] | None = None,
    ) -> None:
        self._read = read
        self._every = every
        self._timeout = timeout
        self._on_read = on_read
        self.latest: QueueOverview | None = None  # None: no answer yet, or the last read failed
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def counts(self) -> dict[str, int] | str:
        """For /health: queued, running, failed, done_last_hour, or "unavailable"."""
        return self.latest.counts() if self.latest is not None else "unavailable"

    async def refresh(self) -> None:
        """One read; any failure (Postgres away, not yet connected, too slow) clears it."""
        try:
            self.latest = await bounded(self._read(), self._timeout)
        except Exception as exc:
            if self.latest is not None:
                log.warning("queue_read_failed", error=repr(exc))
            self.latest = None
            return
        if self._on_read is not None:
            self._on_read(self.latest)

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._every)
