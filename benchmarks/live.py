"""`live`: N concurrent corpus calls at real-time pace into a fresh server, measured end to end.

Phases: start the server, warm it up with one short call (the first batches pay one-off
allocation costs that are not steady-state), snapshot its counters, play the calls (staggered
within the first 2 s, or all within 0.2 s for a burst of short calls), wait for every
call_ended, snapshot again, stop the server, and only then transcribe the same audio offline
for the WER baseline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from benchmarks import calls as bc
from benchmarks import harness as h
from benchmarks import lag
from benchmarks.offline import OfflineTranscriber
from benchmarks.wer_gap import Gap, wer_gap
from streamsrv import events
from streamsrv.config import Settings
from streamsrv.wer import corpus_wer

BATCH = "streamsrv_inference_batch_size"
MODEL_TIME = "streamsrv_inference_batch_duration_seconds_sum"

# The bar a concurrency level must hold (DESIGN.md, "Quality bars").
WORD_LAG_P95_MAX = 2.0
FINAL_LAG_P95_MAX = 3.0
WER_GAP_MAX = 0.01
WARMUP_SEED = 999_999  # the warm-up call, never one of the measured calls
HEARD_MARGIN = 0.3  # s of audio around an utterance's speech when it is heard alone for timing


@dataclass
class LiveResult(h.ServerFigures):
    calls: int
    seconds: float
    seed: int
    env: dict[str, str]
    model: str
    final_beam_size: int
    audio_seconds: float
    words: int
    words_missing: int
    word_lag_p50: float
    word_lag_p95: float
    utterances: int
    finals_missing: int
    final_lag_p50: float
    final_lag_p95: float
    final_wer: float
    offline_wer: float
    cpu_per_audio_s: float
    partials: int
    finals: int
    partials_shed: int
    batch_size_mean: float
    model_seconds: float  # wall time of the model's batches, all calls together
    delivery_p95: float  # Redis arrival - emitted_at: what the collector adds to every lag
    client_late_p99_ms: float
    calls_not_ended: int
    calls_postcall_only: int  # served without live transcription (overload): not in lags, WER
    jobs_written: int  # post-call jobs the server wrote during the run
    stagger: float  # calls started at random within this many seconds
    prompts: int | None = None  # a burst: calls of this many prompts each instead of `seconds`
    monologue: bool = False  # the first call opens with bc.MONOLOGUE
    conversation_finals: int = 0  # finals published again on the calls' conversation channels
    runs: int = 1  # runs at seeds seed, seed + 1, ... pooled into these figures (pooled.py)
    per_call: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bar_failures(self) -> list[str]:
        """Which parts of the bar this run misses (nan counts as a miss)."""
        checks = {
            "word lag": self.word_lag_p95 <= WORD_LAG_P95_MAX,
            "final lag": self.final_lag_p95 <= FINAL_LAG_P95_MAX,
            "WER": self.final_wer <= self.offline_wer + WER_GAP_MAX,
            "frames lost": self.frames_lost == 0,
            "calls not ended": self.calls_not_ended == 0,
        }
        return [name for name, ok in checks.items() if not ok]

    @property
    def scenario(self) -> str:
        """`burst` (short calls connecting together) or `staggered` (long calls)."""
        seeds = f"; seeds {self.seed} to {self.seed + self.runs - 1}" if self.runs > 1 else ""
        if self.prompts:
            long = ", 1 with a 73 s monologue" if self.monologue else ""
            return f"burst ({self.prompts} prompts{long}, {self.stagger:g} s{seeds})"
        return f"staggered ({self.seconds:.0f} s, {self.stagger:g} s{seeds})"

    @property
    def holds_bar(self) -> bool:
        return not self.bar_failures

    @property
    def measured_calls(self) -> list[dict[str, Any]]:
        """Per-call records of the calls served live (not those served postcall_only)."""
        return [c for c in self.per_call if "reference" in c]

    @functools.cached_property
    def gap(self) -> Gap:
        """The WER gap over these calls, with how sure it is (benchmarks/wer_gap.py); once
        per result, though its table row and the sweep's verdict both read it."""
        return wer_gap(self.measured_calls)


