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


def test_short_windows_do_not_count_and_two_agreeing_long_ones_decide() -> None:
    d = decider()
    assert d.heard(("id", 0.99), 1 * SECOND, final=False) is None  # a second of speech
    assert d.heard(("es", 0.45), 4 * SECOND, final=False) is None  # long but unsure
    assert d.heard(("es", 0.8), 4 * SECOND, final=False) is None  # one vote
    decision = d.heard(("es", 0.75), 5 * SECOND, final=True)  # and the next agrees
    assert decision is not None and (decision.language, decision.previous) == ("es", None)
    assert d.language == "es"


def test_one_fairly_sure_window_of_the_wrong_language_does_not_decide() -> None:
    """What a loaded CI run saw: the first three seconds of a Spanish call heard as Italian
    at 0.67; the windows after it, with more speech, heard Spanish."""
    d = decider()
    assert d.heard(("it", 0.67), int(3.2 * SECOND), final=False) is None
    assert d.heard(("es", 0.8), int(4.2 * SECOND), final=False) is None  # votes differ
    decision = d.heard(("es", 0.85), int(5.2 * SECOND), final=False)
    assert decision is not None and decision.language == "es"


def test_one_sure_window_decides_alone() -> None:
    d = decider()
    decision = d.heard(("en", 0.95), 4 * SECOND, final=False)
    assert decision is not None and decision.language == "en"


def test_four_windows_without_agreement_decide_by_summed_probability() -> None:
    d = decider()
    assert d.heard(("en", 0.5), 4 * SECOND, final=False) is None
    assert d.heard(("es", 0.4), 4 * SECOND, final=False) is None
    assert d.heard(("en", 0.65), 4 * SECOND, final=False) is None
    decision = d.heard(("es", 0.62), 4 * SECOND, final=False)
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


def test_a_short_first_sentence_waits_for_the_language_its_call_is_in() -> None:
    """A 1.5 s sentence closes before anything could decide the language: its final is asked
    only once the speech after it (heard with it) has decided, in that language, and the
    segments keep the order they were spoken in."""
    t = LiveTranscript("c", Settings(), 16000, (1, 5))
    out: list[events.Event] = []
    finals = []

    def hear(prob: float, seconds: float) -> None:
        for _ in range(round(seconds * SECOND / CHUNK)):
            t.push(np.zeros(CHUNK, dtype=np.float32))
            for ask in t.on_vad([prob]):
                if ask.final:
                    finals.append(ask)
                    continue
                long_enough = len(ask.request.audio) >= 3 * SECOND
                heard = ("es", 0.9) if long_enough else ("it", 0.7)  # short windows mislead
                result = AsrResult("hola", heard[0], -0.2, 0.01, 1.0, detected=heard)
                out.extend(t.partial_done(ask, result))

    hear(0.9, 1.5)
    hear(0.05, 1.0)  # the first sentence has closed
    assert finals == [] and t.language is None and t.settled_seconds < 0.5
    hear(0.9, 2.0)  # the next one, heard together with the first, decides
    assert t.language == "es"
    assert [f.request.language for f in finals] == ["es"]
    hear(0.05, 1.0)
    assert [f.request.language for f in finals] == ["es", "es"]
    for ask in finals:
        result = AsrResult("hola", "es", -0.2, 0.01, 1.0, detected=("es", 0.95))
        out.extend(t.final_done(ask, result))
    numbered = [(e.TYPE, e.segment) for e in out if isinstance(e, events.Partial | events.Final)]
    assert [n for kind, n in numbered if kind == "final"] == [0, 1]
    assert numbered == sorted(numbered, key=lambda x: x[1])  # no number used out of order
    assert [e.language for e in out if isinstance(e, events.Final)] == ["es", "es"]


def test_a_held_sentence_is_not_held_past_the_end_of_its_call() -> None:
    t = LiveTranscript("c", Settings(), 16000, (1, 5))
    for prob, seconds in ((0.9, 1.0), (0.05, 1.0)):
        for _ in range(round(seconds * SECOND / CHUNK)):
            t.push(np.zeros(CHUNK, dtype=np.float32))
            assert [a for a in t.on_vad([prob]) if a.final] == []
    assert t.finals_pending == 1
    asks = t.on_vad([], ending=True)
    assert [a.final for a in asks] == [True] and asks[0].request.language is None
