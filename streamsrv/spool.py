"""Durable call records: Postgres when it answers, an fsync'd local spool when it does not.

Every write a call makes to Postgres (its row at start, its job, its row at end) goes through
CallStore. While Postgres answers and nothing is spooled, writes go straight to it. When a write
fails, it and every later write are appended to SPOOL_DIR/pending as one fsync'd JSON file each,
and a replayer applies them in order once Postgres is back, deleting each file after it is
applied. While Postgres is away the replayer probes it every half second with a bare TCP
connect (no pool, no authentication, nothing in Postgres's log), so the spool lands within a
second or two of Postgres accepting connections again, however long the outage was; a
reachable Postgres that still refuses the session (starting up, recovering) is retried at
most every two seconds. Every write is idempotent (insert-or-nothing, upsert), so a crash
between applying and deleting replays it harmlessly: each row and job lands exactly once.

All file I/O runs in worker threads. The journal of open calls is streamsrv.journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import structlog

from streamsrv.jobs import JobStore
from streamsrv.recordings import fsync_directory
from streamsrv.records import (
    CallFinishedRow,
    CallStartedRow,
    ContextRow,
    Write,
    from_spool,
    to_spool,
)

log = structlog.get_logger(__name__)

Op = dict[str, Any]


def _write_durably(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


class Spool:
    """The files of pending writes, in order."""

    def __init__(self, directory: Path) -> None:
        self.pending_dir = directory / "pending"
        self._seq = itertools.count()

    def prepare(self) -> None:
        self.pending_dir.mkdir(parents=True, exist_ok=True)

    def append(self, op: Op) -> None:
        name = f"{time.time_ns():020d}-{next(self._seq):06d}.json"
        _write_durably(self.pending_dir / name, op)

    def pending(self) -> list[Path]:
        return sorted(self.pending_dir.glob("*.json"))


class CallStore:
    """Call rows and jobs that survive Postgres outages and restarts (see module docstring)."""

    def __init__(
        self, jobs: JobStore, spool: Spool, probe_seconds: float = 0.5, retry_max: float = 2.0
    ) -> None:
        self.jobs = jobs
        self.spool = spool
        self._probe = probe_seconds
        self._retry_max = retry_max
        self._connected = False
        self._spooled = 0  # files in the spool, as far as this process knows
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one writer at a time keeps the spool's order

    @property
    def spooled(self) -> int:
        return self._spooled

    @property
    def status(self) -> str:
        return "ok" if self._connected and not self._spooled else "down"

    async def start(self) -> None:
        await asyncio.to_thread(self.spool.prepare)
        self._spooled = len(await asyncio.to_thread(self.spool.pending))
        try:
            await self.jobs.start()
            self._connected = True
        except Exception as exc:  # unreachable or refusing: keep calls, spool their records
            log.error("postgres_unavailable", error=repr(exc), spooled=self._spooled)
        self._task = asyncio.get_running_loop().create_task(self._replay_loop())
        if self._spooled:
            self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._spooled:
            log.warning("spool_left", pending=self._spooled)
        await self.jobs.close()

    async def call_started(self, row: CallStartedRow) -> None:
        await self._write(row)

    async def call_context(self, row: ContextRow) -> None:
        await self._write(row)

    async def call_finished(self, row: CallFinishedRow) -> int | None:
        """Its job's id; None without a job, or when it was spooled (Postgres away)."""
        result = await self._write(row)
        return int(result) if result is not None else None

    async def _write(self, write: Write) -> int | None:
        async with self._lock:
            if self._connected and not self._spooled:
                try:
                    return await write.apply(self.jobs)
                except Exception as exc:  # asyncpg raises many kinds; all mean "spool it"
                    self._connected = False
                    log.error("postgres_write_failed", op=write.OP, error=repr(exc))
            await asyncio.to_thread(self.spool.append, to_spool(write))
            self._spooled += 1
            self._wake.set()
            return None

    async def _replay_loop(self) -> None:
        delay = self._probe
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            delay = self._probe
            if not self._spooled and self._connected:
                continue
            if not self._connected and not await self.jobs.reachable(within=self._probe):
                continue  # still away: probe again soon
            if not await self._replay():  # it answers TCP but not yet a session
                delay = self._retry_max

    async def _replay(self) -> bool:
        """Apply the spool in order; True when it is empty and Postgres answers."""
        async with self._lock:
            if not self._connected:
                try:
                    if self.jobs.started:
                        await self.jobs.check_or_raise()
                    else:
                        await self.jobs.start()
                    self._connected = True
                except Exception as exc:
                    log.debug("postgres_still_down", error=repr(exc))
                    return False
            paths = await asyncio.to_thread(self.spool.pending)
            for done, path in enumerate(paths):
                try:
                    write = from_spool(json.loads(await asyncio.to_thread(path.read_text)))
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    # kept for a person to look at, out of the way of the writes after it
                    log.error("spool_file_unreadable", path=str(path), error=repr(exc))
                    await asyncio.to_thread(path.rename, path.with_suffix(".unreadable"))
                    continue
                try:
                    await write.apply(self.jobs)
                except Exception as exc:
                    self._connected = False
                    self._spooled = len(paths) - done
                    log.warning("spool_replay_paused", error=repr(exc), left=self._spooled)
                    return False
                await asyncio.to_thread(path.unlink)
            if paths:
                log.info("spool_replayed", writes=len(paths))
            self._spooled = 0
            return True
