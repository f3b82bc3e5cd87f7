"""benchmarks/languages.py: per-language WER, finals' languages and detections, from hand-made
per-call results in the shape LiveResult.per_call has."""

from __future__ import annotations

from typing import Any

from benchmarks.languages import language_rows


def call(
    language: str,
    reference: str,
    finals: list[tuple[str, str]],
    detected: list[tuple[str, float]],
) -> dict[str, Any]:
    """One measured call: its finals and detections as (language, text or probability)."""
    messages: list[tuple[float, dict[str, Any]]] = [
        (1.0, {"type": "language_detected", "language": d, "probability": p}) for d, p in detected
    ]
    messages += [(2.0, {"type": "final", "language": f, "text": t}) for f, t in finals]
    messages.append((2.5, {"type": "final", "language": "en", "text": ""}))  # empty: not counted
    return {
        "language": language,
        "reference": reference,
        "finals": " ".join(t for _, t in finals),
        "offline": reference,
        "word_lags": [0.5] * len(reference.split()),
        "messages": messages,
    }


def test_rows_group_calls_by_spoken_language() -> None:
    per_call = [
        call(
            "es",
            "el líder ha dejado la conferencia",
            [("es", "El lider ha dejado la")],
            [("es", 0.93)],
        ),
        call("en", "one two three four", [("en", "one two three four")], []),
        call(
            "en",
            "five six seven eight",
            [("en", "five six"), ("es", "siete ocho")],
            [("es", 0.7), ("en", 0.95)],
        ),
        {"language": "es", "processing_mode": "postcall_only"},  # no transcript: left out
    ]
    rows = {r["spoken"]: r for r in language_rows("auto", per_call)}
    assert list(rows) == ["en", "es"]
    en, es = rows["en"], rows["es"]
    assert (en["calls"], en["words"], es["calls"], es["words"]) == ("2", "8", "1", "6")
    assert en["WER live / offline"] == "25.0% / 0.0%"  # 2 of 8 words, over both calls
    assert es["WER live / offline"] == "16.7% / 0.0%"  # accents aside, one word missing
    assert en["finals in"] == "en 2, es 1"
    assert en["detected per call"] == "-; es 0.70 -> en 0.95"
    assert es["detected per call"] == "es 0.93"
    assert es["language set by"] == "auto"
