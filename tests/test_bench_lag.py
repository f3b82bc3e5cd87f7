"""benchmarks/lag.py: word lag and final lag from hand-made reference timing and Redis messages.

Times use the identity clock (seconds of call audio) unless a test says otherwise, and are
chosen as binary fractions so that exact equality holds.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks import lag
from benchmarks.lag import RefUtterance, RefWord

CALL = "call-1"


class Messages:
    """Builds one call's (arrival, message) list in the Redis contract shape, seq from 1."""

    def __init__(self) -> None:
        self.arrivals: list[lag.Arrival] = []

    def _add(self, arrival: float, kind: str, **fields: Any) -> Messages:
        seq = len(self.arrivals) + 1
        message = {"type": kind, "call_id": CALL, "seq": seq, "emitted_at": arrival, **fields}
        self.arrivals.append((arrival, message))
        return self

    def started(self, at: float) -> Messages:
        return self._add(
            at,
            "call_started",
            started_at=at,
            peer="127.0.0.1:4000",
            sample_rate=8000,
            processing_mode="live",
        )

    def partial(
        self, at: float, segment: int, text: str, start: float, end: float, audio_end: float
    ) -> Messages:
        return self._add(
            at, "partial", segment=segment, text=text, start=start, end=end, audio_end=audio_end
        )

    def final(self, at: float, segment: int, text: str, start: float, end: float) -> Messages:
        return self._add(
            at,
            "final",
            segment=segment,
            text=text,
            start=start,
            end=end,
            words=[],
            language="en",
            avg_logprob=-0.2,
            no_speech_prob=0.01,
        )

    def dtmf(self, at: float, digit: str) -> Messages:
        return self._add(at, "dtmf", digit=digit, at=at)

    def ended(self, at: float) -> Messages:
        return self._add(
            at,
            "call_ended",
            ended_at=at,
            duration=at,
            audio_seconds=at,
            reason="hangup",
            segments=1,
            job_id=None,
            processing_mode="live",
        )


# Two utterances of three-letter words, so each word takes an equal share of its utterance:
# "one two six" over [0, 3] -> spoken at 1, 2, 3; "red big cat" over [5, 8] -> 6, 7, 8.
UTTS = [RefUtterance("One, two, six.", 0.0, 3.0), RefUtterance("Red big cat!", 5.0, 8.0)]


def words_of(utterances: list[RefUtterance] = UTTS) -> list[RefWord]:
    return lag.reference_words(utterances)


# --- reference_words ---------------------------------------------------------------------------


def test_reference_words_share_duration_by_character_count() -> None:
    # normalised: hello(5) world(5) wide(4) ok(2) = 16 characters over 8 s from t=1
    words = lag.reference_words([RefUtterance("Hello, world-wide OK", 1.0, 9.0)])
    assert [w.word for w in words] == ["hello", "world", "wide", "ok"]
    assert [w.spoken for w in words] == [3.5, 6.0, 8.0, 9.0]
    assert all(w.utterance == 0 and w.opened == 1.0 for w in words)


def test_reference_words_index_utterances_and_apply_the_clock() -> None:
    def clock(seconds: float) -> float:
        return 100.0 + 2 * seconds

    utts = [
        RefUtterance("ab c", 0.0, 3.0),  # ab ends at 2, c at 3
        RefUtterance("...", 3.5, 4.0),  # no words: contributes nothing
        RefUtterance("xyz", 4.0, 6.0),
    ]
    words = lag.reference_words(utts, clock)
    assert words == [
        RefWord("ab", 0, 104.0, 100.0),
        RefWord("c", 0, 106.0, 100.0),
        RefWord("xyz", 2, 112.0, 108.0),
    ]


def test_reference_words_last_word_ends_with_its_utterance() -> None:
    words = lag.reference_words([RefUtterance("a bb ccc dddd eeeee", 2.25, 7.75)])
    assert words[-1].spoken == 7.75
    spoken = [w.spoken for w in words]
    assert spoken == sorted(spoken) and spoken[0] > 2.25


