"""One call's state: its audio, its speech segments, its requests to the model, its messages.

The server feeds a Call decoded AudioSocket messages (synchronously, on the event loop: only
cheap work here) and calls tick() with fresh VAD probabilities. The Call decides when to ask the
shared executor for an update:

- while a segment is spoken, a partial for the whole open segment once enough new audio arrived
  (PARTIAL_INTERVAL, stretched under load up to STREAMING_CHUNK_SIZE), one request at a time;
- when VAD closes the segment (or it grows past MAX_SEGMENT_SECONDS), one final for exactly that
  audio. Finals are never shed and are published strictly in segment order.

Segment numbers are given out when a segment first publishes text, so silence and noise use no
number. A partial publishes only for the oldest segment without a final (the open one, or the
one whose final is pending), so numbers always follow the audio's order. A final with no text
ends a segment that had a partial.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import structlog

from streamsrv import audiosocket as aso
from streamsrv import events
from streamsrv.asr.executor import BatchExecutor, QueueFull
from streamsrv.asr.segmenter import Segment, Segmenter
from streamsrv.asr.vad import VadState
from streamsrv.asr.whisper import AsrRequest, AsrResult
from streamsrv.audio import (
    MODEL_RATE,
    FloatArray,
    PcmAssembler,
    StreamResampler,
    pcm16_to_float,
    ulaw_to_pcm16,
)
from streamsrv.config import Settings
from streamsrv.journal import Journal
from streamsrv.metrics import Metrics
from streamsrv.publish import Publisher
from streamsrv.recordings import Recording, RecordingWriter
from streamsrv.records import CallEndedRow, CallStartedRow, JobRow
from streamsrv.ringbuffer import RingBuffer
from streamsrv.spool import CallStore

log = structlog.get_logger(__name__)

PROMPT_CHARS = 200
MIN_PARTIAL_SECONDS = 0.3


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


@dataclass
class _PendingFinal:
    segment: Segment
    future: asyncio.Future[AsrResult]
    number: int | None
    shown: str  # the last partial text published for it


@dataclass
class _Track:
    """The live-transcription state of one call."""

    segmenter: Segmenter
    ring: RingBuffer
    resampler: StreamResampler
    # the latest finals with text, oldest first, at most FINAL_CONTEXT_SEGMENTS of them;
    # a final without text empties it
    recent_finals: deque[tuple[Segment, str]]
    vad: VadState = field(default_factory=VadState)
    vad_pending: list[FloatArray] = field(default_factory=list)
    finals: deque[_PendingFinal] = field(default_factory=deque)
    partial_inflight: asyncio.Future[AsrResult] | None = None
    last_partial_end: int = 0
    open_number: int | None = None
    open_text: str = ""


def final_context(
    recent: Sequence[tuple[Segment, str]], segment: Segment, window: int, held_from: int
) -> tuple[int, str] | None:
    """Where a final's window may start and the text said from there: the run of most recent
    finals whose audio is still held (from sample `held_from`) and fits, with `segment`, in
    `window` samples, the length every final window is padded to anyway, so the context costs
    no encoder time. None when not even the latest one fits."""
    start: int | None = None
    texts: list[str] = []
    for before, text in reversed(recent):
        if before.start < max(segment.end - window, held_from):
            break
        start = before.start
        texts.insert(0, text)
    return None if start is None else (start, " ".join(texts))


def pcm_of(kind: int, payload: bytes, format_0x10: str) -> tuple[int, bytes, bool]:
    """(sample rate, payload, is u-law) of an audio message, by kind and the 0x10 setting."""
    if kind == aso.Kind.AUDIO_8K:
        if format_0x10 == "ulaw":
            return 8000, payload, True
        if format_0x10 == "slin16":
            return 16000, payload, False
    return aso.AUDIO_RATES[kind], payload, False


class Call:
    def __init__(self, services: CallServices, call_id: str, peer: str) -> None:
        self.s = services
        self.settings = services.settings
        self.call_id = call_id
        self.peer = peer
        self.log = log.bind(call_id=call_id)
        self.mode = self.settings.default_processing_mode
        self.created_at = datetime.now(UTC)
        self.started_monotonic = time.monotonic()
        self.sample_rate: int | None = None
        self.samples = 0  # samples at the call's rate, as recorded
        self.frames = 0
        self.dtmf = ""
        self.language: str | None = (
            None if self.settings.language == "auto" else self.settings.language
        )
        self.finals_text: list[str] = []
        self.segments_published = 0
        self.ended = False
        self._seq = 0
        self._assembler = PcmAssembler()
        self._recording: Recording | None = None
        self._row_written: asyncio.Task[None] | None = None
        self._track: _Track | None = None
        self._rate_resampler: StreamResampler | None = None

    # -- messages in -------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self.sample_rate is not None

    @property
    def transcribing_live(self) -> bool:
        """Whether this call's audio goes to live transcription (known once it started)."""
        return self._track is not None

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
        if self._track is not None:  # only live transcription needs the samples as numbers
            if samples is None:
                samples = pcm16_to_float(pcm)
            resampled = self._track.resampler.push(samples)
            self._track.ring.append(resampled)
            self._track.vad_pending.append(resampled)

    def on_dtmf(self, message: aso.Dtmf) -> None:
        if not self.started:
            self._start(self._default_rate())
        self.dtmf += message.digit
        self.s.metrics.dtmf.inc()
        self._emit(
            events.Dtmf(call_id=self.call_id, digit=message.digit, at=round(self.audio_seconds, 3))
        )

    @property
    def audio_seconds(self) -> float:
        return self.samples / self.sample_rate if self.sample_rate else 0.0

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
            st = self.settings
            self._track = _Track(
                segmenter=Segmenter(
                    st.vad_threshold,
                    st.vad_min_silence_ms,
                    st.vad_speech_pad_ms,
                    st.vad_min_speech_ms,
                    st.max_segment_seconds,
                ),
                ring=RingBuffer(int((st.max_segment_seconds + 10) * MODEL_RATE)),
                resampler=StreamResampler(rate),
                recent_finals=deque(maxlen=st.final_context_segments),
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
        self._row_written = asyncio.get_running_loop().create_task(self._record_start(rate))
        self._emit(
            events.CallStarted(
                call_id=self.call_id,
                started_at=self.created_at.timestamp(),
                peer=self.peer,
                sample_rate=rate,
                processing_mode=self.mode,
            )
        )
        self.log.info("call_started", peer=self.peer, sample_rate=rate, mode=self.mode)

    async def _record_start(self, rate: int) -> None:
        """Journal the open call (so a crash cannot lose it), then write its row."""
        assert self._recording is not None
        await self._recording.flush()  # the file exists, under the name it really got
        info = {
            "created_at": self.created_at.isoformat(),
            "peer": self.peer,
            "sample_rate": rate,
            "processing_mode": self.mode,
            "recording": str(self._recording.path),
            "channel_prefix": self.settings.redis_channel_prefix,
        }
        await self.s.journal.opened(self.call_id, info)
        await self.s.store.call_started(
            CallStartedRow(
                call_id=self.call_id,
                created_at=self.created_at,
                peer=self.peer,
                sample_rate=rate,
                processing_mode=self.mode,
            )
        )

    # -- live transcription --------------------------------------------------------------------

    @property
    def vad_backlog_seconds(self) -> float:
        track = self._track
        if track is None:
            return 0.0
        return sum(len(a) for a in track.vad_pending) / MODEL_RATE

    def take_vad_audio(self) -> tuple[VadState, FloatArray] | None:
        """The audio VAD has not seen yet, for the server's VAD pass in a worker thread."""
        track = self._track
        if track is None or not track.vad_pending:
            return None
        audio = np.concatenate(track.vad_pending)
        track.vad_pending.clear()
        return track.vad, audio

    def on_vad(self, probs: list[float]) -> None:
        """New speech probabilities: close segments, ask for finals and partials."""
        track = self._track
        if track is None:
            return
        for segment in track.segmenter.push(probs):
            self._request_final(track, segment)
        self._maybe_partial(track)

    def _request_final(self, track: _Track, segment: Segment) -> None:
        assert self.s.executor is not None
        context = self._final_context(track, segment)
        start, prefix = context or (segment.start, "")
        request = AsrRequest(
            self.call_id,
            track.ring.read(start, segment.end),
            final=True,
            language=self.language,
            prompt=self._prompt(),
            prefix=prefix,
            context=segment.start - start,
            beam_size=self.s.final_beams[0 if context else 1],
        )
        future = self.s.executor.submit(request, priority=0, key=request.batch_key)
        track.finals.append(_PendingFinal(segment, future, track.open_number, track.open_text))
        track.open_number, track.open_text = None, ""
        track.last_partial_end = segment.end
        future.add_done_callback(lambda _: self._publish_finals(track))

    def _final_context(self, track: _Track, segment: Segment) -> tuple[int, str] | None:
        """The previous FINAL_CONTEXT_SEGMENTS segments that fit (see final_context), once
        their finals are in (none pending). Two by default: on the corpus calls two gave fewer
        errors than one or three (benchmarks/RESULTS.md)."""
        if not self.settings.final_context or track.finals:
            return None
        window = int(self.settings.min_window_seconds * MODEL_RATE)
        return final_context(track.recent_finals, segment, window, track.ring.start)

    def _maybe_partial(self, track: _Track) -> None:
        start = track.segmenter.open_start
        if start is None or track.partial_inflight is not None or self.s.executor is None:
            return
        end = track.ring.end
        interval = self._partial_interval()
        if end - start < MIN_PARTIAL_SECONDS * MODEL_RATE:
            return
        if end - max(track.last_partial_end, start) < interval * MODEL_RATE:
            return
        track.last_partial_end = end
        request = AsrRequest(
            self.call_id,
            track.ring.read(start, end),
            final=False,
            language=self.language,
            prompt=self._prompt(),
        )
        try:
            future = self.s.executor.submit(
                request, priority=1, key=request.batch_key, sheddable=True
            )
        except QueueFull:
            self.s.metrics.partials_shed.inc()
            return
        track.partial_inflight = future
        future.add_done_callback(lambda f: self._on_partial(track, f, start, end))

    def _partial_interval(self) -> float:
        """PARTIAL_INTERVAL when idle, up to STREAMING_CHUNK_SIZE's seconds when saturated."""
        longest = self.settings.streaming_chunk_size / 16000  # bytes of 8 kHz 16-bit audio
        shortest = min(self.settings.partial_interval, longest)
        return shortest + (longest - shortest) * self.s.load()

    def _on_partial(
        self, track: _Track, future: asyncio.Future[AsrResult], start: int, end: int
    ) -> None:
        track.partial_inflight = None
        if future.cancelled() or future.exception() is not None or self.ended:
            return
        result = future.result()
        self._learn_language(result)
        if not result.text:
            return
        if track.segmenter.open_start == start and not track.finals:
            if result.text == track.open_text:
                return
            if track.open_number is None:
                track.open_number = self._next_segment()
            number, track.open_text = track.open_number, result.text
        elif track.finals and track.finals[0].segment.start == start:
            # The segment closed while its partial ran: until its final comes, the partial
            # still shows its words. Only the oldest pending segment, so numbers stay in order.
            head = track.finals[0]
            if result.text == head.shown:
                return
            if head.number is None:
                head.number = self._next_segment()
            number, head.shown = head.number, result.text
        else:
            return
        self.s.metrics.partials.inc()
        self._emit(
            events.Partial(
                call_id=self.call_id,
                segment=number,
                text=result.text,
                start=round(start / MODEL_RATE, 3),
                end=round(end / MODEL_RATE, 3),
                audio_end=round(track.ring.end / MODEL_RATE, 3),
            )
        )

    def _publish_finals(self, track: _Track) -> None:
        """Publish the finals whose results are in, strictly in segment order."""
        while track.finals and track.finals[0].future.done():
            pending = track.finals.popleft()
            future = pending.future
            if future.cancelled() or future.exception() is not None:
                self.log.error("final_failed", error=repr(future.exception()))
                result = None
            else:
                result = future.result()
                self._learn_language(result)
            text = result.text if result is not None else ""
            if text:
                track.recent_finals.append((pending.segment, text))
            else:  # what was not speech leads no later final
                track.recent_finals.clear()
            number = pending.number
            if number is None:
                if not text:
                    continue
                number = self._next_segment()
            if text:
                self.finals_text.append(text)
            seconds = pending.segment.start / MODEL_RATE
            self.s.metrics.finals.inc()
            self._emit(
                events.Final(
                    call_id=self.call_id,
                    segment=number,
                    text=text,
                    start=round(seconds, 3),
                    end=round(pending.segment.end / MODEL_RATE, 3),
                    language=result.language if result else self.language,
                    words=None
                    if result is None
                    else [
                        events.WordTime(
                            w.word,
                            round(seconds + w.start, 3),
                            round(seconds + w.end, 3),
                            w.probability,
                        )
                        for w in result.words
                    ],
                    avg_logprob=None if result is None else round(result.avg_logprob, 4),
                    no_speech_prob=None if result is None else round(result.no_speech_prob, 4),
                )
            )

    def _learn_language(self, result: AsrResult) -> None:
        if self.language is None and result.language:
            self.language = result.language
            self.log.info("language_detected", language=result.language)

    def _prompt(self) -> str:
        if not self.settings.condition_on_previous_text:
            return ""
        return " ".join(self.finals_text)[-PROMPT_CHARS:]

    def _next_segment(self) -> int:
        number = self.segments_published
        self.segments_published += 1
        return number

    # -- end of call ---------------------------------------------------------------------------

    async def finish(self, reason: str, vad: Callable[[VadState, FloatArray], Any]) -> None:
        """Flush the audio through VAD and the model, then close the recording, the row and
        the job. `vad` runs the Silero pass off the loop. Runs once per call."""
        if self.ended:
            return
        self.ended = True
        if not self.started:
            self._start(self._default_rate())
        track = self._track
        if track is not None:
            tail = track.resampler.flush()
            track.ring.append(tail)
            track.vad_pending.append(tail)
            pending = self.take_vad_audio()
            if pending is not None:
                probs = await vad(*pending)
                for segment in track.segmenter.push(list(probs)):
                    self._request_final(track, segment)
            for segment in track.segmenter.flush():
                self._request_final(track, segment)
            waiting = [p.future for p in track.finals]
            if waiting:
                await asyncio.wait(waiting)
            self._publish_finals(track)
        status = "interrupted" if reason in ("shutdown", "interrupted") else "ended"
        assert self._recording is not None
        path = await self._recording.finish()
        if self._recording.error:
            self.s.metrics.recording_errors.inc()
        job_id = None
        ended_at = datetime.now(UTC)
        duration = (ended_at - self.created_at).total_seconds()
        transcript = " ".join(self.finals_text)
        try:
            if self._row_written is not None:
                await self._row_written
            if self.mode != "realtime_only":
                job_id = await self.s.store.enqueue_job(
                    JobRow(call_id=self.call_id, audio_path=str(path))
                )
                self.s.metrics.jobs_written.inc()
            await self.s.store.call_ended(
                CallEndedRow(
                    call_id=self.call_id,
                    ended_at=ended_at,
                    duration_s=duration,
                    dtmf=self.dtmf,
                    live_transcript=transcript,
                    language=self.language,
                    status=status,
                )
            )
            await self.s.journal.closed(self.call_id)
        except Exception:  # the call's end must still go out; the journal keeps it for recovery
            self.log.exception("call_records_failed")
        self._emit(
            events.CallEnded(
                call_id=self.call_id,
                ended_at=ended_at.timestamp(),
                duration=round(duration, 3),
                audio_seconds=round(self.audio_seconds, 3),
                reason=reason,
                segments=self.segments_published,
                job_id=job_id,
                processing_mode=self.mode,
            )
        )
        self.log.info(
            "call_ended",
            reason=reason,
            duration=round(duration, 3),
            audio_seconds=round(self.audio_seconds, 3),
            segments=self.segments_published,
            frames=self.frames,
            job_id=job_id,
            recording=str(path),
        )

    def _emit(self, event: events.Event) -> None:
        self._seq += 1
        self.s.publisher.emit(event, self._seq)
