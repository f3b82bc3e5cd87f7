"""`python -m benchmarks [all|live|burst|sweep|ingest|languages|conversation]`: see
benchmarks/RESULTS.md for what each figure means. With no arguments (`make bench`): the default
sweep (each count staggered and as a burst), then the default ingest."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks import calls as bc
from benchmarks import conversation, languages, report
from benchmarks import harness as h
from benchmarks.ingest import IngestResult, run_ingest
from benchmarks.live import LiveResult, bench_calls, run_calls
from benchmarks.offline import OfflineTranscriber
from benchmarks.pooled import play_seeds, pooled
from streamsrv.config import Settings

DEFAULT_SWEEP = "1,2,4,6"
DEFAULT_SECONDS = 60.0
DEFAULT_INGEST_CALLS = 300
DEFAULT_INGEST_SECONDS = 30.0
DEFAULT_PLOT = Path(__file__).resolve().parent / "sweep.png"
# The sweep's pools hold this many reference words at least: 1 WER point is then 3 words or
# more, where one call of four prompts (about 30 words) would make one word 3 points.
DEFAULT_MIN_WORDS = 300


def _common(parser: argparse.ArgumentParser, seconds: float) -> None:
    parser.add_argument("--seconds", type=float, default=seconds, help="length of each call")
    parser.add_argument("--seed", type=int, default=1, help="same seed, same calls")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="server variable"
    )
    parser.add_argument("--env-file", type=Path, default=h.DEFAULT_ENV_FILE)
    parser.add_argument("--out", type=Path, help="write the full results as JSON here")
    parser.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")


def _runs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="play at seeds seed, seed + 1, ... this many times, each into a fresh server, and "
        "pool them (benchmarks/pooled.py)",
    )


def _calls_list(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 1,2,4, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("call counts must be at least 1")
    return counts


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    live = sub.add_parser("live", help="N concurrent corpus calls: lag, WER, CPU, losses")
    live.add_argument("--calls", type=int, required=True)
    live.add_argument(
        "--stagger",
        type=float,
        default=bc.STAGGER_SECONDS,
        help=f"start the calls at random within this many seconds (default {bc.STAGGER_SECONDS:g})",
    )
    _common(live, DEFAULT_SECONDS)
    _runs(live)

    burst = sub.add_parser("burst", help="N short calls connecting within 0.2 s: lag, WER")
    burst.add_argument("--calls", type=int, required=True)
    burst.add_argument("--prompts", type=int, default=bc.BURST_PROMPTS, help="prompts per call")
    burst.add_argument("--stagger", type=float, default=bc.BURST_STAGGER_SECONDS)
    burst.add_argument(
        "--monologue", action="store_true", help=f"the first call opens with {bc.MONOLOGUE} (73 s)"
    )
    _common(burst, DEFAULT_SECONDS)
    _runs(burst)

    sweep = sub.add_parser(
        "sweep", help="live at several call counts, staggered and as a burst: table and plot"
    )
    sweep.add_argument("--calls", type=_calls_list, default=_calls_list(DEFAULT_SWEEP))
    sweep.add_argument("--no-burst", action="store_true", help="only the staggered runs")
    sweep.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    sweep.add_argument(
        "--min-words",
        type=int,
        default=DEFAULT_MIN_WORDS,
        help="play more seeds at a count until its pool holds this many reference words "
        f"(default {DEFAULT_MIN_WORDS}; 0: --runs only)",
    )
    _common(sweep, DEFAULT_SECONDS)
    _runs(sweep)

    ingest = sub.add_parser("ingest", help="many real-time calls, no live ASR: CPU, losses")
    ingest.add_argument("--calls", type=int, default=DEFAULT_INGEST_CALLS)
    ingest.add_argument("--procs", type=int, help="client processes (default: 1 per 100 calls)")
    _common(ingest, DEFAULT_INGEST_SECONDS)

    langs = sub.add_parser(
        "languages", help="English and Spanish calls at once (base model): WER per language"
    )
    langs.add_argument("--per-language", type=int, default=2, help="calls in each language")
    langs.add_argument("--how", choices=languages.HOWS, action="append", help="default: both")
    _common(langs, 30.0)

    conv = sub.add_parser("conversation", help="N one-leg calls against N two-leg conversations")
    conv.add_argument("--calls", type=int, default=2, help="calls (conversations) per shape")
    _common(conv, DEFAULT_SECONDS)

    everything = sub.add_parser("all", help=f"sweep {DEFAULT_SWEEP} x 60 s, ingest 300 x 30 s")
    everything.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    everything.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    everything.add_argument("--env-file", type=Path, default=h.DEFAULT_ENV_FILE)
    everything.add_argument("--out", type=Path, help="write the full results as JSON here")
    everything.add_argument("--record", action="store_true")
    return parser.parse_args(argv or ["all"])


def live_details(r: LiveResult) -> str:
    return (
        f"  words {r.words} ({r.words_missing} never shown), utterances {r.utterances} "
        f"({r.finals_missing} without a final); server CPU {r.server_cpu_s:.1f} s for "
        f"{r.audio_seconds:.0f} s of audio\n"
        f"  frames sent/received {r.frames_sent}/{r.frames_received}, bytes "
        f"{r.bytes_sent}/{r.bytes_received}, recorded {r.recorded_seconds:.2f} s; partials shed "
        f"{r.partials_shed}; calls not ended {r.calls_not_ended}\n"
        f"  calls served postcall_only {r.calls_postcall_only} (not in the lags or WER); "
        f"post-call jobs written {r.jobs_written}; calls started within {r.stagger:g} s\n"
        f"  Redis delivery p95 {r.delivery_p95 * 1000:.1f} ms, client pacing late p99 "
        f"{r.client_late_p99_ms:.1f} ms (both are in the lags; large values void the run)"
    )


def echo_row(result: LiveResult) -> None:
    """One run's row on stderr as soon as it is in, while the runs of its pool go on."""
    print(report.table([report.live_row(result)]), file=sys.stderr, flush=True)