# --- timed: words where the model heard them -------------------------------------------------


def test_timed_words_end_where_heard_and_the_rest_share_by_characters() -> None:
    # "two" heard at 4.0 and "ten" at 9.0; "one" shares [1, 4] with "two" (3 + 3 characters),
    # "three" and "four" share [4, 9] with "ten" (5 + 4 + 3 characters), none after "ten"
    utt = RefUtterance("One, two, three four ten.", 1.0, 10.0)
    heard = [("won", 0.5), ("two", 4.0), ("tree", 5.0), ("for", 6.0), ("ten", 9.0)]
    ends = lag.timed(utt, heard).word_ends
    assert ends == pytest.approx((2.5, 4.0, 4.0 + 5 * 5 / 12, 4.0 + 5 * 9 / 12, 9.0))
    assert [w.spoken for w in lag.reference_words([lag.timed(utt, heard)])] == list(ends or ())


def test_timed_clamps_heard_ends_to_the_utterance_and_to_order() -> None:
    # "bb" heard before "aa": it ends with "aa"; "cc" heard past the utterance: it ends with it
    utt = RefUtterance("aa bb cc", 2.0, 5.0)
    ends = lag.timed(utt, [("aa", 3.0), ("bb", 2.5), ("cc", 7.0)]).word_ends
    assert ends == (3.0, 3.0, 5.0)


def test_timed_with_nothing_heard_is_the_character_estimate() -> None:
    utt = RefUtterance("Hello, world-wide OK", 1.0, 9.0)
    assert lag.timed(utt, []).word_ends == (3.5, 6.0, 8.0, 9.0)


def test_reference_words_ignore_word_ends_of_another_text() -> None:
    utt = RefUtterance("Hello, world-wide OK", 1.0, 9.0, word_ends=(1.5, 2.0))
    assert [w.spoken for w in lag.reference_words([utt])] == [3.5, 6.0, 8.0, 9.0]


# --- matched_reference -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "hyp", "matched"),
    [
        ("a b c", "a b c", {0, 1, 2}),
        ("a b c", "a x c", {0, 2}),  # a substitution is not a match
        ("one two three four", "one two", {0, 1}),  # a partial's prefix
        ("a b", "a uh b", {0, 1}),  # an insertion does not break the alignment
        ("the cat the dog", "the", {0}),  # tie: the earliest "the", the one already spoken
        ("the cat the dog", "the dog", {0, 3}),  # tie: earliest "the" with the only "dog"
        ("a b", "b a", {0}),  # one match either way; the earliest reference word
        ("a b c d", "x y z a", set()),  # 4 substitutions beat 6 edits around one match
        ("", "a b", set()),
        ("a b", "", set()),
    ],
)
def test_matched_reference(ref: str, hyp: str, matched: set[int]) -> None:
    assert lag.matched_reference(ref.split(), hyp.split()) == matched


def test_aligned_pairs_name_the_matching_hypothesis_word_in_order() -> None:
    ref, hyp = ["the", "cat", "sat", "on", "the", "mat"], ["a", "cat", "sat", "in", "the", "mat"]
    assert lag.aligned_pairs(ref, hyp) == [(1, 1), (2, 2), (4, 4), (5, 5)]
    assert lag.matched_reference(ref, hyp) == {1, 2, 4, 5}


def test_matched_reference_prefers_more_matches_among_equal_edit_distance() -> None:
    # "a b" vs "b c": 2 edits either way (sub, sub) or (delete a, match b, insert c).
    assert lag.matched_reference(["a", "b"], ["b", "c"]) == {1}


# --- shown_at / word_lags ----------------------------------------------------------------------


