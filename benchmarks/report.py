"""Tables for the terminal and RESULTS.md, result blocks with their provenance, and the sweep plot.

A figure without the commit, the machine and the model it was taken with cannot be compared
with another one, so every recorded block carries all three.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT
from benchmarks.ingest import IngestResult
from benchmarks.live import (
    FINAL_LAG_P95_MAX,
    WER_GAP_MAX,
    WORD_LAG_P95_MAX,
    LiveResult,
)
from benchmarks.wer_gap import Gap, wer_gap
from streamsrv.config import Settings

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def num(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return ">max"
    return f"{value:.{digits}f}"


def live_row(r: LiveResult) -> dict[str, str]:
    return {
        "calls": str(r.calls),
        "scenario": r.scenario,
        "audio s": num(r.audio_seconds, 0),
        "word lag p50 / p95 s": f"{num(r.word_lag_p50)} / {num(r.word_lag_p95)}",
        "words missing": f"{r.words_missing}/{r.words}",
        "final lag p50 / p95 s": f"{num(r.final_lag_p50)} / {num(r.final_lag_p95)}",
        "finals missing": f"{r.finals_missing}/{r.utterances}",
        "WER live / offline": f"{num(100 * r.final_wer, 1)}% / {num(100 * r.offline_wer, 1)}%",
        "WER gap (95 %) points": gap_text(r.gap),
        "CPU s per audio s": num(r.cpu_per_audio_s, 3),
        "peak RSS MB": num(r.peak_rss_mb, 0),
        "loop lag p99 s": num(r.loop_lag_p99, 3),
        "frames lost": str(r.frames_lost),
        "partials / finals": f"{r.partials} / {r.finals}",
        "batch mean": num(r.batch_size_mean),
        "bar": "yes" if r.holds_bar else "no: " + ", ".join(r.bar_failures),
    }


def ingest_row(r: IngestResult) -> dict[str, str]:
    return {
        "calls": str(r.calls),
        "s each": num(r.seconds, 0),
        "CPU ms per audio s, all": num(r.cpu_ms_per_audio_s, 2),
        "steady state ms per audio s": num(r.steady_ms_per_audio_s, 2),
        "start + end ms per call": num(r.ms_per_call, 1),
        "frames sent / lost": f"{r.frames_sent} / {r.frames_lost}",
        "bytes sent / received": f"{r.bytes_sent} / {r.bytes_received}",
        "recorded / sent audio s": f"{num(r.recorded_seconds, 1)} / {num(r.audio_seconds, 1)}",
        "peak RSS MB": num(r.peak_rss_mb, 0),
        "loop lag p99 s": num(r.loop_lag_p99, 3),
        "client late p99 / max ms": f"{num(r.client_late_p99_ms, 1)} / "
        f"{num(r.client_late_max_ms, 1)}",
        "procs": str(r.procs),
        "bar": "yes" if r.holds_bar else "no",
    }


def table(rows: list[dict[str, str]]) -> str:
    """A markdown table (also readable in a terminal)."""
    if not rows:
        return ""
    heads = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in heads]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(r[h].ljust(w) for h, w in zip(heads, widths, strict=True)) + " |"
        for r in rows
    ]
    return "\n".join(lines)


def gap_text(gap: Gap) -> str:
    """A WER gap in points with its 95 % interval: "+0.6 (-0.1 to +1.4)"."""

    def points(x: float) -> str:
        return "-" if math.isnan(x) else f"{100 * x:+.1f}"

    return f"{points(gap.gap)} ({points(gap.low)} to {points(gap.high)})"


def largest_holding(
    results: list[LiveResult], holds: Callable[[LiveResult], bool] = lambda r: not r.bar_failures
) -> int | None:
    """The largest call count whose every run (staggered and burst) `holds`, with every
    smaller count tried holding too; by default the whole bar."""
    best = None
    for count in sorted({r.calls for r in results}):
        if not all(holds(r) for r in results if r.calls == count):
            break
        best = count
    return best


def scenario_gaps(results: list[LiveResult]) -> dict[str, Gap]:
    """The WER gap of every call of each scenario ("staggered", "burst"), all counts pooled."""
    calls: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        calls.setdefault("burst" if r.prompts else "staggered", []).extend(r.measured_calls)
    return {name: wer_gap(pool) for name, pool in calls.items()}


def largest_holding_pooled_wer(results: list[LiveResult]) -> int | None:
    """largest_holding with the WER part judged where there are words enough to judge it:
    each scenario's gap over all of its counts at most WER_GAP_MAX, and at each count a gap
    above it only by more than the count's 95 % interval (a load that costs accuracy).
    The lags and losses are judged at each count as before."""
    if any(not gap.gap <= WER_GAP_MAX for gap in scenario_gaps(results).values()):
        return None

    def holds(r: LiveResult) -> bool:
        return set(r.bar_failures) <= {"WER"} and r.gap.low <= WER_GAP_MAX

    return largest_holding(results, holds)


def bar_text() -> str:
    return (
        f"word lag p95 <= {WORD_LAG_P95_MAX} s, final lag p95 <= {FINAL_LAG_P95_MAX} s, "
        f"final WER <= offline WER + {WER_GAP_MAX:.2f}, no frame lost, every call ended"
    )


def _git(*args: str) -> str:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: never rewrite the index
    return subprocess.run(
        ["git", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def commit() -> str:
    try:
        head = _git("rev-parse", "--short", "HEAD")
        return head + ("-dirty" if _git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = ""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = f", {int(line.split()[1]) / 1024**2:.0f} GiB RAM"
    return f"nproc {len(os.sched_getaffinity(0))}, {model}{memory}, {platform.platform()}"


def model_settings(settings: Settings) -> str:
    """The live model and the settings that move the figures most."""
    if not settings.live_asr:
        return f"none (DEFAULT_PROCESSING_MODE={settings.default_processing_mode})"
    device = settings.device
    return (
        f"{settings.realtime_model_name(device)} ({device}, "
        f"{settings.realtime_whisper_compute_type}), "
        f"FINAL_BEAM_SIZE={settings.final_beam(device)}, "
        f"CONTEXTLESS_FINAL_BEAM_SIZE={settings.contextless_final_beam(device)}, "
        f"CPU_THREADS={settings.cpu_threads}, MAX_BATCH_SIZE={settings.max_batch_size}, "
        f"PARTIAL_INTERVAL={settings.partial_interval}, "
        f"MIN_WINDOW_SECONDS={settings.min_window_seconds}, "
        f"PARTIAL_WINDOW_SECONDS={settings.partial_window_seconds}, "
        f"FINAL_CONTEXT={str(settings.final_context).lower()}, "
        f"FINAL_CONTEXT_SEGMENTS={settings.final_context_segments}, "
        f"SOFT_SEGMENT_SECONDS={settings.soft_segment_seconds}"
    )


def record(title: str, body: str, settings: Settings, path: Path = RESULTS_MD) -> None:
    """Append one result block with its provenance to RESULTS.md."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]])
    block = (
        f"\n## {now}: {title}\n\n"
        f"- command: `{command}`\n"
        f"- commit: {commit()}\n"
        f"- machine: {machine()}\n"
        f"- model: {model_settings(settings)}\n\n"
        f"{body}\n"
    )
    with open(path, "a") as out:
        out.write(block)


