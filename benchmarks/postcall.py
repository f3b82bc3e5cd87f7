"""`python -m benchmarks.postcall`: throughput of the post-call pass on recorded calls.

Builds `--calls` calls of about `--minutes` minutes each from the Asterisk corpus (recorded
prompts with 1 s pauses and light line noise, 8 kHz WAV as AudioSocket records them), then
transcribes each call two ways with the same model, compute type and beam size:

- worker: streamsrv.postcall.transcribe.PostcallModel.process, the worker's model path (decode,
  VAD, batched transcription with word timestamps, insights), `--concurrency` calls at a time
  (default WORKER_CONCURRENCY) as one worker process runs them; the result cache is not used;
- sequential: plain faster-whisper, one call after another: its own WhisperModel (CPU_THREADS,
  one replica) and WhisperModel.transcribe() with its defaults (no VAD, one 30 s window after
  another), word timestamps on.

The calls go in rounds of `--concurrency`; in each round both paths process the same calls, and
which goes first alternates, so that anything else running on the machine weighs on both alike.
Figures: wall seconds, real-time factor (wall / audio), calls per hour (3600 x calls / wall),
process CPU seconds per audio second, and WER against the corpus texts. Settings come from the
environment as for the worker (POSTCALL_WHISPER_MODEL, POSTCALL_WHISPER_COMPUTE_TYPE,
POSTCALL_BEAM_SIZE, BATCH_SIZE, WORKER_CONCURRENCY, CPU_THREADS, ...).
Self-contained on purpose: it shares no code with the live benchmarks beside it.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamsrv import corpus
from streamsrv.blas import one_blas_thread
from streamsrv.config import Settings
from streamsrv.postcall.transcribe import PostcallModel
from streamsrv.wer import corpus_wer

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass
class PathStats:
    wall: float = 0.0
    cpu: float = 0.0
    pairs: list[tuple[str, str]] = field(default_factory=list)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_calls(count: int, minutes: float, seed: int) -> list[corpus.RecordedCall]:
    """Calls of at least `minutes` each, every one its own shuffle of the corpus's prompts."""
    texts = corpus.texts()
    names = sorted(n for n, t in texts.items() if 4 <= len(t.split()) <= 30)
    calls = []
    for i in range(count):
        rng = random.Random(seed * 1000 + i)
        order = rng.sample(names, len(names))
        chosen, seconds = [], 1.0
        while seconds < minutes * 60 and order:
            name = order.pop()
            chosen.append(name)
            seconds += len(corpus.read_prompt(name)) / 2 / corpus.RATE + 1.0
        calls.append(corpus.build_call(chosen, pause=1.0, noise=30.0, seed=seed + i))
    return calls


def wav_file(call: corpus.RecordedCall, path: Path) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(corpus.RATE)
        w.writeframes(call.pcm)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def plain_model(model: PostcallModel) -> Any:
    """The baseline's WhisperModel: the same files and compute type, faster-whisper's defaults."""
    from faster_whisper import WhisperModel

    from streamsrv.asr.models import resolve_model

    s = model.settings
    path = resolve_model(model.name, s.model_dir)
    return WhisperModel(
        path, device=model.device, compute_type=model.compute_type, cpu_threads=s.cpu_threads
    )


def run_worker_path(model: PostcallModel, batch: list[bytes]) -> list[str]:
    with ThreadPoolExecutor(len(batch)) as pool:
        return [out.transcript for out in pool.map(lambda data: model.process(data, None), batch)]


def run_sequential(plain: Any, beam_size: int, batch: list[bytes]) -> list[str]:
    from faster_whisper import decode_audio

    texts = []
    for data in batch:
        audio = decode_audio(io.BytesIO(data), sampling_rate=16000)
        segments, _ = plain.transcribe(audio, beam_size=beam_size, word_timestamps=True)
        texts.append(" ".join(segment.text.strip() for segment in segments))
    return texts


