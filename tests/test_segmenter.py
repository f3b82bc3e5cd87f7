"""Segmenter: per-chunk speech probabilities in, padded speech segments out (pure logic).

Positions are 16 kHz sample indices; chunk k covers [k * CHUNK, (k + 1) * CHUNK).
With the defaults used here (threshold 0.5, min silence 500 ms = 8000 samples, pad 200 ms = 3200
samples, min speech 200 ms = 3200 samples), a segment closes on the 16th chunk below the lower
threshold (16 * 512 = 8192 >= 8000) and needs 7 chunks of speech (7 * 512 = 3584 >= 3200).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamsrv.asr.segmenter import Segment, Segmenter
from streamsrv.asr.vad import CHUNK

PAD = 3200
SPEECH, QUIET = 0.9, 0.0


def make(
    threshold: float = 0.5,
    min_silence_ms: int = 500,
    speech_pad_ms: int = 200,
    min_speech_ms: int = 200,
    max_segment_seconds: float = 20.0,
    soft_segment_seconds: float = 0.0,
) -> Segmenter:
    return Segmenter(
        threshold,
        min_silence_ms,
        speech_pad_ms,
        min_speech_ms,
        max_segment_seconds,
        soft_segment_seconds,
    )


def run(seg: Segmenter, probs: list[float], sizes: list[int] | None = None) -> list[Segment]:
    """Push probs (in pieces of `sizes`, the rest in one piece), then flush."""
    out: list[Segment] = []
    pos = 0
    for n in sizes or []:
        out += seg.push(probs[pos : pos + n])
        pos += n
    out += seg.push(probs[pos:])
    return out + seg.flush()


def at(chunk: int) -> int:
    return chunk * CHUNK


def test_burst_then_silence_gives_one_padded_segment() -> None:
    seg = make()
    probs = [QUIET] * 20 + [SPEECH] * 30 + [QUIET] * 40
    closed_at = None
    segments: list[Segment] = []
    for i, p in enumerate(probs):
        new = seg.push([p])
        if new:
            closed_at = i
        segments += new
        if i == 20:
            assert seg.in_speech
            assert seg.open_start == at(20) - PAD
    assert seg.flush() == []
    assert not seg.in_speech
    # speech in chunks 20..49: [10240, 25600), padded 3200 each side
    assert segments == [Segment(at(20) - PAD, at(50) + PAD, 30 * CHUNK, forced=False)]
    # closed by the 16th quiet chunk, not before
    assert closed_at == 50 + 15


def test_padding_is_clipped_at_the_call_start_and_at_the_audio_seen() -> None:
    seg = make()
    # speech from the very first chunk: no audio before sample 0
    segments = run(seg, [SPEECH] * 10)
    # flushed right after the speech: the end is the end of the audio, not 3200 samples later
    assert segments == [Segment(0, at(10), 10 * CHUNK)]


def test_end_pad_longer_than_min_silence_is_clipped_to_the_closing_chunk() -> None:
    seg = make(speech_pad_ms=600)  # 9600 samples of pad, but the segment closes after 8192
    segments = seg.push([QUIET] * 30 + [SPEECH] * 10 + [QUIET] * 16)
    assert segments == [Segment(at(30) - 9600, at(56), 10 * CHUNK)]


def test_start_pad_is_clipped_at_the_previous_segment_end() -> None:
    seg = make(speech_pad_ms=400)  # 6400 samples of pad, more than half of min silence
    probs = [QUIET] * 20 + [SPEECH] * 10 + [QUIET] * 16 + [SPEECH] * 10 + [QUIET] * 20
    first, second = run(seg, probs)
    assert first == Segment(at(20) - 6400, at(30) + 6400, 10 * CHUNK)
    # unclipped it would start at at(46) - 6400 = 17152, inside the first segment
    assert second == Segment(first.end, at(56) + 6400, 10 * CHUNK)


@pytest.mark.parametrize("chunks", [1, 3, 6])
def test_short_blips_are_dropped(chunks: int) -> None:
    seg = make()
    probs = ([QUIET] * 20 + [SPEECH] * chunks) * 3 + [QUIET] * 20
    assert run(seg, probs) == []
    assert not seg.in_speech


def test_speech_just_long_enough_is_kept() -> None:
    # 7 chunks = 3584 samples >= 200 ms; 6 chunks = 3072 samples < 200 ms
    probs = [QUIET] * 20 + [SPEECH] * 7 + [QUIET] * 20
    assert run(make(), probs) == [Segment(at(20) - PAD, at(27) + PAD, 7 * CHUNK)]


def test_a_blip_does_not_swallow_the_next_segment() -> None:
    seg = make()
    probs = [QUIET] * 20 + [SPEECH] * 2 + [QUIET] * 20 + [SPEECH] * 12 + [QUIET] * 20
    assert run(seg, probs) == [Segment(at(42) - PAD, at(54) + PAD, 12 * CHUNK)]


def test_a_pause_shorter_than_min_silence_does_not_split() -> None:
    seg = make()
    # 15 quiet chunks = 7680 samples < 8000
    probs = [QUIET] * 20 + [SPEECH] * 20 + [QUIET] * 15 + [SPEECH] * 20 + [QUIET] * 20
    assert run(seg, probs) == [Segment(at(20) - PAD, at(75) + PAD, 40 * CHUNK)]


def test_a_pause_of_min_silence_splits() -> None:
    seg = make()
    probs = [QUIET] * 20 + [SPEECH] * 20 + [QUIET] * 16 + [SPEECH] * 20 + [QUIET] * 20
    first, second = run(seg, probs)
    assert first == Segment(at(20) - PAD, at(40) + PAD, 20 * CHUNK)
    assert second == Segment(at(56) - PAD, at(76) + PAD, 20 * CHUNK)


# -- soft close: a monologue ends its segments at the pauses between its sentences -------------
# SOFT_PAUSE_MS = 160 ms: 5 chunks (5 * 512 = 2560 samples = 160 ms); 2 s = 62.5 chunks


def test_past_soft_length_a_short_pause_ends_the_segment() -> None:
    seg = make(soft_segment_seconds=2.0)
    probs = [QUIET] * 20 + [SPEECH] * 70 + [QUIET] * 5 + [SPEECH] * 20 + [QUIET] * 20
    first, second = run(seg, probs)
    # closed where the pause reached 160 ms: the pad after speech is cut short there
    assert first == Segment(at(20) - PAD, at(95), 70 * CHUNK)
    assert second == Segment(at(95), at(115) + PAD, 20 * CHUNK)


def test_before_soft_length_a_short_pause_does_not_end_the_segment() -> None:
    seg = make(soft_segment_seconds=2.0)
    probs = [QUIET] * 20 + [SPEECH] * 40 + [QUIET] * 5 + [SPEECH] * 40 + [QUIET] * 20
    # by its end it is past 2 s: the silence after it closes it at 160 ms too
    assert run(seg, probs) == [Segment(at(20) - PAD, at(110), 80 * CHUNK)]


def test_past_soft_length_a_pause_shorter_than_soft_pause_does_not_end_the_segment() -> None:
    seg = make(soft_segment_seconds=2.0)
    probs = [QUIET] * 20 + [SPEECH] * 70 + [QUIET] * 4 + [SPEECH] * 20 + [QUIET] * 20
    assert run(seg, probs) == [Segment(at(20) - PAD, at(119), 90 * CHUNK)]


def test_without_soft_length_a_short_pause_never_ends_the_segment() -> None:
    probs = [QUIET] * 20 + [SPEECH] * 70 + [QUIET] * 5 + [SPEECH] * 20 + [QUIET] * 20
    assert run(make(), probs) == [Segment(at(20) - PAD, at(115) + PAD, 90 * CHUNK)]


def test_hysteresis_probabilities_between_thresholds_keep_a_segment_open() -> None:
    seg = make(threshold=0.5)  # lower threshold 0.35
    probs = [QUIET] * 20 + [SPEECH] * 10 + [0.4] * 40 + [QUIET] * 20
    # 40 chunks at 0.4 (far longer than min silence) do not close it; they are not speech either
    assert run(seg, probs) == [Segment(at(20) - PAD, at(70) + PAD, 10 * CHUNK)]


def test_hysteresis_probabilities_between_thresholds_do_not_open_a_segment() -> None:
    seg = make(threshold=0.5)
    assert run(seg, [QUIET] * 5 + [0.45] * 100 + [QUIET] * 20) == []


def test_below_the_lower_threshold_counts_as_silence() -> None:
    seg = make(threshold=0.5)
    probs = [QUIET] * 20 + [SPEECH] * 10 + [0.3] * 16 + [SPEECH] * 10 + [QUIET] * 20
    assert len(run(seg, probs)) == 2


def test_flush_closes_an_open_segment() -> None:
    seg = make()
    assert seg.push([QUIET] * 10 + [SPEECH] * 20 + [QUIET] * 5) == []
    assert seg.in_speech
    # the speech ended 5 chunks (2560 samples) ago: the end pad is clipped to the audio seen
    assert seg.flush() == [Segment(at(10) - PAD, at(35), 20 * CHUNK)]
    assert not seg.in_speech
    assert seg.flush() == []


def test_flush_drops_an_open_blip() -> None:
    seg = make()
    seg.push([QUIET] * 10 + [SPEECH] * 3)
    assert seg.flush() == []


def test_flush_without_speech() -> None:
    seg = make()
    seg.push([QUIET] * 100)
    assert seg.flush() == []


# -- forced cuts ------------------------------------------------------------------------------
# max 2 s = 32000 samples. Speech starts at chunk 10, so the segment opens at 5120 - 3200 = 1920
# and reaches 32000 samples at chunk 66 (position 34304): 57 chunks, the last third is 48..66.


def test_overlong_segment_is_cut_at_the_quietest_chunk_of_its_last_third() -> None:
    seg = make(max_segment_seconds=2.0)
    probs = [QUIET] * 10 + [SPEECH] * 71 + [QUIET] * 30
    probs[20] = 0.55  # quiet, but in the first third
    probs[60] = 0.7  # the quietest chunk of the last third
    probs[64] = 0.8
    first, second = run(seg, probs)
    assert first.forced
    assert first.start == at(10) - PAD
    assert at(60) <= first.end <= at(61)  # inside the quiet chunk
    assert first.end - first.start <= 32000
    assert second == Segment(first.end, at(81) + PAD, second.speech_samples, forced=False)
    assert second.speech_samples == (81 - 61) * CHUNK


def test_cut_prefers_a_pause_in_the_last_third() -> None:
    seg = make(max_segment_seconds=2.0)
    probs = [QUIET] * 10 + [SPEECH] * 50 + [0.2] * 4 + [SPEECH] * 20 + [QUIET] * 30
    first, second = run(seg, probs)
    assert first.forced
    assert at(60) <= first.end <= at(64)  # in the pause (chunks 60..63)
    assert second.start == first.end
    assert not second.forced


def test_a_monologue_is_cut_into_contiguous_pieces() -> None:
    seg = make(max_segment_seconds=2.0)
    probs = [SPEECH] * 400 + [QUIET] * 30  # 12.8 s of speech without a pause
    segments = run(seg, probs)
    assert len(segments) >= 6
    assert all(s.forced for s in segments[:-1])
    assert segments[0].start == 0
    # the last piece covers the end of the speech (its pad may be cut short by a forced cut)
    assert at(400) < segments[-1].end <= at(400) + PAD
    for a, b in itertools.pairwise(segments):
        assert b.start == a.end  # no overlap, no gap
    for s in segments:
        assert 0 < s.end - s.start <= 32000 + CHUNK


def test_forced_cut_is_reported_when_it_happens() -> None:
    seg = make(max_segment_seconds=2.0)
    closed = seg.push([SPEECH] * 62)
    assert closed == []  # 62 * 512 = 31744 < 32000
    closed = seg.push([SPEECH])
    assert len(closed) == 1
    assert closed[0].forced
    assert seg.in_speech
    assert seg.open_start == closed[0].end


def test_forced_segment_counts_only_its_own_speech() -> None:
    seg = make(speech_pad_ms=0, max_segment_seconds=2.0)
    probs = [SPEECH] * 200 + [QUIET] * 30
    segments = run(seg, probs)
    assert sum(s.speech_samples for s in segments) == 200 * CHUNK
    for s in segments:
        assert s.speech_samples <= s.end - s.start


# -- properties -------------------------------------------------------------------------------

prob = st.one_of(
    st.sampled_from([0.0, 0.05, 0.2, 0.34, 0.36, 0.45, 0.5, 0.55, 0.8, 1.0]),
    st.floats(min_value=0.0, max_value=1.0),
)


def runs_of_probs(max_runs: int = 30) -> st.SearchStrategy[list[float]]:
    """Speech-like sequences: runs of one probability, lengths up to 40 chunks."""
    run_ = st.tuples(prob, st.integers(min_value=1, max_value=40))
    return st.lists(run_, max_size=max_runs).map(lambda rs: [p for p, n in rs for _ in range(n)])


def check_invariants(segments: list[Segment], seg: Segmenter, max_segment_seconds: float) -> None:
    for s in segments:
        assert 0 <= s.start < s.end <= seg.position, s
        assert s.end - s.start <= int(max_segment_seconds * 16000) + CHUNK, s
        if not s.forced:
            assert s.speech_samples >= seg.min_speech, s
    for a, b in itertools.pairwise(segments):
        assert a.end <= b.start, (a, b)


params = st.fixed_dictionaries(
    {
        "threshold": st.sampled_from([0.3, 0.5, 0.7]),
        "min_silence_ms": st.sampled_from([100, 300, 500]),
        "speech_pad_ms": st.sampled_from([0, 30, 100, 200, 400]),
        "min_speech_ms": st.sampled_from([0, 100, 250]),
        "max_segment_seconds": st.sampled_from([2.0, 3.0, 20.0]),
        "soft_segment_seconds": st.sampled_from([0.0, 1.0, 2.0]),
    }
)


@settings(max_examples=150, deadline=None)
@given(p=params, probs=runs_of_probs(), data=st.data())
def test_chunking_does_not_change_segments(
    p: dict[str, float], probs: list[float], data: st.DataObject
) -> None:
    whole = run(make(**p), probs)  # type: ignore[arg-type]
    sizes = data.draw(st.lists(st.integers(min_value=0, max_value=60), max_size=40))
    assert run(make(**p), probs, sizes) == whole  # type: ignore[arg-type]
    assert run(make(**p), probs, [1] * len(probs)) == whole  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    threshold=st.sampled_from([0.3, 0.5, 0.7]),
    min_silence_ms=st.sampled_from([100, 300, 500]),
    min_speech_ms=st.sampled_from([0, 100, 250]),
    extra_pad_ms=st.sampled_from([0, 50, 300]),
    probs=runs_of_probs(),
)
def test_segments_are_ordered_and_disjoint_when_pad_covers_min_silence(
    threshold: float, min_silence_ms: int, min_speech_ms: int, extra_pad_ms: int, probs: list[float]
) -> None:
    """With forced cuts (2 s) but a pad at least as long as the minimum silence."""
    seg = make(threshold, min_silence_ms, min_silence_ms + extra_pad_ms, min_speech_ms, 2.0)
    check_invariants(run(seg, probs), seg, 2.0)


@settings(max_examples=200, deadline=None)
@given(p=params, probs=runs_of_probs())
def test_segments_are_ordered_and_disjoint_without_cuts(
    p: dict[str, float], probs: list[float]
) -> None:
    p = {**p, "max_segment_seconds": 28.0}  # 875 chunks: longer than any generated sequence
    seg = make(**p)  # type: ignore[arg-type]
    check_invariants(run(seg, probs), seg, 28.0)


def test_segment_after_a_cut_in_a_pause_does_not_overlap() -> None:
    seg = make(max_segment_seconds=2.0)
    # speech 0..49, a fading pause 50..65 (quietest at 59, 10 chunks after the speech, in the
    # last third when the 2 s limit is reached at chunk 62), speech again from chunk 66
    fading = [0.30 - 0.01 * k for k in range(10)] + [0.25] * 6
    probs = [SPEECH] * 50 + fading + [SPEECH] * 20 + [QUIET] * 20
    segments = run(seg, probs)
    assert segments[0].forced
    for a, b in itertools.pairwise(segments):
        assert a.end <= b.start, (a, b)


@settings(max_examples=200, deadline=None)
@example(
    p={
        "threshold": 0.5,
        "min_silence_ms": 500,
        "speech_pad_ms": 200,
        "min_speech_ms": 200,
        "max_segment_seconds": 2.0,
    },
    probs=[SPEECH] * 50 + [0.30 - 0.01 * k for k in range(10)] + [0.25] * 6 + [SPEECH] * 20,
)
@given(p=params, probs=runs_of_probs())
def test_segments_are_ordered_and_disjoint(p: dict[str, float], probs: list[float]) -> None:
    seg = make(**p)  # type: ignore[arg-type]
    check_invariants(run(seg, probs), seg, p["max_segment_seconds"])