def lag_figures(word_lags: list[float | None], final_lags: list[float | None]) -> dict[str, Any]:
    """LiveResult's word and final lag fields from every word's and utterance's lag (None:
    never shown, never covered by a final)."""
    return {
        "words": len(word_lags),
        "words_missing": sum(1 for x in word_lags if x is None),
        "word_lag_p50": lag.percentile(word_lags, 50),
        "word_lag_p95": lag.percentile(word_lags, 95),
        "utterances": len(final_lags),
        "finals_missing": sum(1 for x in final_lags if x is None),
        "final_lag_p50": lag.percentile(final_lags, 50),
        "final_lag_p95": lag.percentile(final_lags, 95),
    }


def call_seed(seed: int, index: int) -> int:
    """Call i of every run with the same --seed is the same audio, whatever the call count."""
    return seed * 1000 + index


async def _play_and_collect(
    server: h.ServerProcess,
    calls: list[bc.BenchCall],
    seed: int,
    stagger: float,
    contexts: list[dict[str, str]],
) -> tuple[list[bc.Played], bc.Collector, h.Snapshot, h.Snapshot, float, int]:
    """Each call's context (if not empty) is posted before it connects, as the dialplan does."""
    s = server.settings
    host, port = s.audiosocket_host, s.audiosocket_port
    async with bc.Collector(s.redis_url, s.redis_channel_prefix) as collector:
        warm = bc.build_bench_call(seed=WARMUP_SEED, seconds=3)
        played_warm = await bc.play(host, port, bc.encode_frames(warm.pcm))
        await collector.wait_ended([played_warm.call_id], within=60)
        before = server.snapshot()
        ids = [str(uuid.uuid4()) for _ in calls]
        for call_id, context in zip(ids, contexts, strict=True):
            if context:
                url = server.url(f"/calls/{call_id}/context")
                await asyncio.to_thread(h.http_post, url, context)
        delays = bc.stagger(len(calls), seed, within=stagger)
        played = await asyncio.gather(
            *(
                bc.play(host, port, bc.encode_frames(c.pcm), call_id, delay=d)
                for c, d, call_id in zip(calls, delays, ids, strict=True)
            )
        )
        await collector.wait_ended(ids, within=120 + stagger + max(c.seconds for c in calls))
        after = server.snapshot()
        rss = server.peak_rss_mb()
        not_ended = sum(1 for c in ids if not collector.ended(c))
    return list(played), collector, before, after, rss, not_ended


def bench_calls(
    n_calls: int, seconds: float, seed: int, prompts: int | None = None, monologue: bool = False
) -> list[bc.BenchCall]:
    """The live benchmark's calls: about `seconds` each, or with `prompts` that many prompts
    each (a burst of short calls); `monologue`: the first call says bc.MONOLOGUE first."""
    return [
        bc.build_bench_call(
            call_seed(seed, i),
            seconds,
            prompts=prompts,
            lead=bc.MONOLOGUE if monologue and i == 0 else None,
        )
        for i in range(n_calls)
    ]


def conversation_finals(settings: Settings, contexts: list[dict[str, str]]) -> int:
    """Finals kept in the streams of the conversations the calls' contexts name (their
    alerts, kept there too, left out)."""
    names = {c["conversation"] for c in contexts if "conversation" in c}
    channels = events.Channels(settings.redis_channel_prefix)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        entries = [e for n in names for e in client.xrange(channels.conversation_stream(n)) or []]
        kept = [json.loads(fields[b"data"]) for _, fields in entries if fields]
    finally:
        client.close()
    return sum(m.get("type") == "final" for m in kept)


def heard_utterances(
    call: bc.BenchCall, settings: Settings, offline: OfflineTranscriber
) -> list[lag.RefUtterance]:
    """The call's utterances with each word timed where the model hears it (lag.timed), each
    heard alone with HEARD_MARGIN s around its speech."""
    out: list[lag.RefUtterance] = []
    for utt in call.utterances:
        first = int(max(0.0, utt.start - HEARD_MARGIN) * bc.RATE) * 2
        last = int((utt.end + HEARD_MARGIN) * bc.RATE) * 2
        heard = offline.heard_words(call.pcm[first:last], settings, call.language)
        offset = first / 2 / bc.RATE
        out.append(lag.timed(utt, [(word, offset + end) for word, end in heard]))
    return out


