"""The WER normalisation counts recognition errors, not spelling conventions."""

from __future__ import annotations

from streamsrv.wer import corpus_wer, normalise, wer


def test_normalise_case_punctuation_digits_and_acronyms() -> None:
    assert normalise("Press 1, then #-key. It's OK!") == [
        "press",
        "one",
        "then",
        "key",
        "it's",
        "ok",
    ]
    assert (
        normalise("the m i s d n port") == normalise("the MISDN port") == ["the", "misdn", "port"]
    )
    assert normalise("a b test") == ["a", "b", "test"]  # two letters are not an acronym
    assert normalise("press 10") == ["press", "10"]
    assert normalise("El líder, contraseña: ¿Qué?") == ["el", "lider", "contrasena", "que"]


def test_wer_counts_substitutions_insertions_deletions() -> None:
    assert wer("press one to continue", "press 1 to continue") == 0
    assert wer("red green blue gold", "red grey blue gold pink") == 0.5
    assert wer("hello world", "") == 1.0


def test_corpus_wer_weights_by_reference_words() -> None:
    pairs = [("one two three four", "one two three four"), ("five six", "")]
    assert corpus_wer(pairs) == 2 / 6


def test_a_word_written_as_two_matches_the_one_word() -> None:
    ref = "enter the number to be removed from the blacklist"
    assert wer(ref, "enter the number to be removed from the black list") == 0
    assert wer("check your voice mail now", "check your voicemail now") == 0
    # only a pair that spells the word: "black lust" is still two errors against "blacklist"
    assert wer("the blacklist", "the black lust") == 1.0
    assert wer("a blacklist b", "a black b") == 1 / 3
