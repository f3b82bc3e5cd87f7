"""Per-call WAV recordings written while the call runs, with all disk I/O on one thread.

The event loop only enqueues bytes. The writer thread coalesces whatever is pending, appends it,
and rewrites the RIFF and data sizes after every flush, so each file is a valid WAV up to its last
flush even if the process is killed mid-call. finish() adds the fsync that makes it durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import struct
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import structlog

log = structlog.get_logger(__name__)

HEADER_BYTES = 44
_MAX_DATA = 0xFFFFFFFF - 36  # RIFF sizes are 32-bit; a 16 kHz call reaches this after ~37 h
_MAX_OPS_PER_ROUND = 4096


def wav_header(sample_rate: int, data_bytes: int) -> bytes:
    """Canonical 44-byte header of a 16-bit mono PCM WAV holding data_bytes of samples."""
    data = min(data_bytes, _MAX_DATA)
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        1,  # mono
        sample_rate,
        sample_rate * 2,
        2,
        16,
        b"data",
        data,
    )


@dataclass(slots=True, eq=False)
class _Op:
    kind: str  # open | write | flush | finish | stop
    recording: Recording | None = None
    data: bytes = b""
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[None] | None = None


class Recording:
    """One call's WAV file. Use from the event loop's thread only."""

    def __init__(self, writer: RecordingWriter, call_id: str, path: Path, sample_rate: int):
        self.call_id = call_id
        self.path = path
        self.sample_rate = sample_rate
        self.frames_bytes = 0  # bytes accepted by write()
        self.error: str | None = None  # set by the writer thread on a disk error
        self._writer = writer
        self._finishing = False
        self._buffered: list[bytes] = []  # frames not yet handed to the thread (loop side)
        # Owned by the writer thread.
        self._file: BinaryIO | None = None
        self._data_bytes = 0

    def write(self, pcm: bytes) -> None:
        """Queue 16-bit PCM for the file; never blocks. Dropped after an error or finish()."""
        if self.error is not None or self._finishing or self._writer.closed or not pcm:
            return
        data = bytes(pcm)
        self.frames_bytes += len(data)
        if not self._buffered:
            self._writer._dirty.append(self)
        self._buffered.append(data)

    def _hand_over(self) -> None:
        """Give the frames buffered since the last tick to the writer thread in one piece."""
        if self._buffered:
            data, self._buffered = b"".join(self._buffered), []
            self._writer._put(_Op("write", self, data))

    async def flush(self) -> None:
        """Wait until everything written so far is in the file (header updated, not fsynced)."""
        await self._round_trip("flush")

    async def finish(self) -> Path:
        """Write everything, finalise the header, fsync and close; check error afterwards."""
        self._finishing = True
        await self._round_trip("finish")
        return self.path

    async def _round_trip(self, kind: str) -> None:
        if self._writer.closed:
            return  # close() already flushed and finalised every file
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._hand_over()
        self._writer._put(_Op(kind, self, loop=loop, future=future))
        await future


class RecordingWriter:
    """Owns the one thread that does every recording's disk writes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.closed = False
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._open_files: set[Recording] = set()  # owned by the thread
        self._dirty: list[Recording] = []  # recordings with buffered frames (loop side)
        # The last disk error, until a recording opens again: for /health. Set by the thread.
        self.last_error: str | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="recordings", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        """Write everything queued, finalise every file still open, stop the thread."""
        if self.closed:
            return
        self.hand_over()
        self.closed = True
        self.start()
        self._queue.put(_Op("stop"))
        assert self._thread is not None
        await asyncio.to_thread(self._thread.join)

    def open(self, call_id: str, sample_rate: int) -> Recording:
        """A new recording at directory/YYYY/MM/DD/<call_id>.wav (UTC date); created lazily."""
        if self.closed:
            raise RuntimeError("RecordingWriter is closed")
        if not call_id or Path(call_id).name != call_id or call_id in (".", ".."):
            raise ValueError(f"call_id is not a plain file name: {call_id!r}")
        path = recording_path(self.directory, call_id, datetime.now(UTC))
        recording = Recording(self, call_id, path, sample_rate)
        self._put(_Op("open", recording))
        return recording

    def hand_over(self) -> None:
        """Called on every scheduler tick: one write per recording with new audio, so the
        thread wakes once a tick rather than once per 20 ms frame of every call."""
        dirty, self._dirty = self._dirty, []
        for recording in dirty:
            recording._hand_over()

    def _put(self, op: _Op) -> None:
        self._queue.put(op)

    # --- everything below runs on the writer thread ---

    def _run(self) -> None:
        stopping = False
        while not stopping:
            ops = [self._queue.get()]
            while len(ops) < _MAX_OPS_PER_ROUND:
                try:
                    ops.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pending: dict[Recording, list[bytes]] = {}
            for op in ops:
                stopping = stopping or op.kind == "stop"
                try:
                    self._handle(op, pending)
                except Exception:
                    log.exception("recording_writer_failed", op=op.kind)
                finally:
                    if op.future is not None and op.loop is not None:
                        _resolve(op.loop, op.future)
            for recording, chunks in pending.items():
                self._append(recording, chunks)
        for recording in list(self._open_files):
            self._finalise(recording)

    def _handle(self, op: _Op, pending: dict[Recording, list[bytes]]) -> None:
        recording = op.recording
        if recording is None:
            return
        if op.kind == "open":
            self._open(recording)
        elif op.kind == "write":
            if recording._file is not None:
                pending.setdefault(recording, []).append(op.data)
        else:
            self._append(recording, pending.pop(recording, []))
            if op.kind == "finish":
                self._finalise(recording)

    def _open(self, recording: Recording) -> None:
        try:
            recording.path.parent.mkdir(parents=True, exist_ok=True)
            file = _create_new(recording)
            recording._file = file
            self._open_files.add(recording)
            file.write(wav_header(recording.sample_rate, 0))
            file.flush()
            self.last_error = None
        except OSError as exc:
            self._fail(recording, exc)

    def _append(self, recording: Recording, chunks: list[bytes]) -> None:
        file = recording._file
        if file is None or not chunks:
            return
        try:
            data = b"".join(chunks)
            file.write(data)
            file.flush()
            recording._data_bytes += len(data)
            # Sizes after the data: a reader never sees a size larger than what is in the file.
            # The whole header in one write (its other fields never change): one syscall a
            # tick instead of two, for every call.
            os.pwrite(file.fileno(), wav_header(recording.sample_rate, recording._data_bytes), 0)
        except OSError as exc:
            self._fail(recording, exc)

    def _finalise(self, recording: Recording) -> None:
        file = recording._file
        if file is None:
            return
        try:
            os.fsync(file.fileno())
            file.close()
            fsync_directory(recording.path.parent)
        except OSError as exc:
            self._fail(recording, exc)
        recording._file = None
        self._open_files.discard(recording)

    def _fail(self, recording: Recording, exc: OSError) -> None:
        self.last_error = f"{recording.path}: {type(exc).__name__}: {exc}"
        if recording.error is None:
            recording.error = f"{type(exc).__name__}: {exc}"
            log.error(
                "recording_failed",
                call_id=recording.call_id,
                path=str(recording.path),
                error=recording.error,
            )
        file, recording._file = recording._file, None
        self._open_files.discard(recording)
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()