def test_word_shows_at_first_live_view_containing_it() -> None:
    msgs = (
        Messages()
        .started(0.0)
        .partial(1.5, 0, "One", 0.0, 1.5, 1.5)
        .partial(2.5, 0, "one two", 0.0, 2.5, 2.5)
        .final(3.75, 0, "One, two, six.", 0.0, 3.0)
        .partial(6.5, 1, "Red", 5.0, 6.5, 6.5)
        .final(8.5, 1, "Red big cat.", 5.0, 8.0)
        .ended(9.0)
    )
    words = words_of()
    assert lag.shown_at(words, msgs.arrivals) == [1.5, 2.5, 3.75, 6.5, 8.5, 8.5]
    assert lag.word_lags(words, msgs.arrivals) == [0.5, 0.5, 0.75, 0.5, 1.5, 0.5]


def test_live_view_is_finals_so_far_plus_latest_partial() -> None:
    # After final 0, a partial of segment 1 alone still shows words of utterance 1: the view is
    # "one two six red", not just the partial aligned from the start of the reference.
    msgs = (
        Messages().final(3.5, 0, "one two six", 0.0, 3.0).partial(6.5, 1, "red big", 5.0, 6.5, 6.5)
    )
    assert lag.shown_at(words_of(), msgs.arrivals) == [3.5, 3.5, 3.5, 6.5, 6.5, None]


def test_partial_that_drops_a_word_does_not_unshow_it() -> None:
    msgs = (
        Messages()
        .partial(2.5, 0, "one two", 0.0, 2.5, 2.5)
        .partial(2.75, 0, "one", 0.0, 2.75, 2.75)  # "two" dropped
        .partial(3.25, 0, "one two six", 0.0, 3.0, 3.25)  # "two" back, later
    )
    assert lag.shown_at(words_of(), msgs.arrivals)[:3] == [2.5, 2.5, 3.25]


def test_other_message_types_are_ignored() -> None:
    msgs = Messages().started(0.0).dtmf(1.0, "5").partial(2.5, 0, "one", 0.0, 2.5, 2.5).ended(9.0)
    assert lag.shown_at(words_of(), msgs.arrivals) == [2.5, None, None, None, None, None]


def test_word_of_later_utterance_is_not_matched_before_it_started() -> None:
    # "red" is guessed (or hallucinated) at 4.0, before utterance 1 starts at 5.0.
    msgs = Messages().final(3.5, 0, "one two six red", 0.0, 3.0).final(6.5, 1, "red big", 5.0, 6.5)
    words = words_of()
    assert lag.shown_at(words, msgs.arrivals) == [3.5, 3.5, 3.5, 6.5, 6.5, None]


def test_message_with_no_new_words_is_not_progress() -> None:
    # The same words again (differing only in case and punctuation) after utterance 1 opened do
    # not count: "red" shows at the next message that changes the words, not at 5.5.
    msgs = (
        Messages()
        .final(3.5, 0, "one two six", 0.0, 3.0)
        .partial(4.5, 1, "red", 4.5, 4.5, 4.5)
        .partial(5.5, 1, "Red.", 4.5, 5.5, 5.5)
        .partial(6.5, 1, "red big", 4.5, 6.5, 6.5)
    )
    shown = lag.shown_at(words_of(), msgs.arrivals)
    assert shown[3:] == [6.5, 6.5, None]


def test_repeated_word_is_matched_to_the_earliest_open_reference_word() -> None:
    utts = [RefUtterance("the cat", 0.0, 2.0), RefUtterance("the dog", 4.0, 6.0)]
    msgs = (
        Messages()
        .partial(1.0, 0, "the", 0.0, 1.0, 1.0)
        .final(2.5, 0, "the cat", 0.0, 2.0)
        .partial(5.0, 1, "the", 4.0, 5.0, 5.0)
        .partial(6.5, 1, "the dog", 4.0, 6.5, 6.5)
    )
    assert lag.shown_at(lag.reference_words(utts), msgs.arrivals) == [1.0, 2.5, 5.0, 6.5]


def test_substituted_and_never_shown_words_are_none() -> None:
    msgs = Messages().final(3.5, 0, "one too six", 0.0, 3.0).ended(9.0)
    words = words_of()
    assert lag.shown_at(words, msgs.arrivals) == [3.5, None, 3.5, None, None, None]
    assert lag.word_lags(words, msgs.arrivals) == [2.5, None, 0.5, None, None, None]


