"""A call's LiveTranscript wired to the shared model: each Ask it makes is submitted to the
batching executor (finals never shed, partials shed past MAX_QUEUE_SIZE), and each result is
handed back on the event loop; the events that come out go to the call. The transcript itself
stays free of futures and executors, so it is tested with results of a test's own making.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from streamsrv import events
from streamsrv.asr.executor import BatchExecutor, QueueFull
from streamsrv.asr.whisper import AsrRequest, AsrResult
from streamsrv.metrics import Metrics
from streamsrv.transcript import Ask, LiveTranscript


class TranscriptRunner:
    def __init__(
        self,
        transcript: LiveTranscript,
        executor: BatchExecutor[AsrRequest, AsrResult],
        metrics: Metrics,
        emit: Callable[[events.Event], None],
        ended: Callable[[], bool],  # the call ended: late partials are dropped
        log: Any,
    ) -> None:
        self.transcript = transcript
        self._executor = executor
        self._metrics = metrics
        self._emit = emit
        self._ended = ended
        self._log = log
        self._finals: dict[Ask, asyncio.Future[AsrResult]] = {}  # asked, result not handed in

    def on_vad(self, probs: Sequence[float], *, ending: bool = False) -> None:
        for ask in self.transcript.on_vad(probs, ending=ending):
            self._submit(ask)

    async def last_finals(self) -> None:
        """Until every final asked for is in and handed out, in order."""
        if self._finals:
            await asyncio.wait(list(self._finals.values()))
        for ask, future in list(self._finals.items()):
            self._final_landed(ask, future)

    def _submit(self, ask: Ask) -> None:
        request = ask.request
        if ask.final:
            future = self._executor.submit(request, priority=0, key=request.batch_key)
            self._finals[ask] = future
            future.add_done_callback(lambda f: self._final_landed(ask, f))
            return
        try:
            future = self._executor.submit(
                request, priority=1, key=request.batch_key, sheddable=True
            )
        except QueueFull:
            self._metrics.partials_shed.inc()
            self.transcript.partial_shed(ask)
            return
        future.add_done_callback(lambda f: self._partial_landed(ask, f))

    def _partial_landed(self, ask: Ask, future: asyncio.Future[AsrResult]) -> None:
        if self._ended():
            self.transcript.partial_shed(ask)
            return
        for event in self.transcript.partial_done(ask, _result(future)):
            if isinstance(event, events.Partial):
                self._metrics.partials.inc()
            self._emit(event)

    def _final_landed(self, ask: Ask, future: asyncio.Future[AsrResult]) -> None:
        """Hand in a final's result (once: last_finals may get there before the callback)."""
        if self._finals.pop(ask, None) is None:
            return
        if future.cancelled() or future.exception() is not None:
            self._log.error("final_failed", error=repr(future.exception()))
        for event in self.transcript.final_done(ask, _result(future)):
            if isinstance(event, events.Final):
                self._metrics.finals.inc()
            self._emit(event)


def _result(future: asyncio.Future[AsrResult]) -> AsrResult | None:
    """The model's result, or None when the request failed or was cancelled."""
    if future.cancelled() or future.exception() is not None:
        return None
    return future.result()
