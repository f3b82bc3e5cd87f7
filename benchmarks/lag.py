"""Word lag and final lag of one call: pure functions of its reference timing and its messages.

No I/O and no clock reads here, so each rule can be unit-tested with hand-made messages. Times
are whatever unit `clock` maps call audio seconds to: the benchmark passes wall time (the moment
the frame holding that audio was sent); tests can keep the identity and use audio seconds.

Word timing is an estimate. The corpus knows only where each utterance's speech starts and ends.
Where the benchmark has heard the utterance alone offline (`timed`), a word the model heard ends
where its word timestamps put it, and the words between two heard ones share that span by
character counts. Otherwise the whole duration is shared that way: word k ends at start +
duration * chars(words 0..k) / chars(all words). Characters alone were seen to place words of
Asterisk's 73 s demo-instruct up to 2.4 s early (digits, pauses), and so to add that to their
lag.

A word "shows" the first time the call's live view (finals so far + latest partial) contains
it: the view's normalised words are aligned against the reference (minimum edit distance, ties
broken towards more exact matches) and every reference word matched exactly counts as shown
from then on, even if a later partial drops it. Only utterances that had started when a message
arrived are in the reference it is aligned against, so a word cannot be matched before it is
spoken in a later utterance.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from streamsrv.simulate import LiveView
from streamsrv.wer import normalise

Clock = Callable[[float], float]
"""Seconds of call audio -> the time that audio was spoken (sent)."""

Arrival = tuple[float, dict[str, Any]]
"""(arrival time, message) as collected from Redis, in arrival order."""

# A final "covers" an utterance when the utterance's end lies within [start - tol, end + tol]:
# VAD pads and trims speech by a few hundred ms, and calls leave >= 1 s between utterances.
COVER_TOLERANCE = 0.5


def identity(seconds: float) -> float:
    return seconds


@dataclass(frozen=True)
class RefUtterance:
    text: str
    start: float  # seconds of call audio where its speech starts
    end: float  # ... and ends
    word_ends: tuple[float, ...] | None = None  # per normalised word, where heard (see timed)


@dataclass(frozen=True)
class RefWord:
    word: str  # normalised (streamsrv.wer.normalise)
    utterance: int  # index into the call's utterances
    spoken: float  # estimated time the word has been said: clock(word end)
    opened: float  # clock(start of its utterance): from then on it may be matched


def reference_words(utterances: Sequence[RefUtterance], clock: Clock = identity) -> list[RefWord]:
    """Every reference word with its estimated end: where it was heard (`timed`), else by
    character-proportional timing."""
    out: list[RefWord] = []
    for index, utt in enumerate(utterances):
        words = normalise(utt.text)
        ends: Sequence[float] | None = utt.word_ends
        if ends is None or len(ends) != len(words):
            ends = _share_by_characters(words, [(-1, utt.start), (len(words), utt.end)])
        opened = clock(utt.start)
        out += [RefWord(w, index, clock(end), opened) for w, end in zip(words, ends, strict=True)]
    return out


def timed(utt: RefUtterance, heard: Sequence[tuple[str, float]]) -> RefUtterance:
    """`utt` with each word's end where the model heard it: `heard` is the model's normalised
    words of the utterance with their ends (call seconds). A reference word matched by one of
    them (minimum-edit-distance alignment, as for showing) ends where it does, clamped to the
    utterance and never before an earlier word; the words between two matched ones, or an end
    of the utterance, share that span by character counts."""
    words = normalise(utt.text)
    anchors = [(-1, utt.start)]
    for i, j in aligned_pairs(words, [w for w, _ in heard]):
        anchors.append((i, min(utt.end, max(anchors[-1][1], heard[j][1]))))
    anchors.append((len(words), utt.end))
    return replace(utt, word_ends=tuple(_share_by_characters(words, anchors)))


def _share_by_characters(words: Sequence[str], anchors: Sequence[tuple[int, float]]) -> list[float]:
    """Word ends from anchors (index, end), ordered, from (-1, start) to (len(words), end): the
    words after one anchor up to the next end at its time plus their character share of the
    span; the last word before the final anchor ends at its time."""
    ends: list[float] = []
    for (a, ta), (b, tb) in itertools.pairwise(anchors):
        last = min(b, len(words) - 1)
        span = words[a + 1 : last + 1]
        total = sum(len(w) for w in span) or 1
        done = 0
        for word in span:
            done += len(word)
            ends.append(ta + (tb - ta) * done / total)
    return ends


def matched_reference(ref: Sequence[str], hyp: Sequence[str]) -> set[int]:
    """Indices of `ref` matched exactly by a minimum-edit-distance alignment with `hyp`."""
    return {i for i, _ in aligned_pairs(ref, hyp)}


def aligned_pairs(ref: Sequence[str], hyp: Sequence[str]) -> list[tuple[int, int]]:
    """(i, j) for each ref[i] matched exactly by hyp[j] in a minimum-edit-distance alignment,
    in order.

    Among alignments of equal edit distance, one with the most exact matches is taken
    (cost: an edit weighs more than all possible matches together, a match subtracts one), and
    among those the one matching the earliest reference words: a partial "the" against "the
    cat the dog" is the first "the", the one already spoken."""
    n, m = len(ref), len(hyp)
    edit = n + m + 1
    rows = [[j * edit for j in range(m + 1)]]
    for i in range(1, n + 1):
        prev, row = rows[-1], [i * edit]
        r = ref[i - 1]
        for j in range(1, m + 1):
            diag = prev[j - 1] + (-1 if r == hyp[j - 1] else edit)
            row.append(min(diag, prev[j] + edit, row[j - 1] + edit))
        rows.append(row)
    matched: list[tuple[int, int]] = []
    i, j = n, m
    while i > 0 and j > 0:
        same = ref[i - 1] == hyp[j - 1]
        if rows[i][j] == rows[i - 1][j] + edit:
            i -= 1  # tracing back, deleting first puts matches on the earliest reference words
        elif rows[i][j] == rows[i - 1][j - 1] + (-1 if same else edit):
            if same:
                matched.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        else:
            j -= 1
    return matched[::-1]


