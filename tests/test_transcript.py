"""LiveTranscript without sockets, Redis or a model: speech probabilities and made-up model
results in, requests and partial/final events out, as the call's coordinator would see them."""

from __future__ import annotations

import numpy as np

from streamsrv import events
from streamsrv.asr.vad import CHUNK
from streamsrv.asr.whisper import AsrResult
from streamsrv.config import Settings
from streamsrv.transcript import Ask, LiveTranscript

RATE = 16000
SPEECH, SILENCE = 0.9, 0.05


def transcript(**settings: object) -> LiveTranscript:
    """A call whose language is known (a final waits for an undecided one: test_language)."""
    return LiveTranscript("c", Settings(**settings), RATE, (1, 5), language="en")  # type: ignore[arg-type]


def hear(t: LiveTranscript, prob: float, seconds: float) -> list[Ask]:
    """`seconds` of audio heard as speech or silence, chunk by chunk, as VAD passes would."""
    asks = []
    for _ in range(round(seconds * RATE / CHUNK)):
        t.push(np.zeros(CHUNK, dtype=np.float32))
        asks += t.on_vad([prob])
    return asks


def said(text: str) -> AsrResult:
    return AsrResult(text, "en", -0.2, 0.01, 1.2)


def test_a_segment_gets_partials_then_one_final_with_one_number() -> None:
    t = transcript()
    asks = hear(t, SPEECH, 2.0)
    partials = [a for a in asks if not a.final]
    assert partials and not any(a.final for a in asks)
    assert [e.text for e in t.partial_done(partials[0], said("press one"))] == ["press one"]
    # the next partial is asked only once the first one is back
    assert len(partials) == 1
    more = [a for a in hear(t, SPEECH, 1.0) if not a.final]
    (shown,) = t.partial_done(more[0], said("press one to record"))
    assert (shown.segment, shown.text) == (0, "press one to record")
    (final,) = [a for a in hear(t, SILENCE, 1.0) if a.final]
    assert final.request.beam_size == 5  # nothing leads a call's first final
    (out,) = t.final_done(final, said("Press one to record."))
    assert isinstance(out, events.Final)
    assert (out.segment, out.text, out.language) == (0, "Press one to record.", "en")
    assert t.finals_text == ["Press one to record."] and t.segments_published == 1


def test_finals_come_out_in_segment_order_whatever_order_results_arrive_in() -> None:
    t = transcript()
    finals = []
    for _ in range(3):
        finals += [a for a in hear(t, SPEECH, 1.0) + hear(t, SILENCE, 1.0) if a.final]
    assert len(finals) == 3
    assert t.final_done(finals[2], said("third")) == []
    assert t.final_done(finals[1], said("second")) == []
    out = t.final_done(finals[0], said("first"))
    assert [(e.segment, e.text) for e in out] == [(0, "first"), (1, "second"), (2, "third")]
    assert t.final_done(finals[0], said("again")) == []  # handed in twice: nothing new


def test_noise_uses_no_number_and_a_failed_final_keeps_its_partial_number() -> None:
    t = transcript()
    asks = hear(t, SPEECH, 0.5) + hear(t, SILENCE, 1.0)
    for partial in (a for a in asks if not a.final):
        assert t.partial_done(partial, said("")) == []  # nothing heard: nothing shown
    (noise,) = [a for a in asks if a.final]
    assert t.final_done(noise, said("")) == []  # silence or noise: no final, no number
    partial = next(a for a in hear(t, SPEECH, 1.5) if not a.final)
    (shown,) = t.partial_done(partial, said("hello"))
    assert shown.segment == 0
    (final,) = [a for a in hear(t, SILENCE, 1.0) if a.final]
    (out,) = t.final_done(final, None)  # the model failed: the segment still ends
    assert (out.segment, out.text, out.words) == (0, "", None)


def test_a_final_is_led_by_the_previous_segment_once_its_final_is_in() -> None:
    t = transcript()
    (first,) = [a for a in hear(t, SPEECH, 1.0) + hear(t, SILENCE, 1.0) if a.final]
    t.final_done(first, said("Please hold."))
    (second,) = [a for a in hear(t, SPEECH, 1.0) + hear(t, SILENCE, 1.0) if a.final]
    assert second.request.prefix == "Please hold."
    assert second.request.context > 0 and second.request.beam_size == 1
    assert second.start < second.segment.start  # type: ignore[union-attr]


def test_a_partial_for_a_closed_segment_shows_until_its_final_and_never_after() -> None:
    t = transcript()
    partial = next(a for a in hear(t, SPEECH, 1.5) if not a.final)
    (final,) = [a for a in hear(t, SILENCE, 1.0) if a.final]
    (shown,) = t.partial_done(partial, said("one moment"))  # closed while it ran
    assert shown.segment == 0
    t.final_done(final, said("One moment please."))
    late = Ask(partial.request, partial.start, partial.end)
    assert t.partial_done(late, said("one moment")) == []


def test_the_end_of_a_call_closes_the_open_segment_without_a_partial() -> None:
    t = transcript()
    hear(t, SPEECH, 1.0)
    asks = t.on_vad([SPEECH] * 4, ending=True)
    assert [a.final for a in asks] == [True]


def test_a_shed_partial_is_asked_again_when_due() -> None:
    t = transcript()
    first = next(a for a in hear(t, SPEECH, 1.5) if not a.final)
    t.partial_shed(first)
    assert any(not a.final for a in hear(t, SPEECH, 1.0))
