"""The model work of one post-call job: decode, transcribe in batches, translate, insights.

Everything here is synchronous and runs off the event loop. The post-call model is loaded once
per process, on the first job that needs it, and shared by WORKER_CONCURRENCY jobs (CTranslate2
runs that many in parallel). Each job gets its own BatchedInferencePipeline, which holds state
between batches: VAD cuts the recording into speech, the speech is packed into windows of up to
30 s, and BATCH_SIZE windows go through the model at once. Silence never reaches the model, and
windows are decoded side by side instead of one after the other as in WhisperModel.transcribe().
"""

from __future__ import annotations

import io
import os
import threading
import time
import wave
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from streamsrv.config import Settings
from streamsrv.postcall import insights

SAMPLE_RATE = 16000


@dataclass
class Outcome:
    """What the pass found in one recording; `insights` lacks DTMF (it is not in the audio)."""

    transcript: str
    segments: list[dict[str, Any]]
    language: str
    translation: str | None
    insights: dict[str, Any] | None
    model: str
    timings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "transcript": self.transcript,
            "segments": self.segments,
            "language": self.language,
            "translation": self.translation,
            "insights": self.insights,
            "model": self.model,
            "timings": self.timings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        return cls(**data)


def recorded_samples(data: bytes) -> npt.NDArray[Any] | None:
    """The 16-bit samples of a PCM WAV as stored (any rate), or None for any other format."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                return None
            return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)
    except (wave.Error, EOFError):
        return None


class PostcallModel:
    """The post-call Whisper model, loaded on first use; process() is safe from many threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = settings.device
        self.name = settings.postcall_model_name(self.device)
        self.compute_type = settings.postcall_compute_type(self.device)
        self.label = f"{self.name} ({self.device}, {self.compute_type})"
        self.runs = 0  # recordings transcribed by this instance (the cache's tests count them)
        self._model: Any = None
        self._lock = threading.Lock()

    def fingerprint(self, language: str | None) -> dict[str, Any]:
        """Everything besides the audio that changes the outcome (the result cache's key)."""
        s = self.settings
        return {
            "version": 1,
            "model": self.name,
            "device": self.device,
            "compute_type": self.compute_type,
            "beam_size": s.postcall_beam_size,
            "batch_size": s.batch_size,
            "language": self.language_hint(language),
            "translation": s.include_translation,
            "insights": s.include_insights,
            "vad": [s.vad_threshold, s.vad_min_silence_ms, s.vad_min_speech_ms],
        }

    def language_hint(self, language: str | None) -> str | None:
        """The job's language, else LANGUAGE; None means detect."""
        hint = language or self.settings.language
        return None if hint == "auto" else hint

    def load(self) -> float:
        """Load the model if this process has not yet; returns the seconds it took."""
        with self._lock:
            if self._model is not None:
                return 0.0
            from faster_whisper import WhisperModel

            from streamsrv.asr.models import resolve_model

            started = time.perf_counter()
            path = resolve_model(self.name, self.settings.model_dir)
            self._model = WhisperModel(
                path,
                device=self.device,
                compute_type=self.compute_type,
                cpu_threads=self.cpu_threads(),
                num_workers=self.settings.worker_concurrency,
            )
            return time.perf_counter() - started

    def cpu_threads(self) -> int:
        """Threads per job on a CPU: CPU_THREADS, or with 0 the cores shared out among the
        WORKER_CONCURRENCY jobs (each job's threads would otherwise fight the others')."""
        s = self.settings
        if s.cpu_threads or self.device != "cpu" or s.worker_concurrency == 1:
            return s.cpu_threads
        return max(1, len(os.sched_getaffinity(0)) // s.worker_concurrency)

    @property
    def model(self) -> Any:
        """The loaded faster-whisper WhisperModel (load() first)."""
        if self._model is None:
            raise RuntimeError("PostcallModel.load() was not called")
        return self._model

    def process(self, data: bytes, language: str | None) -> Outcome:
        """Transcribe (and translate, and measure) one recording given as its file's bytes."""
        from faster_whisper import BatchedInferencePipeline, decode_audio

        s = self.settings
        started = time.perf_counter()
        load = self.load()
        audio: npt.NDArray[np.float32] = decode_audio(io.BytesIO(data), sampling_rate=SAMPLE_RATE)
        decoded = time.perf_counter()
        pipeline = BatchedInferencePipeline(self.model)
        options: dict[str, Any] = {
            "batch_size": s.batch_size,
            "beam_size": s.postcall_beam_size,
            "vad_filter": True,
        }
        segments, info = pipeline.transcribe(
            audio, language=self.language_hint(language), word_timestamps=True, **options
        )
        found = [_segment_json(segment) for segment in segments]
        detected: str = info.language
        transcribed = time.perf_counter()

        translation = None
        if s.include_translation and self.model.model.is_multilingual and detected != "en":
            english, _ = pipeline.transcribe(audio, language=detected, task="translate", **options)
            translation = " ".join(segment.text.strip() for segment in english).strip()
        translated = time.perf_counter()

        transcript = " ".join(seg["text"] for seg in found if seg["text"]).strip()
        found_insights = None
        if s.include_insights:
            recorded = recorded_samples(data)
            found_insights = insights.compute(
                audio,
                recorded if recorded is not None else audio,
                transcript,
                sum(len(seg["words"]) for seg in found),
                s,
            )
        finished = time.perf_counter()
        with self._lock:
            self.runs += 1

        marks = (started, load, decoded, transcribed, translated, finished)
        timings = _timings(*marks, audio_seconds=len(audio) / SAMPLE_RATE)
        return Outcome(
            transcript, found, detected, translation, found_insights, self.label, timings
        )


def _timings(
    started: float,
    load: float,
    decoded: float,
    transcribed: float,
    translated: float,
    finished: float,
    audio_seconds: float,
) -> dict[str, Any]:
    """Seconds per stage of one job (`load`: the model's, when this job loaded it)."""
    total = finished - started
    return {
        "load": round(load, 3),
        "decode": round(decoded - started - load, 3),
        "transcribe": round(transcribed - decoded, 3),
        "translate": round(translated - transcribed, 3),
        "insights": round(finished - translated, 3),
        "total": round(total, 3),
        "audio_seconds": round(audio_seconds, 3),
        "real_time_factor": round(total / audio_seconds, 4) if audio_seconds else 0.0,
        "cached": False,
    }


def _segment_json(segment: Any) -> dict[str, Any]:
    return {
        "start": round(float(segment.start), 2),
        "end": round(float(segment.end), 2),
        "text": segment.text.strip(),
        "avg_logprob": round(float(segment.avg_logprob), 4),
        "no_speech_prob": round(float(segment.no_speech_prob), 4),
        "words": [
            {
                "word": word.word.strip(),
                "start": round(float(word.start), 2),
                "end": round(float(word.end), 2),
                "probability": round(float(word.probability), 3),
            }
            for word in segment.words or []
        ],
    }
