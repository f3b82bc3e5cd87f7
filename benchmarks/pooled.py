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
from typing import Any

from benchmarks.live import LiveResult, lag_figures
from streamsrv.wer import corpus_wer


def _measured(result: LiveResult) -> list[dict[str, Any]]:
    """Per-call records of the calls served live (not those served postcall_only)."""
    return [c for c in result.per_call if "reference" in c]


def pooled(results: list[LiveResult]) -> LiveResult:
    """One result for runs of the same scenario and call count at seeds seed, seed + 1, ...:
    counts and seconds added, percentiles and WER over every call, worst-case figures (RSS,
    loop lag, delivery, pacing) the worst of the runs. One run is its own pool."""
    first = results[0]
    if len(results) == 1:
        return first
    calls = [c for r in results for c in _measured(r)]
    word_lags = [x for c in calls for x in c["word_lags"]]
    final_lags = [x for c in calls for x in c["final_lags"]]
    audio = sum(r.audio_seconds for r in results)
    cpu = sum(r.server_cpu_s for r in results)

    def total(name: str) -> int:
        return sum(int(getattr(r, name)) for r in results)

    return dataclasses.replace(
        first,
        server_cpu_s=cpu,
        peak_rss_mb=max(r.peak_rss_mb for r in results),
        loop_lag_p99=max(r.loop_lag_p99 for r in results),
        frames_sent=total("frames_sent"),
        frames_received=total("frames_received"),
        frames_lost=total("frames_lost"),
        bytes_sent=total("bytes_sent"),
        bytes_received=total("bytes_received"),
        recorded_seconds=sum(r.recorded_seconds for r in results),
        audio_seconds=audio,
        **lag_figures(word_lags, final_lags),
        final_wer=corpus_wer([(str(c["reference"]), str(c["finals"])) for c in calls]),
        offline_wer=corpus_wer([(str(c["reference"]), str(c["offline"])) for c in calls]),
        cpu_per_audio_s=cpu / audio if audio else math.nan,
        partials=total("partials"),
        finals=total("finals"),
        partials_shed=total("partials_shed"),
        batch_size_mean=sum(r.batch_size_mean for r in results) / len(results),
        model_seconds=sum(r.model_seconds for r in results),
        delivery_p95=max(r.delivery_p95 for r in results),
        client_late_p99_ms=max(r.client_late_p99_ms for r in results),
        calls_not_ended=total("calls_not_ended"),
        calls_postcall_only=total("calls_postcall_only"),
        jobs_written=total("jobs_written"),
        conversation_finals=total("conversation_finals"),
        runs=sum(r.runs for r in results),
        per_call=[c for r in results for c in r.per_call],
    )
