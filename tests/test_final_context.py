"""Which earlier segments lead a final: the most recent ones, contiguous, whose audio is still
held and fits in the final's window together with the segment."""

from streamsrv.asr.segmenter import Segment
from streamsrv.transcript import final_context

S = 16000


def seg(start_s: float, end_s: float) -> Segment:
    return Segment(int(start_s * S), int(end_s * S), int((end_s - start_s) * S))


RECENT = [(seg(1, 4), "First sentence."), (seg(5, 8), "Second one."), (seg(9, 12), "Third.")]


def test_the_recent_finals_that_fit_lead_with_their_text_in_order() -> None:
    now = seg(13, 15)
    assert final_context(RECENT, now, 14 * S, 0) == (1 * S, "First sentence. Second one. Third.")
    assert final_context(RECENT, now, 11 * S, 0) == (5 * S, "Second one. Third.")
    assert final_context(RECENT, now, 6 * S, 0) == (9 * S, "Third.")
    assert final_context(RECENT[-1:], now, 14 * S, 0) == (9 * S, "Third.")


def test_no_context_when_the_latest_does_not_fit_or_is_no_longer_held() -> None:
    assert final_context(RECENT, seg(13, 25), 15 * S, 0) is None
    assert final_context(RECENT, seg(13, 15), 15 * S, 9 * S + 1) is None
    assert final_context(RECENT, seg(13, 15), 15 * S, 5 * S + 1) == (9 * S, "Third.")
    assert final_context([], seg(13, 15), 15 * S, 0) is None