def _create_new(recording: Recording) -> BinaryIO:
    """Open the recording's file, never over an existing one (a call id seen before, in an
    earlier run): then <call_id>-1.wav, -2, ... The path the recording really has is set here."""
    base = recording.path
    for n in itertools.count():
        path = base if n == 0 else base.with_name(f"{base.stem}-{n}{base.suffix}")
        try:
            file = path.open("xb")
        except FileExistsError:
            continue
        recording.path = path
        return file
    raise AssertionError("unreachable")


def repair_wav(path: Path, sample_rate: int) -> int | None:
    """Make a recording cut short by a crash a valid WAV of all its whole samples; returns its
    data bytes, or None when there is no file."""
    try:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            data = max(0, size - HEADER_BYTES)
            data -= data % 2
            f.truncate(HEADER_BYTES + data)
            f.seek(0)
            f.write(wav_header(sample_rate, data))
            f.flush()
            os.fsync(f.fileno())
    except FileNotFoundError:
        return None
    return data


def recording_path(directory: Path, call_id: str, when: datetime) -> Path:
    """directory/YYYY/MM/DD/<call_id>.wav, by the UTC date: live calls and uploads alike."""
    return directory / when.strftime("%Y/%m/%d") / f"{call_id}.wav"


def fsync_directory(directory: Path) -> None:
    """Make the file's directory entry durable too (a new file is lost on a crash otherwise)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    def set_done() -> None:
        if not future.done():
            future.set_result(None)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(set_done)
