"""Phrase alerts: phrases and regular expressions per language (ALERT_PHRASES), matched against
a call's finals (and partials, with ALERT_ON_PARTIALS) while it runs, so that a supervisor sees
"kill myself" as it is said. No I/O but reading the file once, when the settings are read.

The file, one rule a line, written by hand (configs/alert-phrases.example):

    # a comment: a line whose first non-blank character is #
    en: kill myself
    sw [self-harm]: nataka kujiua
    * [abuse]: re: \\bhe (hits|beats|hurts) me\\b
    en [self-harm]: /\\b(cut|cutting|hurt|hurting) myself\\b/

- Before the colon: a Whisper language code (en, sw, ...) or * for every language, then
  optionally a label in brackets, published with the alert.
- After it: a phrase; or a regular expression after `re:` or between slashes.
- A phrase matches whole words in order, case-insensitively, whatever punctuation or spaces
  lie between them: "kill myself" matches "I'll kill, myself!" and not "skill myselfie".
  Apostrophes are ignored inside words ("dont" and "don't" are the same word).
- A regular expression (Python `re`, IGNORECASE) is searched in the text as phrases see it:
  casefolded, apostrophes removed, every other run of non-word characters one space. Write \\b
  for word boundaries. One that matches the empty text is refused.
- Problems (unreadable file, a line that is not a rule, a bad expression, a rule twice) are
  configuration errors that name the file and line; `streamsrv check-config` lists them all.

Cost: a text is normalised once, by the regular expression engine rather than word by word;
all phrases of a language are found in one pass over its words (a dict from first word to the
phrases that begin with it), so their number costs nothing per word; regular expressions are
searched one by one, with the `regex` engine rather than `re`: matching runs on the event loop,
and a pattern with nested or overlapping quantifiers can take exponential time (with `re`,
(\\w+\\s?)+$ took 0.7 s on a text of 22 characters). `regex` avoids much of that
backtracking and has a timeout: a search that takes more than PATTERN_SECONDS is given up and
logged (`alert_pattern_timeout`, with the rule's line), the call and the other rules go on.
Texts are cut at MAX_TEXT_CHARS characters (a final is at most MAX_SEGMENT_SECONDS of speech,
far shorter).

A call's AlertWatch remembers which rules alerted for which segment: a rule alerts once per
segment, on the first partial or the final that contains it.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import regex
import structlog

from streamsrv import events

log = structlog.get_logger(__name__)

MAX_TEXT_CHARS = 4000
PATTERN_SECONDS = 0.025  # the most one regular expression may search one text
MAX_LABEL_CHARS = 64
_APOSTROPHE_CHARS = "'\u2019\u02bc"  # ', right single quotation mark, modifier letter
_WORD = re.compile(rf"[\w{_APOSTROPHE_CHARS}]+")
_PLAIN_WORD = re.compile(r"\w+")
_APOSTROPHES = str.maketrans("", "", _APOSTROPHE_CHARS)
_RULE = re.compile(r"(?P<language>\*|[A-Za-z]{2,3})\s*(?:\[(?P<label>[^\]]*)\])?\s*:(?P<body>.*)")


class RulesError(ValueError):
    """Every problem of an alert phrases file, one per line, each with its file and line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Rule:
    line: int  # in the file: the rule's identity
    language: str  # a Whisper code, or * for any
    label: str | None
    phrase: str  # the phrase, or the regular expression, as written
    words: tuple[str, ...] = ()  # a phrase's normalised words; empty for an expression
    pattern: regex.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class Match:
    rule: Rule
    start: int  # characters of the matched words in the text, as given
    end: int


_CASEFOLD_MARKS = re.compile(r"[^\w ]+")


