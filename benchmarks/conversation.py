"""`conversation`: what the second leg of a two-sided conversation costs the server.

The same caller audio is played three ways, each into a fresh server: N one-leg calls; the same
N calls plus N agent legs as 2N unrelated calls; and those 2N legs as N conversations (each leg
posts role caller or agent and one conversation id before it connects, as the dialplan does).
The first step up is the second leg's own audio, VAD and model time; the second is what being
a conversation adds: each leg reporting how far it has settled, the merger holding finals until
the other leg has settled past them, and every final published again on the conversation's
channel and stream. Server CPU seconds come from /proc/<pid>/stat, so other load on the machine
disturbs them less than it disturbs the lags.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from benchmarks import calls as bc
from benchmarks import report
from benchmarks.live import LiveResult, call_seed, run_calls
from benchmarks.offline import OfflineTranscriber

SHAPES = ("one leg", "two legs, separate calls", "two legs, one conversation")
AGENT_SEEDS = 500  # agent leg i is call_seed(seed, AGENT_SEEDS + i): never a caller's audio


def run_conversations(
    n: int,
    seconds: float,
    seed: int,
    env: dict[str, str],
    offline: OfflineTranscriber,
    env_file: Path,
) -> list[LiveResult]:
    """The three shapes of SHAPES, in that order, for `n` calls of about `seconds` each."""
    callers = [bc.build_bench_call(call_seed(seed, i), seconds) for i in range(n)]
    agents = [bc.build_bench_call(call_seed(seed, AGENT_SEEDS + i), seconds) for i in range(n)]
    ids = [f"bench-{uuid.uuid4().hex[:12]}" for _ in range(n)]
    contexts = [{"role": "caller", "conversation": c} for c in ids] + [
        {"role": "agent", "conversation": c} for c in ids
    ]
    both = callers + agents
    return [
        run_calls(callers, seconds, seed, env, offline, env_file),
        run_calls(both, seconds, seed, env, offline, env_file),
        run_calls(both, seconds, seed, env, offline, env_file, contexts=contexts),
    ]


def row(shape: str, n: int, r: LiveResult) -> dict[str, str]:
    """CPU per call counts a conversation (both legs) as one call, as a PBX would."""
    return {
        "shape": shape,
        "streams": str(r.calls),
        "audio s": report.num(r.audio_seconds, 0),
        "server CPU s": report.num(r.server_cpu_s, 1),
        "CPU s per call": report.num(r.server_cpu_s / n, 2),
        "CPU s per audio s": report.num(r.cpu_per_audio_s, 3),
        "model s": report.num(r.model_seconds, 1),
        "partials (shed)": f"{r.partials} ({r.partials_shed})",
        "CPU s per partial+final": report.num(r.server_cpu_s / max(1, r.partials + r.finals), 3),
        "word lag p50 / p95 s": f"{report.num(r.word_lag_p50)} / {report.num(r.word_lag_p95)}",
        "final lag p95 s": report.num(r.final_lag_p95),
        "WER live / offline": f"{100 * r.final_wer:.1f}% / {100 * r.offline_wer:.1f}%",
        "finals / on conversations": f"{r.finals} / {r.conversation_finals}",
        "frames lost": str(r.frames_lost),
        "postcall_only": str(r.calls_postcall_only),
    }


def summary(n: int, results: list[LiveResult]) -> str:
    one, separate, conversation = results
    leg = separate.server_cpu_s - one.server_cpu_s
    merge = conversation.server_cpu_s - separate.server_cpu_s
    model = separate.model_seconds - one.model_seconds
    rows = [row(shape, n, r) for shape, r in zip(SHAPES, results, strict=True)]
    return (
        f"{report.table(rows)}\n\n"
        f"Second leg, per call: {leg / n:+.2f} CPU s ({100 * leg / one.server_cpu_s:+.0f}%), "
        f"model batches {model / n:+.2f} s wall; being one conversation instead of two "
        f"calls: {merge / n:+.2f} CPU s per call ({100 * merge / separate.server_cpu_s:+.1f}%)."
    )