def to_json(results: list[Any], path: Path) -> None:
    """Results as JSON (nan and inf as null, so that any JSON reader takes it)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    data = [
        {**clean(dataclasses.asdict(r)), "holds_bar": r.holds_bar, "kind": type(r).__name__}
        for r in results
    ]
    path.write_text(json.dumps(data, indent=1) + "\n")


def plot(results: list[LiveResult], path: Path, title: str) -> None:
    """Word lag p95 (and final lag p95) and CPU per audio second against concurrent calls,
    with the bar's lag limits drawn and the points that fail the bar crossed out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r.calls)
    x = sorted({r.calls for r in results})
    fig, lag_ax = plt.subplots(figsize=(8, 4.5))
    staggered = [r for r in results if not r.prompts]
    bursts = [r for r in results if r.prompts]
    for runs, name, style in ((staggered, "", "-"), (bursts, ", burst", ":")):
        if not runs:
            continue
        calls = [r.calls for r in runs]
        lag_ax.plot(calls, [r.word_lag_p95 for r in runs], "o" + style, color="C0",
                    label=f"word lag p95{name}")  # fmt: skip
        lag_ax.plot(calls, [r.final_lag_p95 for r in runs], "s" + style, color="C2",
                    label=f"final lag p95{name}", alpha=0.6)  # fmt: skip
    lag_ax.axhline(WORD_LAG_P95_MAX, color="C0", linestyle=":", linewidth=1)
    lag_ax.axhline(FINAL_LAG_P95_MAX, color="C2", linestyle=":", linewidth=1)
    failed = [r for r in results if not r.holds_bar]
    lag_ax.plot(
        [r.calls for r in failed],
        [r.word_lag_p95 for r in failed],
        "x",
        color="red",
        markersize=12,
        label="fails the bar",
    )
    for r in failed:
        lag_ax.annotate(
            ", ".join(r.bar_failures),
            (r.calls, r.word_lag_p95),
            xytext=(-8, -12),
            textcoords="offset points",
            ha="right",
            fontsize=7,
            color="red",
        )
    best = largest_holding(results)
    if best is not None:
        lag_ax.axvline(best, color="grey", linestyle="--", linewidth=1)
        lag_ax.annotate(
            f"holds the bar up to {best}",
            (best, 0),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8,
        )
    lag_ax.set_xticks(x)
    lag_ax.set_xlabel("concurrent calls")
    lag_ax.set_ylabel(f"lag, s (dotted: bar, {WORD_LAG_P95_MAX:g} s and {FINAL_LAG_P95_MAX:g} s)")
    lag_ax.set_ylim(bottom=0)
    cpu_ax = lag_ax.twinx()
    cpu_ax.plot(
        [r.calls for r in staggered],
        [r.cpu_per_audio_s for r in staggered],
        "^-",
        color="C1",
        label="CPU s / audio s",
    )
    cpu_ax.set_ylabel("server CPU s per s of call audio")
    cpu = [r.cpu_per_audio_s for r in results if math.isfinite(r.cpu_per_audio_s)]
    cpu_ax.set_ylim(0, 1.15 * max(cpu, default=1.0))
    handles = lag_ax.get_legend_handles_labels()[0] + cpu_ax.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    lag_ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