class Words:
    """A text as the rules see it: its words normalised, found by the regular expression engine
    in a few passes over the whole text; where each word is in the text is worked out only for
    a text that matched (a word is a run of word characters and apostrophes that is not only
    apostrophes, so both ways find the same words)."""

    def __init__(self, text: str) -> None:
        self.text = text[:MAX_TEXT_CHARS]
        self.normalised = " ".join(_PLAIN_WORD.findall(self.text.translate(_APOSTROPHES)))
        # Casefolding can make a mark that is no word character ("İ" -> "i" + U+0307), which a
        # \b would take for the end of a word: such marks are dropped, the words stay whole.
        self.normalised = _CASEFOLD_MARKS.sub("", self.normalised.casefold())
        self.tokens = tuple(self.normalised.split(" ")) if self.normalised else ()

    @functools.cached_property
    def spans(self) -> list[tuple[int, int]]:
        """Each word's characters in the text."""
        return [m.span() for m in _WORD.finditer(self.text) if m.group().strip(_APOSTROPHE_CHARS)]

    @functools.cached_property
    def starts(self) -> list[int]:
        """Each word's offset in `normalised`."""
        return [0, *itertools.accumulate(len(token) + 1 for token in self.tokens[:-1])]

    @classmethod
    def of(cls, text: str) -> Words:
        return cls(text)


def normalise(text: str) -> str:
    """The text as the rules see it (see the module's docstring)."""
    return Words.of(text).normalised