def run_calls(
    calls: list[bc.BenchCall],
    seconds: float,
    seed: int,
    env: dict[str, str],
    offline: OfflineTranscriber,
    env_file: Path = h.DEFAULT_ENV_FILE,
    stagger: float = bc.STAGGER_SECONDS,
    prompts: int | None = None,
    contexts: list[dict[str, str]] | None = None,
) -> LiveResult:
    """`calls` played into a fresh server and measured, each posted its context first (if
    any); the offline baseline transcribes each in its own language. Past capacity some calls
    may be served as postcall_only (their call_started says so): they have no live transcript
    by design, so they are counted, not measured."""
    contexts = contexts or [{} for _ in calls]
    n_calls = len(calls)
    server = h.ServerProcess(env, env_file)
    with server:
        played, collector, before, after, rss, not_ended = asyncio.run(
            _play_and_collect(server, calls, seed, stagger, contexts)
        )
        model = str(server.health.get("model_name", ""))
        settings: Settings = server.settings
        recorded = bc.recorded_seconds(server.recordings, {p.call_id for p in played})
        merged = conversation_finals(settings, contexts)

    word_lags: list[float | None] = []
    final_lags: list[float | None] = []
    pairs: list[tuple[str, str]] = []
    offline_pairs: list[tuple[str, str]] = []
    per_call: list[dict[str, Any]] = []
    postcall_only = 0
    for call, p, context in zip(calls, played, contexts, strict=True):
        messages = collector.by_call.get(p.call_id, [])
        mode = next((m["processing_mode"] for _, m in messages if m["type"] == "call_started"), "")
        if mode == "postcall_only":
            postcall_only += 1
            per_call.append({"call_id": p.call_id, "seed": call.seed, "processing_mode": mode})
            continue
        utterances = heard_utterances(call, settings, offline)
        words = lag.reference_words(utterances, p.clock)
        w = lag.word_lags(words, messages)
        f = lag.final_lags(call.utterances, messages, p.clock)
        text = lag.finals_text(messages)
        offline_text = offline.transcribe(call.pcm, settings, call.language)
        word_lags += w
        final_lags += f
        pairs.append((call.reference, text))
        offline_pairs.append((call.reference, offline_text))
        per_call.append(
            {
                "call_id": p.call_id,
                "seed": call.seed,
                "seconds": call.seconds,
                "language": call.language,
                "context": context,
                "reference": call.reference,
                "finals": text,
                "offline": offline_text,
                "word_lags": w,
                "final_lags": f,
                # enough to recompute every lag: lag.reference_words(utterances, clock) ...
                "utterances": [dataclasses.asdict(u) for u in utterances],
                "frame_walls": p.frame_walls,
                "messages": messages,
            }
        )
    arrivals = [a for p in played for a in collector.by_call.get(p.call_id, [])]
    kinds = [m["type"] for _, m in arrivals]
    audio_seconds = sum(p.frames_sent * bc.FRAME_S for p in played)
    return LiveResult(
        **h.server_figures(
            before,
            after,
            frames_sent=sum(p.frames_sent for p in played),
            bytes_sent=sum(p.bytes_sent for p in played),
            peak_rss_mb=rss,
            recorded_seconds=recorded,
        ),
        calls=n_calls,
        seconds=seconds,
        seed=seed,
        env=env,
        model=model,
        final_beam_size=settings.final_beam(settings.device),
        audio_seconds=audio_seconds,
        **lag_figures(word_lags, final_lags),
        final_wer=corpus_wer(pairs),
        offline_wer=corpus_wer(offline_pairs),
        cpu_per_audio_s=(after.cpu_seconds - before.cpu_seconds) / audio_seconds,
        partials=kinds.count("partial"),
        finals=kinds.count("final"),
        partials_shed=int(h.delta(before, after, "streamsrv_partials_shed_total")),
        batch_size_mean=h.histogram_mean(before, after, BATCH),
        model_seconds=h.delta(before, after, MODEL_TIME),
        delivery_p95=lag.percentile([at - m["emitted_at"] for at, m in arrivals], 95),
        client_late_p99_ms=bc.lateness_summary([x for p in played for x in p.lateness])["p99_ms"],
        calls_not_ended=not_ended,
        calls_postcall_only=postcall_only,
        jobs_written=int(h.delta(before, after, "streamsrv_postcall_jobs_total")),
        stagger=stagger,
        prompts=prompts,
        monologue=any(bc.MONOLOGUE in call.prompts for call in calls),
        conversation_finals=merged,
        per_call=per_call,
    )