def test_no_messages_shows_nothing() -> None:
    assert lag.word_lags(words_of(), []) == [None] * 6
    assert lag.shown_at([], Messages().partial(1.0, 0, "one", 0.0, 1.0, 1.0).arrivals) == []


def test_word_lags_in_wall_time_through_a_clock() -> None:
    def clock(seconds: float) -> float:
        return 1000.0 + seconds

    words = lag.reference_words(UTTS, clock)
    msgs = (
        Messages()
        .final(1003.5, 0, "one two six red", 0.0, 3.0)  # "red" before 1005: not matched
        .partial(1006.25, 1, "red", 5.0, 6.0, 6.25)
    )
    assert lag.word_lags(words, msgs.arrivals) == [2.5, 1.5, 0.5, 0.25, None, None]


# --- final_lags --------------------------------------------------------------------------------


def test_final_lag_is_from_utterance_end_to_first_covering_final() -> None:
    utts = [*UTTS, RefUtterance("never finalised", 10.0, 12.0)]
    msgs = (
        Messages()
        .partial(3.25, 0, "one two six", 0.0, 3.0, 3.25)  # partials never cover
        .final(4.0, 0, "one two six", 0.25, 2.75)
        .final(9.5, 1, "red big cat", 5.0, 8.0)
        .final(9.0, 2, "red big cat", 5.0, 8.0)  # arrival order need not be time order
        .ended(13.0)
    )
    assert lag.final_lags(utts, msgs.arrivals) == [1.0, 1.0, None]


def test_final_covers_within_tolerance_inclusive() -> None:
    tol = lag.COVER_TOLERANCE
    utt = [RefUtterance("one two six", 0.0, 3.0)]
    at_end = Messages().final(4.0, 0, "x", 0.0, 3.0 - tol).arrivals
    past_end = Messages().final(4.0, 0, "x", 0.0, 3.0 - tol - 0.125).arrivals
    at_start = Messages().final(4.0, 0, "x", 3.0 + tol, 5.0).arrivals
    past_start = Messages().final(4.0, 0, "x", 3.0 + tol + 0.125, 5.0).arrivals
    assert lag.final_lags(utt, at_end) == [1.0]
    assert lag.final_lags(utt, past_end) == [None]
    assert lag.final_lags(utt, at_start) == [1.0]
    assert lag.final_lags(utt, past_start) == [None]
    assert lag.final_lags(utt, past_end, tolerance=tol + 0.125) == [1.0]


def test_final_lags_through_a_clock() -> None:
    def clock(seconds: float) -> float:
        return 1000.0 + seconds

    msgs = Messages().final(1004.25, 0, "one two six", 0.0, 3.0)  # start/end in audio seconds
    assert lag.final_lags(UTTS[:1], msgs.arrivals, clock) == [1.25]


# --- finals_text -------------------------------------------------------------------------------


def test_finals_text_in_segment_order() -> None:
    msgs = (
        Messages()
        .partial(1.0, 0, "partial words", 0.0, 1.0, 1.0)
        .final(4.0, 1, "Second.", 2.0, 3.0)
        .final(4.5, 0, "First,", 0.0, 1.5)
        .final(5.0, 2, "", 3.5, 4.0)  # empty final: no double space
        .final(6.0, 3, "third", 4.5, 5.5)
        .partial(6.5, 4, "not final", 6.0, 6.5, 6.5)
        .ended(7.0)
    )
    assert lag.finals_text(msgs.arrivals) == "First, Second. third"


def test_finals_text_without_finals_is_empty() -> None:
    assert lag.finals_text([]) == ""
    assert lag.finals_text(Messages().partial(1.0, 0, "hello", 0.0, 1.0, 1.0).arrivals) == ""


# --- percentile --------------------------------------------------------------------------------