def do_sweep(
    counts: list[int],
    seconds: float,
    seed: int,
    env: dict[str, str],
    env_file: Path,
    burst: bool = True,
    runs: int = 1,
    min_words: int = 0,
) -> list[LiveResult]:
    """At each count: the staggered long calls, then (with `burst`) the burst of short ones;
    each played at `runs` seeds from `seed` on, and more until the pool holds `min_words`
    reference words, and pooled (benchmarks/pooled.py)."""
    offline = OfflineTranscriber()
    results = []
    for n in counts:

        def staggered_at(s: int, n: int = n) -> LiveResult:
            return run_calls(bench_calls(n, seconds, s), seconds, s, env, offline, env_file)

        def burst_at(s: int, n: int = n) -> LiveResult:
            return run_burst(n, bc.BURST_PROMPTS, s, env, offline, env_file)

        print(f"live: {n} call(s) of {seconds:.0f} s ...", file=sys.stderr, flush=True)
        results.append(pooled(play_seeds(staggered_at, seed, runs, min_words, echo_row)))
        if burst:
            print(f"burst: {n} call(s) ...", file=sys.stderr, flush=True)
            results.append(pooled(play_seeds(burst_at, seed, runs, min_words, echo_row)))
    return results


def run_burst(
    n: int,
    prompts: int,
    seed: int,
    env: dict[str, str],
    offline: OfflineTranscriber,
    env_file: Path,
    stagger: float = bc.BURST_STAGGER_SECONDS,
) -> LiveResult:
    calls = bench_calls(n, 0.0, seed, prompts)
    return run_calls(calls, 0.0, seed, env, offline, env_file, stagger, prompts)


def _counted(count: int | None) -> str:
    return f"{count} concurrent call(s)" if count is not None else "none of the counts tried"


def sweep_summary(results: list[LiveResult]) -> str:
    """The table and the largest count holding the bar, three ways: every pool judged on its
    own; WER judged on each scenario's whole sweep and at a count only where its interval
    lies above the bar (benchmarks/wer_gap.py); WER aside, how far the load goes before lags
    or losses give way. A live WER above the offline one comes from each segment being
    decoded in a window of its own, whatever the load (RESULTS.md, 2026-12-03 night), and a
    burst of a few calls has few words: one misheard prompt moves its WER by a point."""
    best = report.largest_holding(results)
    lines = [
        report.table([report.live_row(r) for r in results]),
        "",
        f"Bar: {report.bar_text()}.",
        f"Largest count holding the bar, each pool judged on its own: {_counted(best)}.",
    ]
    for name, gap in report.scenario_gaps(results).items():
        lines.append(
            f"WER gap of the {name} runs, all counts: {report.gap_text(gap)} points "
            f"over {gap.words} words."
        )
    pooled_wer = report.largest_holding_pooled_wer(results)
    lines.append(
        "Largest count holding it with WER judged on those pools (and at a count only where "
        f"its gap is above the bar beyond its 95 % interval): {_counted(pooled_wer)}."
    )
    load = report.largest_holding(results, lambda r: set(r.bar_failures) <= {"WER"})
    if load != pooled_wer:
        lines.append(f"Largest count holding it on lags and losses (WER aside): {_counted(load)}.")
    return "\n".join(lines)


