"""A call's language with LANGUAGE=auto and none in its context: decided once, from its first
seconds of speech, and kept.

Whisper detects a language from each window it hears. On a short window that guess is poor
(a second of English was seen labelled Indonesian), and redone per sentence it can flip from
one sentence to the next; and a window of just over three seconds can be sure of the wrong
language (Spanish telephone speech heard as Italian at 0.67). So only windows with at least
LANGUAGE_DETECT_SECONDS of audio count; two of them in a row that name the same language with
LANGUAGE_DETECT_PROBABILITY or more decide, as does one at SURE_PROBABILITY or more; if four such
windows come without a decision, the language with the highest summed probability over them
wins. After that every request goes in that language. Finals keep asking for a detection, as
evidence: two finals in a row that hear another language with SWITCH_PROBABILITY or more
change it (a call handed from one language to another). No I/O; decisions are logged.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import structlog

from streamsrv import events

log = structlog.get_logger(__name__)

SURE_PROBABILITY = 0.9
SWITCH_PROBABILITY = 0.9
UNSURE_WINDOWS = 4


@dataclass(frozen=True, slots=True)
class Decision:
    language: str
    probability: float
    previous: str | None

    def event(self, call_id: str, at: float) -> events.LanguageDetected:
        """The message that says so, `at` seconds into the call; logged too."""
        log.info(
            "language_detected",
            call_id=call_id,
            language=self.language,
            probability=self.probability,
            previous=self.previous,
        )
        return events.LanguageDetected(
            call_id=call_id,
            language=self.language,
            probability=self.probability,
            at=at,
            previous=self.previous,
        )


@dataclass
class LanguageDecider:
    min_samples: int  # LANGUAGE_DETECT_SECONDS of 16 kHz audio
    min_probability: float
    language: str | None = None
    _seen: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _windows: int = 0
    _vote: str | None = None  # the language the last window named with min_probability or more
    _against: list[tuple[str, float]] = field(default_factory=list)

    @property
    def decided(self) -> bool:
        return self.language is not None

    def heard(
        self, detected: tuple[str, float] | None, samples: int, final: bool
    ) -> Decision | None:
        """A window's detection (None: none ran) over `samples` of audio; the decision it
        brings, if it brings one."""
        if detected is None or samples < self.min_samples:
            return None
        language, probability = detected
        if self.language is None:
            self._windows += 1
            self._seen[language] += probability
            vote = language if probability >= self.min_probability else None
            if probability >= SURE_PROBABILITY or (vote is not None and vote == self._vote):
                return self._decide(language, probability)
            self._vote = vote
            if self._windows >= UNSURE_WINDOWS:
                best = max(self._seen, key=self._seen.__getitem__)
                return self._decide(best, round(self._seen[best] / self._windows, 3))
            return None
        if not final:
            return None
        if language == self.language or probability < SWITCH_PROBABILITY:
            self._against.clear()
            return None
        self._against = [*self._against[-1:], (language, probability)]
        if len(self._against) >= 2 and self._against[-2][0] == language:
            return self._decide(language, probability)
        return None

    def _decide(self, language: str, probability: float) -> Decision:
        previous, self.language = self.language, language
        self._against.clear()
        return Decision(language, probability, previous)
