"""When VAD runs: one pass at a time over every live call's new audio, in a worker thread.

The server's tick asks for a pass; the pass runs Silero over each call's audio since the last
one, and hands each call its probabilities back on the loop (which is where the call decides
to ask the model for partials and finals). A connection whose peer sends audio faster than VAD
hears it is paused (TCP flow control) once its call holds VAD_BACKLOG_SECONDS unheard, and
resumed under half of that, instead of growing memory and pushing speech out of the ring
before it is segmented. A call that ends waits for the pass in flight, then runs its last
audio through VAD itself (run_one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import structlog

from streamsrv.asr.vad import SileroVad, VadState
from streamsrv.audio import FloatArray
from streamsrv.call import Call

log = structlog.get_logger(__name__)

VAD_BACKLOG_SECONDS = 4.0  # a call's audio waiting for VAD past which its reading pauses

Work = list[tuple[Call, VadState, FloatArray]]
Done = list[tuple[Call, Any]]


class Readable(Protocol):
    """What back-pressure needs of a connection."""

    call: Call | None
    closed: bool

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class VadScheduler:
    def __init__(self) -> None:
        self.vad: SileroVad | None = None  # set once the model is loaded
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vad")
        self._running: asyncio.Future[Done] | None = None
        self._paused: set[Readable] = set()

    def hold_back(self, conn: Readable) -> None:
        """After a read: pause the connection if its call has too much audio unheard."""
        call = conn.call
        if call is not None and not conn.closed and call.vad_backlog_seconds > VAD_BACKLOG_SECONDS:
            conn.pause_reading()
            self._paused.add(conn)

    def forget(self, conn: Readable) -> None:
        self._paused.discard(conn)

    def tick(self, calls: Iterable[Call]) -> None:
        """Start a pass over the calls' new audio, unless one is running."""
        if self.vad is None or self._running is not None:
            return
        work = []
        for call in calls:
            if call.ended:
                continue
            taken = call.take_vad_audio()
            if taken is not None:
                work.append((call, *taken))
        if work:
            future = asyncio.get_running_loop().run_in_executor(self._pool, self._pass, work)
            future.add_done_callback(self._done)
            self._running = future

    async def settled(self) -> None:
        """Until the pass in flight (if any) has handed its probabilities to the calls."""
        if self._running is not None:
            await asyncio.wait([self._running])

    async def run_one(self, state: VadState, audio: FloatArray) -> Any:
        """One call's audio through VAD, off the loop (the end of a call)."""
        assert self.vad is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.vad.run, state, audio)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _pass(self, work: Work) -> Done:
        assert self.vad is not None
        return [(call, self.vad.run(state, audio)) for call, state, audio in work]

    def _done(self, future: asyncio.Future[Done]) -> None:
        self._running = None
        for conn in list(self._paused):
            if conn.call is None or conn.call.vad_backlog_seconds < VAD_BACKLOG_SECONDS / 2:
                self._paused.discard(conn)
                if not conn.closed:
                    conn.resume_reading()
        if future.exception() is not None:
            log.error("vad_failed", error=repr(future.exception()))
            return
        for call, probs in future.result():
            if not call.ended:
                call.on_vad(np.asarray(probs).tolist())
