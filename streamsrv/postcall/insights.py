"""Call insights computed from the recording and its transcript: no model beyond Silero VAD.

Speech is what Silero finds with the live path's VAD settings (VAD_THRESHOLD,
VAD_MIN_SILENCE_MS, VAD_MIN_SPEECH_MS) and no padding, so that speech and silence times measure
the audio, not the model's context. A recording is one mixed channel, so the talk ratio is the
share of the call in which someone speaks (not one party against the other), and the longest
silence is the longest gap between two stretches of speech (dead air during the call; the time
before the first and after the last word is not counted). Levels are measured on the samples as
recorded: RMS and peak in dBFS (full scale = 0 dB; digital silence reads as the -120 dB floor),
and clipping as the fraction of samples at full scale.

Salient terms are the most frequent content words of the transcript: lower-cased words of three
letters or more that are not in an English stop-word list, ranked by count, ties by first use.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt

from streamsrv.config import Settings

SAMPLE_RATE = 16000
DB_FLOOR = -120.0
TOP_TERMS = 10

# Kept as text (split below) so the list stays a readable paragraph.
_STOP_WORDS_TEXT = """
a about above after again against all also am an and any are aren't as at be because been
before being below between both but by bye can can't cannot come could couldn't did didn't
do does doesn't doing don't down during each eight else ever few five for four from further
get gets go going goodbye got had hadn't has hasn't have haven't having he he'd he'll he's
hello her here here's hers herself hi him himself his hmm how how's however hundred i i'd
i'll i'm i've if in into is isn't it it's its itself just know let's like make may me might
more most must mustn't my myself need nine no nor not now of off often oh okay on once one
only or other ought our ours ourselves out over own please said same say see seven shall
shan't she she'd she'll she's should shouldn't six so some sorry such ten than thank thanks
that that's the their theirs them themselves then there there's these they they'd they'll
they're they've this those though thousand three through to too two uh um under until up
upon us very want was wasn't we we'd we'll we're we've well were weren't what what's when
when's where where's whether which while who who's whom why why't will with won't would
wouldn't yeah yes yet you you'd you'll you're you've your yours yourself yourselves zero
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


def speech_regions(audio: npt.NDArray[np.float32], settings: Settings) -> list[tuple[float, float]]:
    """(start, end) seconds of each stretch of speech in 16 kHz audio, unpadded."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    if len(audio) == 0:
        return []
    options = VadOptions(
        threshold=settings.vad_threshold,
        min_silence_duration_ms=settings.vad_min_silence_ms,
        min_speech_duration_ms=settings.vad_min_speech_ms,
        speech_pad_ms=0,
    )
    return [
        (s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE)
        for s in get_speech_timestamps(audio, options)
    ]


def _dbfs(value: float) -> float:
    return round(max(DB_FLOOR, 20 * math.log10(value)) if value > 0 else DB_FLOOR, 2)


def levels(samples: npt.NDArray[Any]) -> dict[str, float]:
    """RMS and peak in dBFS and the clipped fraction of int16 (or [-1, 1] float) samples."""
    if len(samples) == 0:
        return {"rms_dbfs": DB_FLOOR, "peak_dbfs": DB_FLOOR, "clipping_ratio": 0.0}
    if samples.dtype == np.int16:
        values = samples.astype(np.float64) / 32768.0
        clipped = np.count_nonzero((samples == 32767) | (samples == -32768))
    else:
        values = samples.astype(np.float64)
        clipped = np.count_nonzero(np.abs(values) >= 32767 / 32768)
    return {
        "rms_dbfs": _dbfs(float(np.sqrt(np.mean(values * values)))),
        "peak_dbfs": _dbfs(float(np.max(np.abs(values)))),
        "clipping_ratio": round(clipped / len(samples), 6),
    }


def salient_terms(text: str, top: int = TOP_TERMS) -> list[dict[str, Any]]:
    """The `top` most frequent content words with their counts (see the module's docstring)."""
    words = [w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in STOP_WORDS]
    counts = Counter(words)  # insertion order is first use, and most_common keeps it for ties
    return [{"term": term, "count": count} for term, count in counts.most_common(top)]


def compute(
    audio: npt.NDArray[np.float32],
    recorded: npt.NDArray[Any],
    transcript: str,
    word_count: int,
    settings: Settings,
) -> dict[str, Any]:
    """Insights of one call: `audio` is the 16 kHz float decode (for VAD), `recorded` the samples
    as stored (for levels). DTMF keys are the caller's to add: they are not in the audio."""
    duration = len(audio) / SAMPLE_RATE
    regions = speech_regions(audio, settings)
    speech = sum(end - start for start, end in regions)
    gaps = [later[0] - earlier[1] for earlier, later in itertools.pairwise(regions)]
    return {
        "duration_seconds": round(duration, 3),
        "speech_seconds": round(speech, 3),
        "silence_seconds": round(max(0.0, duration - speech), 3),
        "talk_ratio": round(speech / duration, 4) if duration else 0.0,
        "longest_silence_seconds": round(max(gaps, default=0.0), 3),
        "speech_segments": len(regions),
        "words": word_count,
        "speaking_rate_wpm": round(word_count / (speech / 60), 1) if speech else 0.0,
        **levels(recorded),
        "salient_terms": salient_terms(transcript),
    }