def measure(
    runners: dict[str, Callable[[list[bytes]], list[str]]],
    files: list[bytes],
    calls: list[corpus.RecordedCall],
    concurrency: int,
) -> dict[str, PathStats]:
    stats = {name: PathStats() for name in runners}
    for r, first in enumerate(range(0, len(files), concurrency)):
        batch = files[first : first + concurrency]
        names = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in names:
            wall, cpu = time.perf_counter(), cpu_seconds()
            texts = runners[name](batch)
            took = time.perf_counter() - wall
            stats[name].wall += took
            stats[name].cpu += cpu_seconds() - cpu
            references = [call.reference for call in calls[first : first + concurrency]]
            stats[name].pairs += list(zip(references, texts, strict=True))
            print(
                f"calls {first + 1}-{first + len(batch)} {name:10s} {took:7.1f} s", file=sys.stderr
            )
    return stats


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def commit() -> str:
    try:
        return _git("rev-parse", "--short", "HEAD") + (
            "-dirty" if _git("status", "--porcelain") else ""
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return f"nproc {len(os.sched_getaffinity(0))}, {cpu}, {platform.platform()}"


def table(stats: dict[str, PathStats], audio: float, calls: int) -> list[str]:
    rows = [
        "| path | wall s | real-time factor | calls / hour | CPU s per audio s | WER |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        rows.append(
            f"| {name} | {s.wall:.1f} | {s.wall / audio:.3f} | {3600 * calls / s.wall:.0f}"
            f" | {s.cpu / audio:.3f} | {corpus_wer(s.pairs):.3f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.postcall", description=__doc__)
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=3.0, help="length of each call")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--concurrency", type=int, default=0, help="worker jobs at once (0: WORKER_CONCURRENCY)"
    )
    parser.add_argument("--skip-sequential", action="store_true", help="the worker path only")
    parser.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    parser.add_argument("--note", default="", help="a line for the record (e.g. machine load)")
    args = parser.parse_args(argv)

    settings = Settings.load(None).replace(cache_results=False)
    if args.concurrency:
        settings = settings.replace(worker_concurrency=args.concurrency)
    concurrency = settings.worker_concurrency
    one_blas_thread()  # as `streamsrv worker` runs; the sequential path shares the process
    model = PostcallModel(settings)
    load = model.load()
    runners: dict[str, Callable[[list[bytes]], list[str]]] = {
        "worker": lambda batch: run_worker_path(model, batch)
    }
    if not args.skip_sequential:
        plain = plain_model(model)
        runners["sequential"] = lambda batch: run_sequential(
            plain, settings.postcall_beam_size, batch
        )
    calls = build_calls(args.calls, args.minutes, args.seed)
    audio = sum(call.seconds for call in calls)
    with tempfile.TemporaryDirectory() as tmp:
        files = [wav_file(call, Path(tmp) / f"call{i}.wav") for i, call in enumerate(calls)]
        warm = corpus.build_call(corpus.pick_prompts(2, 99), pause=0.5)
        warm_data = wav_file(warm, Path(tmp) / "warm.wav")
        for name, runner in runners.items():
            runner([warm_data] * (concurrency if name == "worker" else 1))
        load_before = os.getloadavg()
        stats = measure(runners, files, calls, concurrency)
        load_after = os.getloadavg()

    s = settings
    lines = [
        f"{args.calls} calls, {audio / 60:.1f} min of audio ({audio / args.calls:.0f} s each),"
        f" model {model.label}, beam {s.postcall_beam_size}, BATCH_SIZE {s.batch_size},"
        f" WORKER_CONCURRENCY {concurrency} ({model.cpu_threads() or 'all'} CPU threads per job),"
        f" model load {load:.1f} s",
        "",
        *table(stats, audio, args.calls),
    ]
    if "sequential" in stats:
        speedup = stats["sequential"].wall / stats["worker"].wall
        lines += ["", f"worker / sequential throughput: {speedup:.2f}x"]
    lines += [
        "",
        f"load average 1 min: {load_before[0]:.2f} before, {load_after[0]:.2f} after",
    ]
    print("\n".join(lines))

    if args.record:
        command = " ".join(["python -m benchmarks.postcall", *map(shlex.quote, sys.argv[1:])])
        block = [
            "",
            f"## Post-call pass: worker (batched) against sequential faster-whisper,"
            f" {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            "",
            f"- command: `{command}`",
            f"- commit: {commit()}",
            f"- machine: {machine()}",
            *([f"- note: {args.note}"] if args.note else []),
            "",
            *lines,
            "",
        ]
        with RESULTS_MD.open("a") as out:
            out.write("\n".join(block))
        print(f"appended to {RESULTS_MD}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
