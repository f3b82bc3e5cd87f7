"""Phrase alerts without I/O: the rules file, the matcher, and one call's alerts per segment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamsrv import alerts, events
from streamsrv.alerts import AlertRules, AlertWatch, RulesError
from streamsrv.cli import main
from streamsrv.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "configs" / "alert-phrases.example"
CALL = "6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"


def found(rules: AlertRules, language: str | None, text: str) -> list[str]:
    return [m.rule.phrase for m in rules.match(language, text)]


# -- the file ------------------------------------------------------------------------------------


def test_the_file_format() -> None:
    rules = alerts.parse(
        "# comment\n"
        "\n"
        "   # indented comment\n"
        "en: kill myself\n"
        "SW [self-harm]: nataka kujiua\n"
        "* [abuse] :  re: \\bhe (hits|beats) me\\b\n"
        "en[ danger ]:/\\bpolice\\b/\n"
    )
    assert [(r.line, r.language, r.label, r.phrase) for r in rules.rules] == [
        (4, "en", None, "kill myself"),
        (5, "sw", "self-harm", "nataka kujiua"),
        (6, "*", "abuse", "\\bhe (hits|beats) me\\b"),
        (7, "en", "danger", "\\bpolice\\b"),
    ]
    assert rules.rules[0].words == ("kill", "myself") and rules.rules[0].pattern is None
    assert rules.rules[2].pattern is not None and rules.rules[2].words == ()


def test_the_shipped_example_parses_and_alerts_in_both_languages() -> None:
    rules = alerts.load(EXAMPLE)
    assert {r.language for r in rules.rules} >= {"en", "sw", "*"}
    assert "kill myself" in found(rules, "en", "I just want to kill myself.")
    assert "nataka kujiua" in found(rules, "sw", "Nataka kujiua, sasa hivi.")
    assert found(rules, "en", "Nataka kujiua") == []  # Swahili rules are for Swahili calls


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("kill myself", "expected `LANGUAGE: phrase`"),
        ("english: kill myself", "expected `LANGUAGE: phrase`"),
        ("en [self-harm: kill myself", "expected `LANGUAGE: phrase`"),
        ("en []: kill myself", "a label has 1 to 64 characters"),
        (f"en [{'x' * 65}]: kill myself", "a label has 1 to 64 characters"),
        ("en:", "no words in the phrase"),
        ("en: ?!", "no words in the phrase"),
        ("en: re:", "an empty regular expression"),
        ("en: re: (kill", "bad regular expression '(kill': missing ) at position 5"),
        ("en: /[a-/", "bad regular expression"),
        ("en: re: (kill)?", "matches the empty text"),
        ("en: //", "an empty regular expression"),
    ],
)
def test_a_bad_line_is_reported_with_its_number(line: str, problem: str) -> None:
    with pytest.raises(RulesError) as caught:
        alerts.parse(f"# rules\nen: fine\n{line}\n", "rules.txt")
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("rules.txt:3: ")
    assert problem in caught.value.problems[0]


def test_every_problem_is_reported_at_once() -> None:
    text = "en: kill myself\nnonsense\nen: re: (\nen:  KILL   myself!\n* : kill myself\n"
    with pytest.raises(RulesError) as caught:
        alerts.parse(text, "f")
    assert [p.split(": ", 1)[0] for p in caught.value.problems] == ["f:2", "f:3", "f:4"]
    assert caught.value.problems[2] == "f:4: the same rule as line 1"


def test_a_file_without_rules_unreadable_or_not_utf8_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="no rules"):
        alerts.parse("# only a comment\n", "f")
    with pytest.raises(RulesError, match="cannot be read: No such file"):
        alerts.load(tmp_path / "missing")
    (tmp_path / "latin1").write_bytes(b"en: \xe9t\xe9\n")
    with pytest.raises(RulesError, match="not UTF-8"):
        alerts.load(tmp_path / "latin1")


# -- matching --------------------------------------------------------------------------------------


RULES = alerts.parse(
    "en [self-harm]: kill myself\n"
    "en: myself\n"
    "en: don't tell\n"
    "sw: nataka kujiua\n"
    "* [danger]: re: \\bpoli(ce|si)\\b\n"
    "en: /\\bhe (hits|beats) me\\b/\n"
)


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        ("I want to kill myself", ["kill myself", "myself"]),  # overlapping rules both match
        ("KILL, ... myself!!", ["kill myself", "myself"]),  # case and punctuation
        ("kill\n\t  myself", ["kill myself", "myself"]),  # spaces
        ("skill myselfie", []),  # whole words only
        ("kill my self", []),
        ("Please dont tell mum", ["don't tell"]),  # apostrophes are ignored
        ("Please don\u2019t tell", ["don't tell"]),  # typographic apostrophe
        ("He hits me.", ["\\bhe (hits|beats) me\\b"]),
        ("he, beats  me", ["\\bhe (hits|beats) me\\b"]),  # an expression sees normalised text
        ("she hits metal", []),
        ("call the POLICE", ["\\bpoli(ce|si)\\b"]),  # * rules in every language
        ("", []),
    ],
)
def test_english_call(text: str, phrases: list[str]) -> None:
    assert sorted(found(RULES, "en", text)) == sorted(phrases)


def test_the_calls_language_chooses_the_rules() -> None:
    assert found(RULES, "sw", "Nataka kujiua. Polisi!") == ["nataka kujiua", "\\bpoli(ce|si)\\b"]
    assert found(RULES, "sw", "kill myself") == []
    assert found(RULES, None, "kill myself, police") == ["\\bpoli(ce|si)\\b"]  # not known: *
    assert found(RULES, "fr", "police") == ["\\bpoli(ce|si)\\b"]


def test_each_rule_once_in_order_with_the_span_of_its_first_match() -> None:
    text = "Police! I'll kill, myself. Kill myself."
    matches = RULES.match("en", text)
    assert [(m.rule.phrase, text[m.start : m.end]) for m in matches] == [
        ("\\bpoli(ce|si)\\b", "Police"),
        ("kill myself", "kill, myself"),
        ("myself", "myself"),
    ]


def test_a_long_text_is_cut_so_matching_stays_bounded() -> None:
    rules = alerts.parse("en: kill myself\n")
    text = "word " * 2000 + "kill myself"
    assert found(rules, "en", text) == []  # past MAX_TEXT_CHARS
    assert len(alerts.normalise(text)) < alerts.MAX_TEXT_CHARS
    assert found(rules, "en", "word " * 10 + "kill myself") == ["kill myself"]


def test_a_pattern_that_backtracks_without_end_is_given_up_and_the_others_still_alert(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """(a|aa)+$ on forty a's and a c backtracks exponentially: with `re` this search would not
    end in any useful time, on the event loop every call shares."""
    rules = alerts.parse("en: re: (a|aa)+$\nen: kill myself\n")
    text = "kill myself " + "a" * 40 + " c"
    assert found(rules, "en", text) == ["kill myself"]
    assert "alert_pattern_timeout" in capsys.readouterr().out
    # the same rule still alerts where it can match
    assert found(rules, "en", "aaaa") == ["(a|aa)+$"]


WORDS = st.lists(st.sampled_from(["kill", "myself", "i", "will", "he", "hits", "me", "x"]))
SEPARATORS = st.sampled_from([" ", "  ", ", ", "! ", " - ", "\n", "... "])


@given(WORDS, st.data())
def test_a_phrase_matches_exactly_when_its_words_are_adjacent(
    words: list[str], data: st.DataObject
) -> None:
    """Whatever separates the words, a phrase is found iff its words come in a row, and a
    regular expression over normalised text agrees with it."""
    rules = alerts.parse("en: kill myself\nen: re: \\bhe hits me\\b\n")
    text = "".join(
        w.upper() if data.draw(st.booleans()) else w + data.draw(SEPARATORS) for w in words
    )
    # the words as the rules see them: an upper-cased word is glued to the next one
    seen = alerts.normalise(text).split()
    pairs = {tuple(seen[i : i + 2]) for i in range(len(seen))}
    triples = {tuple(seen[i : i + 3]) for i in range(len(seen))}
    expected = ["kill myself"] * (("kill", "myself") in pairs)
    expected += ["\\bhe hits me\\b"] * (("he", "hits", "me") in triples)
    assert sorted(found(rules, "en", text)) == sorted(expected)


@given(st.text(max_size=300))
def test_matching_never_fails_and_spans_lie_in_the_text(text: str) -> None:
    for m in alerts.load(EXAMPLE).match("en", text) + RULES.match("sw", text):
        assert 0 <= m.start < m.end <= len(text)


PIECES = ["kill", "myself", "KILL", "my", "self", "'", "\u2019", " ", ", ", "\u0130", "\u00df", "x"]


@given(st.lists(st.sampled_from(PIECES), max_size=40))
def test_a_matchs_span_holds_exactly_the_phrases_words(pieces: list[str]) -> None:
    """Apostrophes, letters that casefold to two, words only of apostrophes: the span found
    for a phrase is the phrase, once normalised."""
    rules = alerts.parse("en: kill myself\nen: re: \\bkill\\b\n")
    text = "".join(pieces)
    for m in rules.match("en", text):
        expected = " ".join(m.rule.words) if m.rule.words else "kill"
        assert alerts.normalise(text[m.start : m.end]) == expected, (text, m)


# -- one call's alerts -----------------------------------------------------------------------------


def partial(segment: int, text: str) -> events.Partial:
    return events.Partial(
        call_id=CALL, segment=segment, text=text, start=1.0, end=3.0, audio_end=3.2
    )


def final(segment: int, text: str, words: list[events.WordTime] | None = None) -> events.Final:
    return events.Final(
        call_id=CALL, segment=segment, text=text, start=1.0, end=4.0, language="en", words=words
    )


def phrases_of(out: list[events.Alert]) -> list[tuple[str, str]]:
    return [(a.phrase, a.source) for a in out]


def test_a_rule_alerts_once_per_segment_first_on_a_partial() -> None:
    watch = AlertWatch(RULES, on_partials=True)
    assert watch.check(partial(0, "I want to"), "en") == []
    assert phrases_of(watch.check(partial(0, "I want to kill myself"), "en")) == [
        ("kill myself", "partial"),
        ("myself", "partial"),
    ]
    assert watch.check(partial(0, "I want to kill myself and"), "en") == []
    out = watch.check(final(0, "I want to kill myself and call the police."), "en")
    assert phrases_of(out) == [("\\bpoli(ce|si)\\b", "final")]  # only what is new
    # the next segment starts afresh
    assert phrases_of(watch.check(final(1, "Kill myself."), "en")) == [
        ("kill myself", "final"),
        ("myself", "final"),
    ]
    assert phrases_of(watch.check(partial(2, "kill myself"), "en")) == [
        ("kill myself", "partial"),
        ("myself", "partial"),
    ]


def test_partials_are_ignored_unless_asked_for() -> None:
    watch = AlertWatch(RULES, on_partials=False)
    assert watch.check(partial(0, "kill myself"), "en") == []
    assert phrases_of(watch.check(final(0, "kill myself"), "en")) == [
        ("kill myself", "final"),
        ("myself", "final"),
    ]
    assert watch.check(events.Dtmf(call_id=CALL, digit="1", at=0.0), "en") == []


def test_an_alert_carries_the_rule_the_text_and_the_matched_words_times() -> None:
    words = [
        events.WordTime(" I'll", 1.0, 1.3, 0.9),
        events.WordTime(" kill,", 1.3, 1.7, 0.9),
        events.WordTime(" myself.", 1.7, 2.4, 0.9),
        events.WordTime(" Police!", 2.6, 3.1, 0.9),
    ]
    out = AlertWatch(RULES, False).check(final(3, "I'll kill, myself. Police!", words), "en")
    first = out[0]
    assert events.encode(first, seq=9, emitted_at=5.0) == {
        "type": "alert",
        "call_id": CALL,
        "seq": 9,
        "emitted_at": 5.0,
        "phrase": "kill myself",
        "label": "self-harm",
        "language": "en",
        "segment": 3,
        "text": "I'll kill, myself. Police!",
        "source": "final",
        "start": 1.3,
        "end": 2.4,
    }
    assert [(a.phrase, a.label, a.start, a.end) for a in out[1:]] == [
        ("myself", None, 1.7, 2.4),
        ("\\bpoli(ce|si)\\b", "danger", 2.6, 3.1),
    ]


def test_without_word_times_an_alert_has_the_segments() -> None:
    words = [events.WordTime(" something", 1.0, 2.0, 0.9)]  # not the text: cannot be placed
    for event in (final(0, "kill myself"), final(1, "kill myself", words)):
        alert = AlertWatch(RULES, False).check(event, "en")[0]
        assert (alert.start, alert.end) == (1.0, 4.0)
    alert = AlertWatch(RULES, True).check(partial(2, "kill myself"), "en")[0]
    assert (alert.start, alert.end) == (1.0, 3.0)


def test_a_final_before_the_language_is_known_uses_its_own() -> None:
    sw = events.Final(call_id=CALL, segment=0, text="nataka kujiua", start=0, end=1, language="sw")
    assert [(a.phrase, a.language) for a in AlertWatch(RULES, False).check(sw, None)] == [
        ("nataka kujiua", "sw")
    ]
    # a partial has no language of its own: only * rules until the call's is known
    assert AlertWatch(RULES, True).check(partial(0, "nataka kujiua"), None) == []


# -- settings and check-config ---------------------------------------------------------------------


def test_settings_read_the_file_once_and_report_its_problems(tmp_path: Path) -> None:
    assert Settings().alert_rules is None
    assert Settings.from_mapping({"ALERT_PHRASES": " "}).alert_rules is None
    settings = Settings.from_mapping({"ALERT_PHRASES": str(EXAMPLE), "ALERT_ON_PARTIALS": "yes"})
    assert settings.alert_rules == alerts.load(EXAMPLE)
    assert settings.alert_on_partials
    bad = tmp_path / "bad.phrases"
    bad.write_text("en: fine\nen: re: (\nnot a rule\n")
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({"ALERT_PHRASES": str(bad), "BATCH_SIZE": "0"})
    assert caught.value.problems[:2] == [
        f"ALERT_PHRASES: {bad}:2: bad regular expression '(': missing ) at position 1",
        f"ALERT_PHRASES: {bad}:3: expected `LANGUAGE: phrase` or `LANGUAGE [label]: phrase`: "
        "'not a rule'",
    ]
    assert any(p.startswith("BATCH_SIZE") for p in caught.value.problems)


def test_check_config_names_each_bad_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.phrases"
    bad.write_text("# rules\nen: re: [z-a]\nen: ok\n* : //\n")
    env = tmp_path / "streamsrv.env"
    env.write_text(f"ALERT_PHRASES={bad}\n")
    assert main(["check-config", str(env)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r"^.*?bad\.phrases:(\d+):.*$", r"\1", line) for line in lines] == ["2", "4"]
    assert all(line.startswith(f"{env}: ALERT_PHRASES: {bad}:") for line in lines)
    env.write_text(f"ALERT_PHRASES={EXAMPLE}\nALERT_ON_PARTIALS=true\n")
    assert main(["check-config", str(env)]) == 0
