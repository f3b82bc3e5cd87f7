"""How far a pool's WER gap (live WER minus offline WER) can be trusted: the gap with a 95 %
interval from a paired bootstrap over calls.

A burst of short calls holds few words, so one misheard word moves its WER by a point or
more (pooled.py). Calls, not words, are resampled: one misheard prompt costs two or three
words of the same call, and a call's live and offline texts are drawn together, so what the
interval measures is the streaming cost on these prompts, not the prompts' own difficulty.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamsrv.wer import edit_distance, normalise

RESAMPLES = 4000
LEVEL = 0.95


@dataclass(frozen=True, slots=True)
class Gap:
    words: int
    gap: float  # live WER minus offline WER, over every word of the pool
    low: float  # the 95 % interval of `gap`
    high: float


def call_errors(calls: Iterable[dict[str, Any]]) -> np.ndarray:
    """Per call (rows): its reference words, live errors and offline errors."""
    rows = []
    for call in calls:
        ref = normalise(str(call["reference"]))
        live = edit_distance(ref, normalise(str(call["finals"])))
        offline = edit_distance(ref, normalise(str(call["offline"])))
        rows.append((len(ref), live, offline))
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def wer_gap(calls: Iterable[dict[str, Any]], seed: int = 0) -> Gap:
    """The pool's gap and its interval; `seed` fixes the resampling, so the same calls always
    give the same interval. No calls, or no words: a gap of nan."""
    errors = call_errors(calls)
    words = int(errors[:, 0].sum())
    if not words:
        return Gap(0, float("nan"), float("nan"), float("nan"))
    gap = float((errors[:, 1] - errors[:, 2]).sum() / words)
    picks = np.random.default_rng(seed).integers(0, len(errors), (RESAMPLES, len(errors)))
    drawn = errors[picks].sum(axis=1)  # (resamples, 3)
    gaps = (drawn[:, 1] - drawn[:, 2]) / np.maximum(drawn[:, 0], 1)
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(gaps, [tail, 100 - tail])
    return Gap(words, gap, min(gap, float(low)), max(gap, float(high)))
