"""One call: the coordinator of its parts.

The server feeds a Call decoded AudioSocket messages (synchronously, on the event loop: only
cheap work here) and, after each VAD pass, the call's speech probabilities. The Call turns
audio messages into PCM at the call's rate and records it, hands the samples to its
LiveTranscript (streamsrv.transcript, no I/O) when it is transcribed live, submits what the
transcript asks of the shared model and hands the results back, numbers and publishes the
events that come out, and has CallRecords (streamsrv.call_records) write its journal entry,
rows and job. Past capacity a call is still taken, recorded and queued, as postcall_only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import structlog

from streamsrv import audiosocket as aso
from streamsrv import events
from streamsrv.asr.executor import BatchExecutor, QueueFull
from streamsrv.asr.vad import VadState
from streamsrv.asr.whisper import AsrRequest, AsrResult
from streamsrv.audio import (
    FloatArray,
    PcmAssembler,
    StreamResampler,
    pcm16_to_float,
    ulaw_to_pcm16,
)
from streamsrv.call_records import CallOpened, CallRecords
from streamsrv.config import Settings
from streamsrv.context import CallContext
from streamsrv.conversation import ConversationHub
from streamsrv.journal import Journal
from streamsrv.metrics import Metrics
from streamsrv.publish import Publisher
from streamsrv.recordings import Recording, RecordingWriter
from streamsrv.records import CallEndedRow, JobRow
from streamsrv.spool import CallStore
from streamsrv.transcript import Ask, LiveTranscript

log = structlog.get_logger(__name__)

VadPass = Callable[[VadState, FloatArray], Awaitable[Any]]


@dataclass
class CallServices:
    """What every call shares: one of each, owned by the server."""

    settings: Settings
    publisher: Publisher
    store: CallStore
    recorder: RecordingWriter
    metrics: Metrics
    executor: BatchExecutor[AsrRequest, AsrResult] | None
    journal: Journal
    load: Callable[[], float] = lambda: 0.0  # 0 idle .. 1 saturated, stretches partials
    final_beams: tuple[int, int] = (1, 5)  # beam of a final led by context, and of one not
    conversations: ConversationHub | None = None  # merges the legs of each conversation


def pcm_of(kind: int, payload: bytes, format_0x10: str) -> tuple[int, bytes, bool]:
    """(sample rate, payload, is u-law) of an audio message, by kind and the 0x10 setting."""
    if kind == aso.Kind.AUDIO_8K:
        if format_0x10 == "ulaw":
            return 8000, payload, True
        if format_0x10 == "slin16":
            return 16000, payload, False
    return aso.AUDIO_RATES[kind], payload, False


class Call:
    def __init__(
        self,
        services: CallServices,
        call_id: str,
        peer: str,
        context: CallContext | None = None,
    ) -> None:
        self.s = services
        self.settings = services.settings
        self.call_id = call_id
        self.peer = peer
        self.log = log.bind(call_id=call_id)
        self.mode = self.settings.default_processing_mode
        self.created_at = datetime.now(UTC)
        self.sample_rate: int | None = None
        self.samples = 0  # samples at the call's rate, as recorded
        self.frames = 0
        self.dtmf = ""
        self.ended = False
        self.context = context  # posted before the call connected, or None
        self._conversation: str | None = None  # the one this call is a leg of
        self.transcript: LiveTranscript | None = None
        self._seq = 0
        self._assembler = PcmAssembler()
        self._recording: Recording | None = None
        self._records = CallRecords(services.store, services.journal)
        self._rate_resampler: StreamResampler | None = None
        self._finals: dict[Ask, asyncio.Future[AsrResult]] = {}  # asked, result not handed in

    # -- messages in -------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self.sample_rate is not None

    @property
    def transcribing_live(self) -> bool:
        """Whether this call's audio goes to live transcription (known once it started)."""
        return self.transcript is not None

    @property
    def language(self) -> str | None:
        """The call's language: its context's, else LANGUAGE, else the first one detected."""
        if self.transcript is not None:
            return self.transcript.language
        if self.context is not None and self.context.fixed_language:
            return self.context.fixed_language
        return None if self.settings.language == "auto" else self.settings.language

    def set_context(self, context: CallContext) -> None:
        """Context posted while the call runs: merged into what it had, in effect from now on
        (the language of the next requests to the model, the role of the next finals)."""
        self.context = context if self.context is None else self.context.merged(context)
        if self.transcript is not None and context.fixed_language:
            self.transcript.fix_language(context.fixed_language)
        if self.started:
            self._records.context(self.call_id, self.context, context.fixed_language)
            self._emit(events.CallContext(call_id=self.call_id, context=self.context.as_json()))
            self._join_conversation()

    @property
    def audio_seconds(self) -> float:
        return self.samples / self.sample_rate if self.sample_rate else 0.0

    def on_audio(self, kind: int, payload: bytes, frames: int) -> None:
        """Take `frames` audio messages of one kind, their payloads joined."""
        rate, payload, ulaw = pcm_of(kind, payload, self.settings.audiosocket_0x10_format)
        pcm = ulaw_to_pcm16(payload) if ulaw else self._assembler.push(payload)
        self.frames += frames
        if not self.started:
            self._start(rate)
        if not pcm:
            return
        samples = None
        if rate != self.sample_rate:
            samples, pcm = self._to_call_rate(rate, pcm16_to_float(pcm))
        self.samples += len(pcm) // 2
        assert self._recording is not None
        self._recording.write(pcm)
        if self.transcript is not None:  # only live transcription needs the samples as numbers
            self.transcript.push(pcm16_to_float(pcm) if samples is None else samples)

    def on_dtmf(self, message: aso.Dtmf) -> None:
        if not self.started:
            self._start(self._default_rate())
        self.dtmf += message.digit
        self.s.metrics.dtmf.inc()
        self._emit(
            events.Dtmf(call_id=self.call_id, digit=message.digit, at=round(self.audio_seconds, 3))
        )

    def _default_rate(self) -> int:
        return 16000 if self.settings.audiosocket_0x10_format == "slin16" else 8000

    def _to_call_rate(self, rate: int, samples: FloatArray) -> tuple[FloatArray, bytes]:
        """Audio at another rate than the call's first frame (unusual): resample it so the
        recording keeps one rate."""
        assert self.sample_rate is not None
        if self._rate_resampler is None or self._rate_resampler.in_rate != rate:
            self.log.warning("sample_rate_changed", was=self.sample_rate, now=rate)
            self._rate_resampler = StreamResampler(rate, self.sample_rate)
        out = self._rate_resampler.push(samples)
        pcm = (np.clip(out, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()
        return out, pcm

    def _start(self, rate: int) -> None:
        self.sample_rate = rate
        self._recording = self.s.recorder.open(self.call_id, rate)
        saturated = self.s.load() >= 1.0
        if self.settings.live_asr and self.s.executor is not None and not saturated:
            self.transcript = LiveTranscript(
                self.call_id,
                self.settings,
                rate,
                self.s.final_beams,
                self.s.load,
                language=self.language,
            )
        elif self.mode != "postcall_only":
            # Past capacity the call is still taken, recorded and queued: only its live
            # transcript is given up, and it says so in its messages.
            self.mode = "postcall_only"
            self.s.metrics.calls_without_live_asr.inc()
            self.log.warning(
                "live_asr_unavailable",
                reason="saturated" if saturated else "no model",
                served_as="postcall_only",
            )
        opened = CallOpened(
            self.call_id,
            self.created_at,
            self.peer,
            rate,
            self.mode,
            self.settings.redis_channel_prefix,
        )
        self._records.start(opened, self._recording)
        if self.context is not None:
            self._records.context(self.call_id, self.context, self.context.fixed_language)
        self._emit(
            events.CallStarted(
                call_id=self.call_id,
                started_at=self.created_at.timestamp(),
                peer=self.peer,
                sample_rate=rate,
                processing_mode=self.mode,
                context=self.context.as_json() if self.context is not None else None,
            )
        )
        self.log.info("call_started", peer=self.peer, sample_rate=rate, mode=self.mode)
        self._join_conversation()

    # -- conversation --------------------------------------------------------------------------

    def _join_conversation(self) -> None:
        """Take part in the conversation the context names (leaving one it named before)."""
        hub = self.s.conversations
        wanted = self.context.conversation if self.context is not None else None
        if hub is None or wanted == self._conversation:
            return
        if self._conversation is not None:
            hub.leave(self._conversation, self.call_id)
        self._conversation = wanted
        if wanted:
            settled = self.transcript.settled_seconds if self.transcript else self.audio_seconds
            hub.join(wanted, self.call_id, self.created_at.timestamp(), settled)
            if self.transcript is None:  # no finals will come: it holds nobody back
                hub.leave(wanted, self.call_id)

    def _settled(self) -> None:
        if self._conversation is not None and self.transcript is not None:
            assert self.s.conversations is not None
            seconds = self.transcript.settled_seconds
            self.s.conversations.settled(self._conversation, self.call_id, seconds)

    # -- live transcription --------------------------------------------------------------------

    @property
    def vad_backlog_seconds(self) -> float:
        return self.transcript.vad_backlog_seconds if self.transcript is not None else 0.0

    def take_vad_audio(self) -> tuple[VadState, FloatArray] | None:
        """The audio VAD has not seen yet, for the server's VAD pass in a worker thread."""
        return self.transcript.take_vad_audio() if self.transcript is not None else None

    def on_vad(self, probs: Sequence[float]) -> None:
        """New speech probabilities: ask the model for what the transcript needs."""
        if self.transcript is not None:
            for ask in self.transcript.on_vad(probs):
                self._submit(ask)
            self._settled()

    def _submit(self, ask: Ask) -> None:
        executor = self.s.executor
        assert executor is not None
        request = ask.request
        if ask.final:
            future = executor.submit(request, priority=0, key=request.batch_key)
            self._finals[ask] = future
            future.add_done_callback(lambda f: self._final_landed(ask, f))
            return
        try:
            future = executor.submit(request, priority=1, key=request.batch_key, sheddable=True)
        except QueueFull:
            self.s.metrics.partials_shed.inc()
            assert self.transcript is not None
            self.transcript.partial_shed(ask)
            return
        future.add_done_callback(lambda f: self._partial_landed(ask, f))

    def _partial_landed(self, ask: Ask, future: asyncio.Future[AsrResult]) -> None:
        assert self.transcript is not None
        if self.ended:
            self.transcript.partial_shed(ask)
            return
        for event in self.transcript.partial_done(ask, _result(future)):
            if isinstance(event, events.Partial):
                self.s.metrics.partials.inc()
            self._emit(event)

    def _final_landed(self, ask: Ask, future: asyncio.Future[AsrResult]) -> None:
        """Hand in a final's result (once: finish() may get there before the callback)."""
        assert self.transcript is not None
        if self._finals.pop(ask, None) is None:
            return
        if future.cancelled() or future.exception() is not None:
            self.log.error("final_failed", error=repr(future.exception()))
        context = self.context or CallContext()
        for event in self.transcript.final_done(ask, _result(future)):
            if not isinstance(event, events.Final):
                self._emit(event)
                continue
            self.s.metrics.finals.inc()
            final = replace(event, role=context.role, conversation=context.conversation)
            message = self._emit(final)
            if self._conversation is not None:
                assert self.s.conversations is not None
                self.s.conversations.final(self._conversation, self.call_id, message)
        self._settled()

    # -- end of call ---------------------------------------------------------------------------

    async def finish(self, reason: str, vad: VadPass) -> None:
        """Flush the audio through VAD and the model, then close the recording, the row and
        the job. `vad` runs the Silero pass off the loop. Runs once per call."""
        if self.ended:
            return
        self.ended = True
        if not self.started:
            self._start(self._default_rate())
        if self.transcript is not None:
            await self._last_finals(self.transcript, vad)
        if self._conversation is not None and self.s.conversations is not None:
            self.s.conversations.leave(self._conversation, self.call_id)
        assert self._recording is not None
        path = await self._recording.finish()
        if self._recording.error:
            self.s.metrics.recording_errors.inc()
        ended_at = datetime.now(UTC)
        duration = (ended_at - self.created_at).total_seconds()
        job_id = None
        try:
            job_id = await self._records.finish(
                self._ended_row(ended_at, duration, reason),
                self._job_row(str(path)),
            )
            if self.mode != "realtime_only":
                self.s.metrics.jobs_written.inc()
        except Exception:  # the call's end must still go out; the journal keeps it for recovery
            self.log.exception("call_records_failed")
        segments = self.transcript.segments_published if self.transcript is not None else 0
        self._emit(
            events.CallEnded(
                call_id=self.call_id,
                ended_at=ended_at.timestamp(),
                duration=round(duration, 3),
                audio_seconds=round(self.audio_seconds, 3),
                reason=reason,
                segments=segments,
                job_id=job_id,
                processing_mode=self.mode,
            )
        )
        self.log.info(
            "call_ended",
            reason=reason,
            duration=round(duration, 3),
            audio_seconds=round(self.audio_seconds, 3),
            segments=segments,
            frames=self.frames,
            job_id=job_id,
            recording=str(path),
        )

    async def _last_finals(self, transcript: LiveTranscript, vad: VadPass) -> None:
        """The audio still unheard through VAD, the open segment closed, every final in."""
        transcript.flush_audio()
        pending = transcript.take_vad_audio()
        probs = list(await vad(*pending)) if pending is not None else []
        for ask in transcript.on_vad(probs, ending=True):
            self._submit(ask)
        if self._finals:
            await asyncio.wait(list(self._finals.values()))
        for ask, future in list(self._finals.items()):
            self._final_landed(ask, future)

    def _job_row(self, audio_path: str) -> JobRow | None:
        """The post-call job, for the modes that ask for one; in the context's language."""
        if self.mode == "realtime_only":
            return None
        language = self.context.fixed_language if self.context is not None else None
        return JobRow(self.call_id, audio_path, language)

    def _ended_row(self, ended_at: datetime, duration: float, reason: str) -> CallEndedRow:
        transcript = self.transcript
        return CallEndedRow(
            call_id=self.call_id,
            ended_at=ended_at,
            duration_s=duration,
            dtmf=self.dtmf,
            live_transcript=" ".join(transcript.finals_text) if transcript is not None else "",
            language=self.language,
            status="interrupted" if reason in ("shutdown", "interrupted") else "ended",
        )

    def _emit(self, event: events.Event) -> dict[str, Any]:
        self._seq += 1
        message = events.encode(event, self._seq)
        self.s.publisher.publish(self.call_id, message, lifecycle=event.LIFECYCLE)
        return message


def _result(future: asyncio.Future[AsrResult]) -> AsrResult | None:
    """The model's result, or None when the request failed or was cancelled."""
    if future.cancelled() or future.exception() is not None:
        return None
    return future.result()
