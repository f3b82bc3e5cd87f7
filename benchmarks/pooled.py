"""Runs of one scenario at consecutive seeds, pooled into one row.

A burst of six short calls holds about 190 words, so one misheard word moves its WER by half
a point and the bar's 1-point margin by half its width: a single run says more about the
prompts its seed drew than about streaming. Pooled over several seeds, each with its own
server as in a single run, the WER is over every call's words (corpus WER), and the lags are
percentiles over every word and utterance.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from benchmarks.live import LiveResult, lag_figures
from streamsrv.wer import corpus_wer

# How each figure of the runs pools: added up, or the worst of them. The rest (lags, WER,
# CPU per audio s, batch mean, the calls) is computed in pooled() from what the runs hold.
ADDED = (
    "server_cpu_s",
    "frames_sent",
    "frames_received",
    "frames_lost",
    "bytes_sent",
    "bytes_received",
    "recorded_seconds",
    "audio_seconds",
    "partials",
    "finals",
    "partials_shed",
    "model_seconds",
    "calls_not_ended",
    "calls_postcall_only",
    "jobs_written",
    "conversation_finals",
    "runs",
)
WORST = ("peak_rss_mb", "loop_lag_p99", "delivery_p95", "client_late_p99_ms")
MAX_RUNS = 32  # a pool never plays more seeds than this, however few words each holds


def play_seeds(
    play: Callable[[int], LiveResult],
    seed: int,
    runs: int = 1,
    min_words: int = 0,
    played: Callable[[LiveResult], None] | None = None,
) -> list[LiveResult]:
    """Results of `play` at seeds seed, seed + 1, ...: `runs` of them at least, and more (up
    to MAX_RUNS) until they hold `min_words` reference words together. A 1-point WER margin
    is a few words on a few dozen: one call of four prompts holds about 30, so one misheard
    word is three points there. `played` sees each result as it comes."""
    results: list[LiveResult] = []
    while len(results) < max(1, runs) or (
        sum(r.words for r in results) < min_words and len(results) < MAX_RUNS
    ):
        results.append(play(seed + len(results)))
        if played is not None:
            played(results[-1])
    return results


def pooled(results: list[LiveResult]) -> LiveResult:
    """One result for runs of the same scenario and call count at seeds seed, seed + 1, ...:
    counts and seconds added, percentiles and WER over every call, worst-case figures (RSS,
    loop lag, delivery, pacing) the worst of the runs. One run is its own pool."""
    first = results[0]
    if len(results) == 1:
        return first
    calls = [c for r in results for c in r.measured_calls]
    word_lags = [x for c in calls for x in c["word_lags"]]
    final_lags = [x for c in calls for x in c["final_lags"]]
    figures: dict[str, Any] = {
        **{name: sum(getattr(r, name) for r in results) for name in ADDED},
        **{name: max(getattr(r, name) for r in results) for name in WORST},
    }
    audio = figures["audio_seconds"]
    return dataclasses.replace(
        first,
        **figures,
        **lag_figures(word_lags, final_lags),
        final_wer=corpus_wer([(str(c["reference"]), str(c["finals"])) for c in calls]),
        offline_wer=corpus_wer([(str(c["reference"]), str(c["offline"])) for c in calls]),
        cpu_per_audio_s=figures["server_cpu_s"] / audio if audio else math.nan,
        batch_size_mean=sum(r.batch_size_mean for r in results) / len(results),
        per_call=[c for r in results for c in r.per_call],
    )
