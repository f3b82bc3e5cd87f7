"""Real recorded telephone speech with reference texts: Debian's Asterisk core sounds.

asterisk-core-sounds-en-wav ships the prompts (8 kHz 16-bit WAV); asterisk-core-sounds-en ships
their texts. Joined with pauses between them they make calls whose every word is known: the
demo, the end-to-end tests and the benchmarks are built from them. The same prompts exist in
Spanish (asterisk-core-sounds-es{,-wav}), under the same names: the post-call translation is
tested on them, against the English texts.
"""

from __future__ import annotations

import gzip
import random
import wave
from dataclasses import dataclass
from pathlib import Path

RATE = 8000


def sounds_dir(language: str = "en") -> Path:
    return Path("/usr/share/asterisk/sounds") / language


def texts_file(language: str = "en") -> Path:
    return Path(f"/usr/share/doc/asterisk-core-sounds-{language}/core-sounds-{language}.txt.gz")


def packages(language: str = "en") -> str:
    return f"asterisk-core-sounds-{language}-wav asterisk-core-sounds-{language}"


class CorpusMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Utterance:
    name: str
    text: str
    start: float  # seconds from the call's first sample
    end: float


@dataclass(frozen=True)
class RecordedCall:
    pcm: bytes  # 16-bit little-endian mono at RATE
    utterances: list[Utterance]

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / RATE

    @property
    def reference(self) -> str:
        return " ".join(u.text for u in self.utterances)


def texts(language: str = "en") -> dict[str, str]:
    """Prompt name -> spoken text, for the prompts that are speech and have a WAV file."""
    sounds, file = sounds_dir(language), texts_file(language)
    if not file.exists() or not sounds.is_dir():
        raise CorpusMissing(f"install the Debian packages {packages(language)}")
    out: dict[str, str] = {}
    with gzip.open(file, "rt", encoding="utf-8", errors="replace") as lines:
        entries = [line.partition(":") for line in lines if not line.startswith(";")]
    for name, sep, text in entries:
        text = text.strip()
        if not sep or "/" in name or not text or text.startswith("["):
            continue
        if (sounds / f"{name.strip()}.wav").exists():
            out[name.strip()] = text
    return out


def read_prompt(name: str, language: str = "en") -> bytes:
    with wave.open(str(sounds_dir(language) / f"{name}.wav"), "rb") as w:
        if w.getframerate() != RATE or w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise CorpusMissing(f"{name}.wav is not 8 kHz 16-bit mono")
        return w.readframes(w.getnframes())


def build_call(
    names: list[str], pause: float = 1.0, noise: float = 0.0, seed: int = 0, language: str = "en"
) -> RecordedCall:
    """Prompts one after another with `pause` seconds between them (and before the first),
    optionally over low line noise of the given RMS (in 16-bit units)."""
    import numpy as np

    all_texts = texts(language)
    rng = np.random.default_rng(seed)
    gap = np.zeros(int(pause * RATE), dtype=np.int16)
    parts: list[np.ndarray] = [gap]
    utterances = []
    position = len(gap)
    for name in names:
        audio = np.frombuffer(read_prompt(name, language), dtype="<i2")
        utterances.append(
            Utterance(name, all_texts[name], position / RATE, (position + len(audio)) / RATE)
        )
        parts += [audio, gap]
        position += len(audio) + len(gap)
    pcm = np.concatenate(parts).astype(np.int32)
    if noise:
        pcm += rng.normal(0, noise, len(pcm)).astype(np.int32)
    return RecordedCall(np.clip(pcm, -32768, 32767).astype("<i2").tobytes(), utterances)


def spoken_prompts(
    min_words: int = 4, max_words: int = 30, also_in: tuple[str, ...] = ()
) -> list[str]:
    """Prompts of a useful length (in English words) for calls, in the order of the texts file;
    with `also_in`, only those recorded in those languages too (the same content in each)."""
    others = [texts(language) for language in also_in]
    return [
        name
        for name, text in texts().items()
        if min_words <= len(text.split()) <= max_words and all(name in o for o in others)
    ]


def pick_prompts(
    count: int, seed: int, min_words: int = 4, max_words: int = 30, also_in: tuple[str, ...] = ()
) -> list[str]:
    """A reproducible choice of spoken prompts of a useful length."""
    candidates = sorted(spoken_prompts(min_words, max_words, also_in))
    return random.Random(seed).sample(candidates, count)
