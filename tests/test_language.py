"""Deciding a call's language once from its speech, and changing it only on strong evidence;
and the transcript asking the model in that language once it is decided."""

from __future__ import annotations

import numpy as np

from streamsrv import events
from streamsrv.asr.vad import CHUNK
from streamsrv.asr.whisper import AsrResult
from streamsrv.config import Settings
from streamsrv.language import LanguageDecider
from streamsrv.transcript import LiveTranscript

SECOND = 16000


def decider() -> LanguageDecider:
    return LanguageDecider(min_samples=3 * SECOND, min_probability=0.6)


def test_short_windows_do_not_count_and_the_first_sure_long_one_decides() -> None:
    d = decider()
    assert d.heard(("id", 0.99), 1 * SECOND, final=False) is None  # a second of speech
    assert d.heard(("es", 0.45), 4 * SECOND, final=False) is None  # long but unsure
    decision = d.heard(("es", 0.8), 4 * SECOND, final=True)
    assert decision is not None and (decision.language, decision.previous) == ("es", None)
    assert d.language == "es"


def test_three_unsure_windows_decide_by_summed_probability() -> None:
    d = decider()
    assert d.heard(("en", 0.5), 4 * SECOND, final=False) is None
    assert d.heard(("es", 0.4), 4 * SECOND, final=False) is None
    decision = d.heard(("en", 0.45), 4 * SECOND, final=False)
    assert decision is not None and decision.language == "en"


def test_the_language_changes_only_on_two_sure_finals_in_a_row() -> None:
    d = decider()
    d.heard(("en", 0.9), 4 * SECOND, final=True)
    assert d.heard(("sw", 0.95), 4 * SECOND, final=False) is None  # partials are no evidence
    assert d.heard(("sw", 0.95), 4 * SECOND, final=True) is None  # one is not enough
    assert d.heard(("en", 0.9), 4 * SECOND, final=True) is None  # and it was interrupted
    assert d.heard(("sw", 0.8), 4 * SECOND, final=True) is None  # not sure enough
    d.heard(("sw", 0.95), 4 * SECOND, final=True)
    decision = d.heard(("sw", 0.97), 4 * SECOND, final=True)
    assert decision is not None and (decision.language, decision.previous) == ("sw", "en")


def test_a_transcript_asks_in_the_decided_language_and_says_so_once() -> None:
    t = LiveTranscript("c", Settings(), 16000, (1, 5))
    assert t.language is None
    said: list[events.Event] = []
    for _ in range(round(4.0 * SECOND / CHUNK)):  # four seconds of speech
        t.push(np.zeros(CHUNK, dtype=np.float32))
        for ask in t.on_vad([0.9]):
            assert ask.request.language == t.language  # None while undecided: detected
            result = AsrResult("hola", "es", -0.2, 0.01, 1.0, detected=("es", 0.9))
            said += t.partial_done(ask, result)
    decided = [e for e in said if isinstance(e, events.LanguageDetected)]
    assert [(e.language, e.probability) for e in decided] == [("es", 0.9)]
    assert t.language == "es"
    for _ in range(round(1.0 * SECOND / CHUNK)):
        t.push(np.zeros(CHUNK, dtype=np.float32))
        asks = t.on_vad([0.05])
        for ask in asks:
            assert ask.request.language == "es"
            assert ask.request.detect is ask.final  # finals keep bringing evidence


def test_a_language_from_the_context_is_never_second_guessed() -> None:
    t = LiveTranscript("c", Settings(), 16000, (1, 5), language="sw")
    assert t.decider is None
    t2 = LiveTranscript("c", Settings(), 16000, (1, 5))
    t2.fix_language("sw")
    assert (t2.language, t2.decider) == ("sw", None)
