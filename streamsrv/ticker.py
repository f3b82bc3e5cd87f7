"""A periodic tick on the event loop that measures its own lateness and never bursts.

How late each tick runs is the event loop's lag (streamsrv_event_loop_lag_seconds): a loop
that blocks shows there first. A tick that falls more than one interval behind is not caught
up with a burst of ticks; the schedule restarts from now. A tick that raises is logged and
the next one runs as usual.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog
from prometheus_client import Histogram

log = structlog.get_logger(__name__)


async def tick_every(interval: float, tick: Callable[[float], None], lag: Histogram) -> None:
    """Call tick(now) every `interval` seconds until cancelled."""
    next_at = time.monotonic()
    while True:
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        now = time.monotonic()
        lag.observe(max(0.0, now - next_at))
        if now - next_at > interval:
            next_at = now  # fell behind: do not tick in a burst to catch up
        try:
            tick(now)
        except Exception:
            log.exception("tick_failed")