def shown_at(words: Sequence[RefWord], messages: Iterable[Arrival]) -> list[float | None]:
    """For each reference word, the arrival time of the first live view that showed it."""
    view = LiveView()
    shown: list[float | None] = [None] * len(words)
    last: list[str] | None = None
    for arrival, message in messages:
        if message.get("type") not in ("partial", "final"):
            continue
        view.apply(message)
        hyp = normalise(view.text)
        if hyp == last:
            continue  # a message that changes no word is no progress
        last = hyp
        open_words = sum(1 for w in words if w.opened <= arrival)
        for index in matched_reference([w.word for w in words[:open_words]], hyp):
            if shown[index] is None:
                shown[index] = arrival
    return shown


def word_lags(words: Sequence[RefWord], messages: Iterable[Arrival]) -> list[float | None]:
    """Per reference word: time from being spoken to first showing; None if it never showed."""
    return [
        None if at is None else at - word.spoken
        for word, at in zip(words, shown_at(words, messages), strict=True)
    ]


def final_lags(
    utterances: Sequence[RefUtterance],
    messages: Iterable[Arrival],
    clock: Clock = identity,
    tolerance: float = COVER_TOLERANCE,
) -> list[float | None]:
    """Per utterance: time from its end to the arrival of the first final covering that end
    (final start - tolerance <= utterance end <= final end + tolerance); None if none came."""
    finals = [(at, m) for at, m in messages if m.get("type") == "final"]
    out: list[float | None] = []
    for utt in utterances:
        covering = [
            at for at, m in finals if m["start"] - tolerance <= utt.end <= m["end"] + tolerance
        ]
        out.append(min(covering) - clock(utt.end) if covering else None)
    return out


def finals_text(messages: Iterable[Arrival]) -> str:
    """The call's live transcript: its finals' texts in segment order."""
    finals = {m["segment"]: m["text"] for _, m in messages if m.get("type") == "final"}
    return " ".join(finals[k] for k in sorted(finals) if finals[k])


def percentile(values: Iterable[float | None], q: float) -> float:
    """q-th percentile (0-100, linear interpolation) of the values that are not None; nan if
    there are none."""
    present = [v for v in values if v is not None]
    return float(np.percentile(present, q)) if present else float("nan")
