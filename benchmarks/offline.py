"""The same calls transcribed offline, whole, with the same model and settings: what streaming
costs in accuracy is the live final WER minus this one.

faster-whisper's own transcribe() (with its Silero VAD filter) over the whole call is the
reference pipeline; it runs after the server has stopped, so it never competes with it for CPU.
"""

from __future__ import annotations

import hashlib

import numpy as np

from streamsrv.asr.models import resolve_model
from streamsrv.config import Settings


class OfflineTranscriber:
    """One model, loaded on first use; transcripts cached by audio and settings, so a sweep
    transcribes each call once however many runs replay it."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, str, int], object] = {}
        self._cache: dict[tuple[str, ...], str] = {}

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
        """Text of 8 kHz 16-bit PCM in `language`, resampled to 16 kHz with soxr as the server
        does."""
        import soxr

        model, model_key = self._model(settings)
        key = (
            model_key,
            str(settings.final_beam(settings.device)),
            str(settings.condition_on_previous_text),
            language,
            hashlib.sha1(pcm8k).hexdigest(),
        )
        if key not in self._cache:
            audio = np.frombuffer(pcm8k, dtype="<i2").astype(np.float32) / 32768
            segments, _info = model.transcribe(  # type: ignore[attr-defined]
                soxr.resample(audio, 8000, 16000),
                language=language,
                beam_size=settings.final_beam(settings.device),
                vad_filter=True,
                condition_on_previous_text=settings.condition_on_previous_text,
            )
            self._cache[key] = " ".join(s.text.strip() for s in segments)
        return self._cache[key]
