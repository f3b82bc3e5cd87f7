"""The same calls transcribed offline, whole, with the same model and settings: what streaming
costs in accuracy is the live final WER minus this one.

faster-whisper's own transcribe() (with its Silero VAD filter) over the whole call is the
reference pipeline; it runs after the server has stopped, so it never competes with it for CPU.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from streamsrv.asr.models import resolve_model
from streamsrv.config import Settings
from streamsrv.wer import normalise


class OfflineTranscriber:
    """One model, loaded on first use; transcripts cached by audio and settings, so a sweep
    transcribes each call once however many runs replay it."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, str, int], object] = {}
        self._cache: dict[tuple[str, ...], str] = {}
        self._heard: dict[tuple[str, ...], list[tuple[str, float]]] = {}

    def _model(self, settings: Settings) -> tuple[object, str]:
        device = settings.device
        path = resolve_model(settings.realtime_model_name(device), settings.model_dir)
        key = (path, device, settings.realtime_whisper_compute_type, settings.cpu_threads)
        if key not in self._models:
            from faster_whisper import WhisperModel

            self._models[key] = WhisperModel(
                path,
                device=device,
                compute_type=settings.realtime_whisper_compute_type,
                cpu_threads=settings.cpu_threads,
            )
        return self._models[key], "|".join(map(str, key))

    def transcribe(self, pcm8k: bytes, settings: Settings, language: str = "en") -> str:
        """Text of 8 kHz 16-bit PCM in `language`."""
        model, model_key = self._model(settings)
        key = (
            model_key,
            str(settings.final_beam(settings.device)),
            str(settings.condition_on_previous_text),
            language,
            hashlib.sha1(pcm8k).hexdigest(),
        )
        if key not in self._cache:
            segments = _segments(
                model,
                pcm8k,
                settings,
                language,
                vad_filter=True,
                condition_on_previous_text=settings.condition_on_previous_text,
            )
            self._cache[key] = " ".join(s.text.strip() for s in segments)
        return self._cache[key]

    def heard_words(
        self, pcm8k: bytes, settings: Settings, language: str = "en"
    ) -> list[tuple[str, float]]:
        """The normalised words of one utterance's 8 kHz PCM, each with where it ends (seconds
        into `pcm8k`) by faster-whisper's word timestamps: what the lags time words by."""
        model, model_key = self._model(settings)
        beam = str(settings.final_beam(settings.device))
        key = (model_key, beam, language, hashlib.sha1(pcm8k).hexdigest())
        if key not in self._heard:
            segments = _segments(model, pcm8k, settings, language, word_timestamps=True)
            words = [w for s in segments for w in s.words]
            self._heard[key] = [(word, float(w.end)) for w in words for word in normalise(w.word)]
        return self._heard[key]


def _segments(
    model: Any, pcm8k: bytes, settings: Settings, language: str, **options: Any
) -> list[Any]:
    """faster-whisper's segments of 8 kHz 16-bit PCM, resampled to 16 kHz with soxr as the
    server does, at the live finals' beam size."""
    import soxr

    audio = np.frombuffer(pcm8k, dtype="<i2").astype(np.float32) / 32768
    segments, _info = model.transcribe(
        soxr.resample(audio, 8000, 16000),
        language=language,
        beam_size=settings.final_beam(settings.device),
        **options,
    )
    return list(segments)
