"""`languages`: English and Spanish calls at once on the multilingual base model, with each
call's language set by its context and with LANGUAGE=auto (decided once per call, from its first
seconds of speech): the WER of the live finals per language, what auto decided for each call,
and the WER of the same audio transcribed offline with its language given.

Call i is the same sentences in each language (prompts recorded in both), so the languages
differ in what the model does with them, not in what they say.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import calls as bc
from benchmarks import lag, report
from benchmarks.live import LiveResult, call_seed, run_calls
from benchmarks.offline import OfflineTranscriber
from streamsrv.wer import corpus_wer

LANGUAGES = ("en", "es")
HOWS = ("context", "auto")
MODEL = "base"  # the bundled multilingual model (the CPU default, tiny.en, is English only)


def server_env(env: dict[str, str]) -> dict[str, str]:
    """The base model unless told otherwise; LANGUAGE=auto always (a context overrides it)."""
    return {"REALTIME_WHISPER_MODEL": MODEL, **env, "LANGUAGE": "auto"}


def run_languages(
    how: str,
    per_language: int,
    seconds: float,
    seed: int,
    env: dict[str, str],
    offline: OfflineTranscriber,
    env_file: Path,
) -> LiveResult:
    """`per_language` calls in each language, all at once; with how="context" each posts its
    language before it connects, with "auto" none does."""
    calls = [
        bc.build_bench_call(call_seed(seed, i), seconds, language=language, also_in=LANGUAGES)
        for language in LANGUAGES
        for i in range(per_language)
    ]
    contexts = [{"language": c.language} if how == "context" else {} for c in calls]
    return run_calls(calls, seconds, seed, server_env(env), offline, env_file, contexts=contexts)


def detected(messages: list[lag.Arrival]) -> str:
    """What LANGUAGE=auto decided for a call, with its probability ("es 0.93"; a later change
    follows after "->"); "-" when nothing was detected."""
    decisions = [m for _, m in messages if m["type"] == "language_detected"]
    return " -> ".join(f"{m['language']} {m['probability']:.2f}" for m in decisions) or "-"


def final_languages(messages: list[lag.Arrival]) -> Counter[str]:
    """How many of a call's non-empty finals came in each language."""
    return Counter(
        str(m.get("language")) for _, m in messages if m["type"] == "final" and m["text"]
    )


def language_rows(how: str, per_call: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per spoken language over the measured calls of one run (LiveResult.per_call;
    calls served postcall_only have no transcript and are left out)."""
    rows = []
    measured = [c for c in per_call if "finals" in c]
    for language in sorted({c["language"] for c in measured}):
        group = [c for c in measured if c["language"] == language]
        live = corpus_wer([(c["reference"], c["finals"]) for c in group])
        offline = corpus_wer([(c["reference"], c["offline"]) for c in group])
        languages: Counter[str] = sum((final_languages(c["messages"]) for c in group), Counter())
        lags = [x for c in group for x in c["word_lags"]]
        rows.append(
            {
                "language set by": how,
                "spoken": language,
                "calls": str(len(group)),
                "words": str(len(lags)),
                "WER live / offline": f"{100 * live:.1f}% / {100 * offline:.1f}%",
                "word lag p95 s": report.num(lag.percentile(lags, 95)),
                "finals in": ", ".join(f"{k} {n}" for k, n in languages.most_common()),
                "detected per call": "; ".join(detected(c["messages"]) for c in group),
            }
        )
    return rows


def summary(runs: dict[str, LiveResult]) -> str:
    rows = [row for how, r in runs.items() for row in language_rows(how, r.per_call)]
    runs_table = report.table([{"run": how, **report.live_row(r)} for how, r in runs.items()])
    return f"{report.table(rows)}\n\nEach run as the live benchmark reports it:\n\n{runs_table}"
