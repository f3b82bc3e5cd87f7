"""Word error rate with the usual normalisation, so that only recognition errors count.

Case, punctuation and accents are dropped (the Spanish prompt texts are written without them:
"lider" for "líder"), hyphens split words, single digits are written out ("press 1"
and "press one" are the same words), a run of three or more single letters is one token
(an acronym spelled "m i s d n" or written "MISDN"), and a word written as two ("black list")
matches the one word ("blacklist").
"""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"[a-z0-9']+")
_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def fold_accents(text: str) -> str:
    """ "Líder, contraseña" -> "Lider, contrasena": letters without their combining marks."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def normalise(text: str) -> list[str]:
    text = fold_accents(text).lower().replace("-", " ")
    words = [w.strip("'") for w in _WORD.findall(text)]
    words = [_DIGITS[int(w)] if len(w) == 1 and w.isdigit() else w for w in words if w]
    out: list[str] = []
    run: list[str] = []
    for word in [*words, ""]:
        if len(word) == 1 and word.isalpha():
            run.append(word)
            continue
        out.extend(["".join(run)] if len(run) >= 3 else run)
        run = []
        if word:
            out.append(word)
    return out


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words, where a word written as two ("black list" for
    "blacklist", "voice mail" for "voicemail") matches at no cost either way: a spelling
    convention, as the normalisation's hyphens are, not a recognition error."""
    before: list[int] = []  # the row two reference words back
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            best = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
            if j >= 2 and r == hyp[j - 2] + h:
                best = min(best, previous[j - 2])
            if i >= 2 and ref[i - 2] + r == h:
                best = min(best, before[j - 1])
            current.append(best)
        before, previous = previous, current
    return previous[-1]


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = normalise(reference), normalise(hypothesis)
    return edit_distance(ref, hyp) / max(1, len(ref))


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    """Errors over all pairs divided by all reference words (not a mean of per-call rates)."""
    errors = sum(edit_distance(normalise(r), normalise(h)) for r, h in pairs)
    return errors / max(1, sum(len(normalise(r)) for r, _ in pairs))