def do_ingest(
    calls: int, seconds: float, procs: int | None, env: dict[str, str], env_file: Path
) -> IngestResult:
    print(f"ingest: {calls} call(s) of {seconds:.0f} s ...", file=sys.stderr, flush=True)
    return run_ingest(calls, seconds, procs, env, env_file)


def ingest_settings(env: dict[str, str], env_file: Path) -> Settings:
    return h.bench_settings({"DEFAULT_PROCESSING_MODE": "postcall_only", **env}, env_file)


def load_note(before: float) -> str:
    """Other load on the machine during a run (its lags suffer first; CPU seconds less)."""
    return f"Load average (1 min): {before:.2f} before, {os.getloadavg()[0]:.2f} after."


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    env = h.parse_env_args(args.env)
    results: list[LiveResult | IngestResult] = []
    blocks: list[tuple[str, str, Settings]] = []  # (title, body, settings) to record
    if args.command in ("live", "burst"):
        offline = OfflineTranscriber()
        prompts = args.prompts if args.command == "burst" else None
        monologue = args.command == "burst" and args.monologue

        def play(seed: int) -> LiveResult:
            played = bench_calls(args.calls, args.seconds, seed, prompts, monologue)
            return run_calls(
                played, args.seconds, seed, env, offline, args.env_file, args.stagger, prompts
            )

        seeded = play_seeds(play, args.seed, args.runs, played=echo_row if args.runs > 1 else None)
        live = pooled(seeded)
        results += seeded
        rows = [*seeded, live] if len(seeded) > 1 else seeded
        body = f"{report.table([report.live_row(r) for r in rows])}\n\n{live_details(live)}"
        print(body)
        title = f"{args.command}, {args.calls} call(s)"
        blocks.append((title, body, h.bench_settings(env, args.env_file)))
    if args.command in ("sweep", "all"):
        counts = args.calls if args.command == "sweep" else _calls_list(DEFAULT_SWEEP)
        seconds = args.seconds if args.command == "sweep" else DEFAULT_SECONDS
        seed = args.seed if args.command == "sweep" else 1
        no_burst = args.command == "sweep" and args.no_burst
        sweep_runs = args.runs if args.command == "sweep" else 1
        min_words = args.min_words if args.command == "sweep" else DEFAULT_MIN_WORDS
        sweep = do_sweep(
            counts, seconds, seed, env, args.env_file, not no_burst, sweep_runs, min_words
        )
        results += sweep
        body = sweep_summary(sweep)
        print(body)
        report.plot(sweep, args.plot, f"streamsrv sweep, {seconds:.0f} s calls: {report.machine()}")
        print(f"plot: {args.plot}")
        blocks.append(("sweep", body, h.bench_settings(env, args.env_file)))
    if args.command in ("ingest", "all"):
        calls = args.calls if args.command == "ingest" else DEFAULT_INGEST_CALLS
        seconds = args.seconds if args.command == "ingest" else DEFAULT_INGEST_SECONDS
        procs = args.procs if args.command == "ingest" else None
        ingest = do_ingest(calls, seconds, procs, env, args.env_file)
        results.append(ingest)
        body = report.table([report.ingest_row(ingest)])
        print(body)
        blocks.append((f"ingest, {calls} calls", body, ingest_settings(env, args.env_file)))
    if args.command == "languages":
        load = os.getloadavg()[0]
        offline = OfflineTranscriber()  # one model and cache: both runs play the same audio
        runs = {
            how: languages.run_languages(
                how, args.per_language, args.seconds, args.seed, env, offline, args.env_file
            )
            for how in args.how or languages.HOWS
        }
        results += runs.values()
        body = f"{languages.summary(runs)}\n\n{load_note(load)}"
        print(body)
        title = f"languages, {args.per_language} call(s) each of {', '.join(languages.LANGUAGES)}"
        blocks.append((title, body, h.bench_settings(languages.server_env(env), args.env_file)))
    if args.command == "conversation":
        load = os.getloadavg()[0]
        offline = OfflineTranscriber()
        shapes = conversation.run_conversations(
            args.calls, args.seconds, args.seed, env, offline, args.env_file
        )
        results += shapes
        body = f"{conversation.summary(args.calls, shapes)}\n\n{load_note(load)}"
        print(body)
        title = f"conversation, {args.calls} call(s) per shape"
        blocks.append((title, body, h.bench_settings(env, args.env_file)))
    if args.record:
        for title, body, settings in blocks:
            report.record(title, body, settings)
    if args.out:
        report.to_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