@dataclass(frozen=True)
class AlertRules:
    source: str  # the file, for messages
    rules: tuple[Rule, ...] = field(repr=False)
    # by language: first word -> the phrases that begin with it; the expressions
    _phrases: dict[str, dict[str, list[Rule]]] = field(init=False, repr=False, compare=False)
    _patterns: dict[str, list[Rule]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        phrases: dict[str, dict[str, list[Rule]]] = {}
        patterns: dict[str, list[Rule]] = {}
        for rule in self.rules:
            if rule.pattern is not None:
                patterns.setdefault(rule.language, []).append(rule)
            else:
                by_word = phrases.setdefault(rule.language, {})
                by_word.setdefault(rule.words[0], []).append(rule)
        object.__setattr__(self, "_phrases", phrases)
        object.__setattr__(self, "_patterns", patterns)

    def match(self, language: str | None, text: str) -> list[Match]:
        """The rules of `language` (None: not known yet) and of * found in `text`, each once
        (where it first matches), in the order they occur."""
        languages = ("*",) if language is None else (language, "*")
        words = Words.of(text)
        found: list[Match] = []
        for lang in languages:
            found += _phrase_matches(self._phrases.get(lang, {}), words)
            found += _pattern_matches(self._patterns.get(lang, []), words)
        return sorted(found, key=lambda m: (m.start, m.rule.line))


def _phrase_matches(index: dict[str, list[Rule]], words: Words) -> list[Match]:
    if not index:
        return []
    tokens = words.tokens
    seen: set[int] = set()
    found = []
    for i, token in enumerate(tokens):
        for rule in index.get(token, ()):
            n = len(rule.words)
            if rule.line not in seen and tokens[i : i + n] == rule.words:
                seen.add(rule.line)
                found.append(Match(rule, words.spans[i][0], words.spans[i + n - 1][1]))
    return found


def _pattern_matches(rules: list[Rule], words: Words) -> list[Match]:
    found = []
    for rule in rules:
        assert rule.pattern is not None
        try:
            m = rule.pattern.search(words.normalised, timeout=PATTERN_SECONDS)
        except TimeoutError:
            log.warning("alert_pattern_timeout", line=rule.line, pattern=rule.phrase)
            continue
        if m is None or m.start() == m.end():
            continue
        first = bisect.bisect_right(words.starts, m.start()) - 1
        last = bisect.bisect_right(words.starts, m.end() - 1) - 1
        found.append(Match(rule, words.spans[max(first, 0)][0], words.spans[max(last, 0)][1]))
    return found


# -- the file ------------------------------------------------------------------------------------


def load(path: Path) -> AlertRules:
    """The rules of a file; RulesError with every problem in it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError([f"{path}: cannot be read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise RulesError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    return parse(text, str(path))


def parse(text: str, source: str = "<rules>") -> AlertRules:
    """The rules of a file's text; RulesError with every problem, each naming its line."""
    rules: list[Rule] = []
    problems: list[str] = []
    first_seen: dict[tuple[str, str, tuple[str, ...]], int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            rule = _rule(number, line)
        except ValueError as exc:
            problems.append(f"{source}:{number}: {exc}")
            continue
        key = (rule.language, rule.phrase if rule.pattern else "", rule.words)
        if key in first_seen:
            problems.append(f"{source}:{number}: the same rule as line {first_seen[key]}")
            continue
        first_seen[key] = number
        rules.append(rule)
    if not rules and not problems:
        problems.append(f"{source}: no rules (lines like `en: kill myself`)")
    if problems:
        raise RulesError(problems)
    return AlertRules(source, tuple(rules))


def _rule(number: int, line: str) -> Rule:
    m = _RULE.fullmatch(line)
    if m is None:
        raise ValueError(f"expected `LANGUAGE: phrase` or `LANGUAGE [label]: phrase`: {line!r}")
    label = m["label"].strip() if m["label"] is not None else None
    if label is not None and not 1 <= len(label) <= MAX_LABEL_CHARS:
        raise ValueError(f"a label has 1 to {MAX_LABEL_CHARS} characters")
    language, body = m["language"].lower(), m["body"].strip()
    rule = Rule(number, language, label, body)
    expression = _expression(body)
    if expression is not None:
        return dataclasses.replace(rule, phrase=expression, pattern=_compile(expression))
    words = Words.of(body).tokens
    if not words:
        raise ValueError(f"no words in the phrase: {body!r}")
    return dataclasses.replace(rule, words=words)


def _expression(body: str) -> str | None:
    """The regular expression a rule's text holds (`re: ...` or `/.../`), else None."""
    if body.startswith("re:"):
        return body[3:].strip()
    if len(body) >= 2 and body[0] == body[-1] == "/":
        return body[1:-1]
    return None


def _compile(expression: str) -> regex.Pattern[str]:
    if not expression:
        raise ValueError("an empty regular expression")
    try:
        pattern = regex.compile(expression, regex.IGNORECASE | regex.VERSION0)
    except regex.error as exc:
        raise ValueError(f"bad regular expression {expression!r}: {exc}") from None
    if pattern.search("") is not None:
        raise ValueError(f"the regular expression {expression!r} matches the empty text")
    return pattern


# -- one call --------------------------------------------------------------------------------------


class AlertWatch:
    """One call's alerts: each rule once per segment, on the first partial (with
    `on_partials`) or the final that contains it."""

    def __init__(self, rules: AlertRules, on_partials: bool) -> None:
        self.rules = rules
        self.on_partials = on_partials
        self._alerted: dict[int, set[int]] = {}  # segment -> lines that alerted on partials

    def check(self, event: events.Event, language: str | None) -> list[events.Alert]:
        """The alerts a published partial or final brings, by the rules of the call's
        `language` (a final's own when the call's is not known yet) and of *."""
        if isinstance(event, events.Final):
            source, alerted = "final", self._alerted.pop(event.segment, set())
            words, language = event.words, language or event.language
        elif isinstance(event, events.Partial) and self.on_partials:
            source, alerted = "partial", self._alerted.setdefault(event.segment, set())
            words = None
        else:
            return []
        out = []
        for match in self.rules.match(language, event.text):
            if match.rule.line in alerted:
                continue
            alerted.add(match.rule.line)
            start, end = _times(event.text, words, match) or (event.start, event.end)
            out.append(
                events.Alert(
                    call_id=event.call_id,
                    phrase=match.rule.phrase,
                    label=match.rule.label,
                    language=language,
                    segment=event.segment,
                    text=event.text,
                    source=source,
                    start=start,
                    end=end,
                )
            )
        return out


def _times(
    text: str, words: Sequence[events.WordTime] | None, match: Match
) -> tuple[float, float] | None:
    """When the matched characters were said: the first and last word timed over them, or
    None when the words are unknown or cannot be placed in the text."""
    if not words:
        return None
    position = 0
    inside: list[events.WordTime] = []
    for word in words:
        spoken = word.word.strip()
        if not spoken:
            continue
        at = text.find(spoken, position)
        if at < 0:
            return None
        position = at + len(spoken)
        if at < match.end and position > match.start:
            inside.append(word)
    if not inside:
        return None
    return inside[0].start, inside[-1].end
