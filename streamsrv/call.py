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

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from streamsrv import audiosocket as aso
from streamsrv import events
from streamsrv.alerts import AlertWatch
from streamsrv.asr.executor import BatchExecutor
from streamsrv.asr.vad import VadState
from streamsrv.asr.whisper import AsrRequest, AsrResult
from streamsrv.audio import (
    FloatArray,
    pcm16_to_float,
)
from streamsrv.call_audio import CallAudio
from streamsrv.call_records import CallOpened, CallRecords
from streamsrv.config import Settings
from streamsrv.context import CallContext
from streamsrv.conversation import ConversationHub, ConversationLeg
from streamsrv.journal import Journal
from streamsrv.metrics import Metrics
from streamsrv.publish import Publisher
from streamsrv.recordings import Recording, RecordingWriter
from streamsrv.records import CallEndedRow, JobRow
from streamsrv.spool import CallStore
from streamsrv.transcript import LiveTranscript
from streamsrv.transcript_runner import TranscriptRunner

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
    english_only: bool = False  # the live model knows only English: no language to decide


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
        self._leg = ConversationLeg(services.conversations, call_id, self.created_at.timestamp())
        self.transcript: LiveTranscript | None = None
        self._seq = 0
        self._audio = CallAudio(call_id, self.settings.audiosocket_0x10_format)
        self._recording: Recording | None = None
        self._records = CallRecords(services.store, services.journal)
        self._runner: TranscriptRunner | None = None
        rules = self.settings.alert_rules
        self._alerts = AlertWatch(rules, self.settings.alert_on_partials) if rules else None

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
        rate, pcm, samples = self._audio.convert(kind, payload, self.sample_rate)
        self.frames += frames
        if not self.started:
            self._start(rate)
        if not pcm:
            return
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

    def _start(self, rate: int) -> None:
        self.sample_rate = rate
        self._recording = self.s.recorder.open(self.call_id, rate)
        self._transcribe_live(rate)
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
                language=self.language,
            )
        )
        self.log.info("call_started", peer=self.peer, sample_rate=rate, mode=self.mode)
        self._join_conversation()

    def _join_conversation(self) -> None:
        wanted = self.context.conversation if self.context is not None else None
        settled = self.transcript.settled_seconds if self.transcript else self.audio_seconds
        self._leg.follow(wanted, settled, live=self.transcript is not None)

    def _transcribe_live(self, rate: int) -> None:
        """A live transcript when the model has room; past capacity the call is still taken,
        recorded and queued: only its live transcript is given up, and it says so."""
        saturated = self.s.load() >= 1.0
        if self.settings.live_asr and self.s.executor is not None and not saturated:
            self.transcript = LiveTranscript(
                self.call_id,
                self.settings,
                rate,
                self.s.final_beams,
                self.s.load,
                language=self.language or ("en" if self.s.english_only else None),
            )
            self._runner = TranscriptRunner(
                self.transcript,
                self.s.executor,
                self.s.metrics,
                self._emit_live,
                lambda: self.ended,
                self.log,
            )
        elif self.mode != "postcall_only":
            self.mode = "postcall_only"
            self.s.metrics.calls_without_live_asr.inc()
            self.log.warning(
                "live_asr_unavailable",
                reason="saturated" if saturated else "no model",
                served_as="postcall_only",
            )

    # -- live transcription --------------------------------------------------------------------

    @property
    def vad_backlog_seconds(self) -> float:
        return self.transcript.vad_backlog_seconds if self.transcript is not None else 0.0

    def take_vad_audio(self) -> tuple[VadState, FloatArray] | None:
        """The audio VAD has not seen yet, for the server's VAD pass in a worker thread."""
        return self.transcript.take_vad_audio() if self.transcript is not None else None

    def on_vad(self, probs: Sequence[float]) -> None:
        """New speech probabilities: ask the model for what the transcript needs."""
        if self._runner is not None and self.transcript is not None:
            self._runner.on_vad(probs)
            if self._leg.conversation:
                self._leg.settled(self.transcript.settled_seconds)

    def _emit_live(self, event: events.Event) -> None:
        """An event of the live transcript: a final carries the call's role and conversation,
        and goes to the conversation too; then how far the call has settled. The alerts its
        text brings follow it, on the conversation too."""
        if isinstance(event, events.Final):
            context = self.context or CallContext()
            final = replace(event, role=context.role, conversation=context.conversation)
            self._leg.final(self._emit(final))
            assert self.transcript is not None
            self._leg.settled(self.transcript.settled_seconds)
        else:
            self._emit(event)
        if self._alerts is not None:
            for alert in self._alerts.check(event, self.language):
                self.s.metrics.alerts.labels(alert.source).inc()
                self.log.warning(
                    "alert", phrase=alert.phrase, label=alert.label, segment=alert.segment
                )
                self._leg.alert(self._emit(alert))

    # -- end of call ---------------------------------------------------------------------------

    async def finish(self, reason: str, vad: VadPass) -> None:
        """Flush the audio through VAD and the model, then close the recording, the row and
        the job. `vad` runs the Silero pass off the loop. Runs once per call."""
        if self.ended:
            return
        self.ended = True
        if not self.started:
            self._start(self._default_rate())
        if self._runner is not None:
            await self._last_finals(self._runner, vad)
        self._leg.leave()
        assert self._recording is not None
        path = await self._recording.finish()
        if self._recording.error:
            self.s.metrics.recording_errors.inc()
        ended_at = datetime.now(UTC)
        duration = (ended_at - self.created_at).total_seconds()
        job_id = await self._write_end(ended_at, duration, reason, str(path))
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

    async def _last_finals(self, runner: TranscriptRunner, vad: VadPass) -> None:
        """The audio still unheard through VAD, the open segment closed, every final in."""
        runner.transcript.flush_audio()
        pending = runner.transcript.take_vad_audio()
        probs = list(await vad(*pending)) if pending is not None else []
        runner.on_vad(probs, ending=True)
        await runner.last_finals()

    async def _write_end(
        self, ended_at: datetime, duration: float, reason: str, audio_path: str
    ) -> int | None:
        """The job and the final row; the job's id (None: spooled, failed or none asked)."""
        transcript = self.transcript
        ended = CallEndedRow(
            self.call_id,
            ended_at,
            duration,
            self.dtmf,
            " ".join(transcript.finals_text) if transcript is not None else "",
            self.language,
            "interrupted" if reason in ("shutdown", "interrupted") else "ended",
        )
        try:
            job_id = await self._records.finish(ended, self._job(audio_path))
        except Exception:  # the call's end must still go out; the journal keeps it for recovery
            self.log.exception("call_records_failed")
            return None
        if self.mode != "realtime_only":
            self.s.metrics.jobs_written.inc()
        return job_id

    def _job(self, audio_path: str) -> JobRow | None:
        """The post-call job, for the modes that ask for one; in the context's language."""
        if self.mode == "realtime_only":
            return None
        language = self.context.fixed_language if self.context is not None else None
        return JobRow(self.call_id, audio_path, language)

    def _emit(self, event: events.Event) -> dict[str, Any]:
        self._seq += 1
        return self.s.publisher.emit(event, self._seq)