@pytest.mark.parametrize(("q", "expected"), [(0, 1.0), (50, 2.5), (95, 3.85), (100, 4.0)])
def test_percentile_ignores_none_and_interpolates(q: float, expected: float) -> None:
    assert lag.percentile([None, 4.0, 1.0, None, 3.0, 2.0], q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(lag.percentile([], 95))
    assert math.isnan(lag.percentile([None, None], 50))


def test_percentile_accepts_a_generator() -> None:
    assert lag.percentile((x for x in [None, 1.0, 3.0]), 50) == 2.0


# --- the sweep's verdict -------------------------------------------------------------------------


def test_a_count_holds_the_bar_only_when_every_scenario_at_it_does() -> None:
    from types import SimpleNamespace
    from typing import cast

    from benchmarks.live import LiveResult
    from benchmarks.report import largest_holding

    def run(calls: int, holds: bool, misses: tuple[str, ...] = ("word lag",)) -> LiveResult:
        failures = [] if holds else list(misses)
        return cast(LiveResult, SimpleNamespace(calls=calls, bar_failures=failures))

    staggered_and_burst = [run(4, True), run(4, True), run(6, True), run(6, False), run(8, True)]
    assert largest_holding(staggered_and_burst) == 4
    assert largest_holding([run(2, True), run(4, True)]) == 4
    assert largest_holding([run(1, False), run(2, True)]) is None


def test_parts_of_the_bar_set_aside_are_not_judged() -> None:
    from types import SimpleNamespace
    from typing import cast

    from benchmarks.live import LiveResult
    from benchmarks.report import largest_holding

    def run(calls: int, *misses: str) -> LiveResult:
        return cast(LiveResult, SimpleNamespace(calls=calls, bar_failures=list(misses)))

    results = [run(4), run(6, "WER"), run(6), run(8, "WER", "word lag"), run(10)]
    assert largest_holding(results) == 4
    assert largest_holding(results, lambda r: set(r.bar_failures) <= {"WER"}) == 6
    assert largest_holding(results, lambda r: set(r.bar_failures) <= {"WER", "word lag"}) == 10


# --- runs pooled over seeds ----------------------------------------------------------------------


def _run(seed: int, calls: list[dict[str, Any]], **figures: Any) -> Any:
    """A LiveResult of a burst at `seed` with these per-call records; other figures zero."""
    import dataclasses

    from benchmarks.live import LiveResult

    zero: dict[str, Any] = {
        f.name: 0 for f in dataclasses.fields(LiveResult) if f.default is dataclasses.MISSING
    }
    values = {**zero, "seed": seed, "calls": len(calls), "env": {}, "model": "tiny.en"}
    return LiveResult(**{**values, "prompts": 4, "per_call": calls, **figures})


def test_pooled_runs_take_wer_over_all_words_and_lags_over_all_of_them() -> None:
    from benchmarks.pooled import pooled

    short = {  # 4 words, 2 wrong: 50 % alone
        "reference": "press one to record",
        "finals": "press won two record",
        "offline": "press one to record",
        "word_lags": [0.5, 0.5, None, 0.5],
        "final_lags": [1.0],
    }
    long = {  # 16 words, none wrong
        "reference": " ".join(["please check the number and try again now"] * 2),
        "finals": " ".join(["please check the number and try again now"] * 2),
        "offline": " ".join(["please check the number and try again now"] * 2),
        "word_lags": [0.1] * 15 + [1.9],
        "final_lags": [2.0, 2.5],
    }
    skipped = {"call_id": "x", "seed": 2001, "processing_mode": "postcall_only"}
    one = _run(1, [short], server_cpu_s=2.0, audio_seconds=10.0, peak_rss_mb=300.0)
    two = _run(2, [long, skipped], server_cpu_s=1.0, audio_seconds=20.0, peak_rss_mb=350.0)
    both = pooled([one, two])
    assert both.final_wer == pytest.approx(2 / 20)  # not the mean of 50 % and 0 %
    assert both.offline_wer == 0.0
    assert (both.words, both.words_missing, both.utterances) == (20, 1, 3)
    assert both.word_lag_p50 == pytest.approx(0.1)
    assert both.final_lag_p95 == pytest.approx(lag.percentile([1.0, 2.0, 2.5], 95))
    assert both.cpu_per_audio_s == pytest.approx(3.0 / 30.0)
    assert both.peak_rss_mb == 350.0
    assert (both.seed, both.runs, len(both.per_call)) == (1, 2, 3)
    assert "seeds 1 to 2" in both.scenario
    assert both.bar_failures == ["WER"]


def test_play_seeds_plays_on_until_the_pool_holds_enough_words() -> None:
    from benchmarks.pooled import MAX_RUNS, play_seeds

    seeds: list[int] = []

    def play(seed: int) -> Any:
        seeds.append(seed)
        return _run(seed, [], words=30, runs=1)

    assert [r.seed for r in play_seeds(play, 5, runs=2)] == [5, 6]
    seeds.clear()
    assert len(play_seeds(play, 1, runs=2, min_words=100)) == 4  # 4 x 30 words reach 100; 3 do not
    assert seeds == [1, 2, 3, 4]
    assert len(play_seeds(play, 1, runs=1, min_words=10**6)) == MAX_RUNS
    shown: list[int] = []
    play_seeds(play, 3, runs=3, min_words=60, played=lambda r: shown.append(r.seed))
    assert shown == [3, 4, 5]  # runs already hold 90 words: no more


# --- how sure a WER gap is -----------------------------------------------------------------------


def _call(words: int, live: int, offline: int) -> dict[str, Any]:
    """A call record of `words` reference words with that many live and offline errors."""
    ref = [f"w{i}" for i in range(words)]
    return {
        "reference": " ".join(ref),
        "finals": " ".join(["x"] * live + ref[live:]),
        "offline": " ".join(["x"] * offline + ref[offline:]),
    }


def test_wer_gap_is_over_all_words_and_its_interval_follows_the_spread_of_calls() -> None:
    from benchmarks.wer_gap import wer_gap

    even = wer_gap([_call(50, 2, 1)] * 8)  # every call the same: nothing to be unsure of
    assert (even.words, even.gap) == (400, pytest.approx(8 / 400))
    assert even.low == pytest.approx(even.gap) and even.high == pytest.approx(even.gap)

    # the same 8 extra errors in 400 words, all in one call: the pool may or may not hold it
    lumped = wer_gap([_call(50, 8, 0)] + [_call(50, 1, 1)] * 7)
    assert lumped.gap == pytest.approx(8 / 400)
    assert lumped.low < 0.005 and lumped.high > 0.03
    assert wer_gap([_call(50, 8, 0)] + [_call(50, 1, 1)] * 7) == lumped  # reproducible
    assert wer_gap([]).words == 0


def test_pooled_wer_rule_judges_wer_on_the_whole_sweep_and_a_count_only_when_sure() -> None:
    from benchmarks.report import largest_holding, largest_holding_pooled_wer

    def run(count: int, records: list[dict[str, Any]], **figures: Any) -> Any:
        r = _run(1, records, **figures)
        r.calls = count
        return r

    clean = [_call(30, 0, 0)] * 10
    # 4 errors in 300 words, all in one call: over the bar on its own, but unsure
    unsure = run(1, [_call(30, 4, 0)] + [_call(30, 0, 0)] * 9, final_wer=4 / 300)
    assert unsure.bar_failures == ["WER"]
    results = [unsure, run(2, clean)]
    assert largest_holding(results) is None
    assert largest_holding_pooled_wer(results) == 2  # 4 errors in 600 words over the sweep

    # one error in every call: 3.3 points at 4 calls, surely; 0.7 over the whole sweep
    sure = run(4, [_call(30, 1, 0)] * 10, final_wer=10 / 300)
    assert sure.gap.low > 0.03
    results = [run(1, clean), run(2, clean), sure, run(6, clean), run(8, clean)]
    assert largest_holding_pooled_wer(results) == 2
    assert largest_holding_pooled_wer([run(1, clean), sure]) is None  # 5 points over the sweep

    slow = run(4, clean, word_lag_p95=2.5)
    assert largest_holding_pooled_wer([unsure, run(2, clean), slow]) == 2  # lags: at each count
