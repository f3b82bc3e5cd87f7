"""The journal of open calls: what a crash must not lose, at one fsync per batch of calls.

A call is journaled when it starts and struck out once its row and job are written. A call
still open in the journal when the server starts again was open when the process before it
died: recovery closes it out as interrupted (streamsrv.recovery).

The journal is one append-only file of JSON lines, `{"open": {...}}` and `{"close": id}`. One
writer thread takes every record waiting, appends them, fsyncs once and then wakes their
callers, so calls that start or end together share one fsync (group commit) instead of a
file, an fsync, a rename, a directory fsync and an unlink each. Ingest at 300 concurrent 10 s
calls: see benchmarks/RESULTS.md. A torn last line (a crash mid-write) is ignored. When the
file holds four times more records than open calls (and at least COMPACT_AFTER), it is
rewritten with only the open calls, atomically (write, fsync, rename, fsync the directory).

Journals of earlier versions, one file per call under SPOOL_DIR/open, are read at start and
struck out like the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import structlog

from streamsrv.recordings import fsync_directory

log = structlog.get_logger(__name__)

COMPACT_AFTER = 10_000  # records in the file before a rewrite is considered


def read_journal(path: Path) -> dict[str, dict[str, Any]]:
    """The calls a journal file holds open, by id, in the order they were opened."""
    calls: dict[str, dict[str, Any]] = {}
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return calls
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if "open" in record:
            calls[record["open"]["call_id"]] = record["open"]
        elif "close" in record:
            calls.pop(record["close"], None)
    return calls


class Journal:
    """Open and close records, durable when their awaitable returns."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "journal"
        self.legacy_dir = directory / "open"
        self._open: dict[str, dict[str, Any]] = {}  # what the file holds open
        self._legacy: dict[str, Path] = {}  # call id -> its file under legacy_dir, from entries()
        self._records = 0  # lines in the file
        self._waiting: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        """Read what the file holds (blocking: call it off the loop), start the writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open = read_journal(self.path)
        self._records = len(self._open)
        self._rewrite()
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()

    def entries(self) -> list[dict[str, Any]]:
        """Calls left open by an earlier process: this journal's and the legacy files."""
        entries = list(self._open.values())
        for path in sorted(self.legacy_dir.glob("*.json")):
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.error("journal_unreadable", path=str(path), error=repr(exc))
                continue
            if info.get("call_id") not in self._open:
                entries.append(info)
                self._legacy[str(info.get("call_id"))] = path
        return entries

    async def opened(self, call_id: str, info: dict[str, Any]) -> None:
        await self._append({"open": {**info, "call_id": call_id}})

    async def closed(self, call_id: str) -> None:
        await self._append({"close": call_id})
        legacy = self._legacy.pop(call_id, None)
        if legacy is not None:  # a call an earlier version journaled (no disk look otherwise)
            await asyncio.to_thread(legacy.unlink, missing_ok=True)

    async def close(self) -> None:
        """Write what waits, then stop the writer."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def _append(self, record: dict[str, Any]) -> None:
        future = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the journal is closed")
            self._waiting.append((record, future))
            self._cond.notify()
        await future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                batch, self._waiting = self._waiting, []
                if not batch and self._stopping:
                    return
            error: BaseException | None = None
            try:
                self._write([record for record, _ in batch])
            except Exception as exc:  # the disk: each caller decides what it means
                log.error("journal_write_failed", error=repr(exc), records=len(batch))
                error = exc
            futures = [future for _, future in batch]
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
                futures[0].get_loop().call_soon_threadsafe(_resolve, futures, error)

    def _write(self, records: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._records += len(records)
        for record in records:
            if "open" in record:
                self._open[record["open"]["call_id"]] = record["open"]
            else:
                self._open.pop(record["close"], None)
        if self._records >= max(COMPACT_AFTER, 4 * len(self._open)):
            self._rewrite()

    def _rewrite(self) -> None:
        """The file anew with only the open calls, replacing the old one atomically."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for info in self._open.values():
                f.write(json.dumps({"open": info}, separators=(",", ":")).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_directory(self.path.parent)
        self._records = len(self._open)


def _resolve(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    """On the loop, once per batch: wake every caller of the batch."""
    for future in futures:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(None)
