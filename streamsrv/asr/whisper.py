"""Whisper on CTranslate2, run as one batch over windows from many calls.

Each request is one call's window: the audio of one speech segment (never more than
MAX_SEGMENT_SECONDS), for a final optionally led by the call's previous segments as context.
Context audio comes with its final text as the decoder's prefix: the model hears the segment as
in a window of a whole recording, after what was just said, and writes on from the known text;
only the new tokens are kept, and their word times are shifted past the context. The window is
padded with silence to MIN_WINDOW_SECONDS at least (PARTIAL_WINDOW_SECONDS for partials),
rounded up to whole seconds, and every window of a batch to the longest: the encoder's cost
follows the window length, so short segments do not pay for 30 s. Partials decode greedily;
finals with FINAL_BEAM_SIZE and word timestamps.

Hallucination guards, as in Whisper's own transcribe(): a window whose no-speech probability is
high and whose text is unlikely is silence; a window whose text compresses too well is a loop.
Both give empty text. The VAD upstream already keeps silence and line noise away from the model.
A decoding also stops at a token budget that follows the window's new audio (see token_budget):
a loop is cut there instead of running on to the model's limit, and its text is empty too.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from streamsrv.audio import FloatArray
from streamsrv.config import Settings

SAMPLE_RATE = 16000
FRAMES_PER_SECOND = 100
MAX_PROMPT_TOKENS = 100
MIN_CONTEXT_WORDS = 4  # shorter new text from a window with context is checked alone
MIN_REPEAT_WORDS = 3  # a phrase this long said twice in a row: the decoder looped
MAX_LENGTH = 224  # the decoder's length limit, prompt included, as faster-whisper's
# More tokens than anyone speaks: English speech is 3 to 6 tokens a second (the corpus calls:
# 5.5 at most), Whisper's own budget is 224 tokens for 30 s (7.5 a second).
TOKENS_PER_SECOND = 15
MIN_TOKEN_BUDGET = 10


@dataclass(frozen=True, slots=True)
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass(slots=True)
class AsrRequest:
    call_id: str
    audio: FloatArray
    final: bool
    language: str | None  # None: detect
    prompt: str = ""
    prefix: str = ""  # the final text of `context`
    context: int = 0  # samples at the start of `audio` already transcribed as `prefix`
    beam_size: int = 1
    detect: bool = False  # detect the language even though `language` is given (evidence)

    @property
    def batch_key(self) -> tuple[bool, int, str | None]:
        """What every request of one batch must share: the decoding runs once for all."""
        return (self.final, self.beam_size, self.language)


@dataclass(slots=True)
class AsrResult:
    text: str
    language: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    words: list[Word] = field(default_factory=list)
    detected: tuple[str, float] | None = None  # (language, probability) when detection ran


def _context_failed(text: str, prefix: str) -> bool:
    """Whether a window led by `prefix` produced something other than new speech.

    With the previous segment in the window, tiny.en was seen to write nothing after the
    prefix, to write the prefix (or its end) again, and, on a tone or noise burst that VAD let
    through, to write punctuation or a few words where the segment alone gives nothing (its
    no-speech check cannot work there: the window starts with speech), and to write the new
    sentence twice ("Press 3 to hear the message envelope. Press 3 to hear the message
    envelope."). So the context is trusted only for new text of four words or more, most of
    them not in the prefix, that does not repeat itself."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < MIN_CONTEXT_WORDS:
        return True
    said = set(re.findall(r"\w+", prefix.lower()))
    return 2 * sum(word in said for word in words) >= len(words) or _repeats_itself(words)


def _repeats_itself(words: list[str]) -> bool:
    """Whether some phrase of MIN_REPEAT_WORDS words or more comes twice in a row."""
    n = len(words)
    return any(
        words[i : i + k] == words[i + k : i + 2 * k]
        for k in range(MIN_REPEAT_WORDS, n // 2 + 1)
        for i in range(n - 2 * k + 1)
    )


def token_budget(req: AsrRequest) -> int:
    """The most tokens a window's new audio (after its context) can hold. tiny.en was seen to
    loop on partials of 0.6 to 4.3 s of audio padded to 8 s: 18 of 472 partials of six calls
    wrote 112 tokens, the limit, where 95 % wrote 25 at most. Each such decoding took about
    0.8 s of a core and held up every other window of its batch (benchmarks/RESULTS.md)."""
    seconds = (len(req.audio) - req.context) / SAMPLE_RATE
    return MIN_TOKEN_BUDGET + math.ceil(TOKENS_PER_SECOND * seconds)


def max_length(prompts: list[list[int]], budget: int) -> int:
    """CTranslate2's max_length that lets every prompt go on for `budget` new tokens.
    Measured on CTranslate2 4.x: a Whisper decoding writes at most
    min(max_length - len(prompt) + 1, max_length // 2) tokens."""
    longest = max(len(prompt) for prompt in prompts)
    return min(MAX_LENGTH, max(2 * budget, longest + budget))


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


class WhisperRunner:
    """Owns the model; run_batch is called from the executor's worker threads."""

    def __init__(self, model_path: str, device: str, compute_type: str, settings: Settings):
        from faster_whisper import WhisperModel

        self.settings = settings
        self.model = WhisperModel(
            model_path,
            device=device,
            compute_type=compute_type,
            cpu_threads=settings.threads_per_worker(settings.live_workers(device)),
            num_workers=settings.live_workers(device),
        )
        self.multilingual: bool = self.model.model.is_multilingual
        self._tokenizers: dict[str, Any] = {}

    def tokenizer(self, language: str) -> Any:
        from faster_whisper.tokenizer import Tokenizer

        if language not in self._tokenizers:
            self._tokenizers[language] = Tokenizer(
                self.model.hf_tokenizer,
                self.multilingual,
                task="transcribe",
                language=language if self.multilingual else "en",
            )
        return self._tokenizers[language]

    def _features(self, batch: list[AsrRequest]) -> tuple[np.ndarray, list[int]]:
        """Log-mel features of each window, padded with silence in the audio domain as Whisper
        was trained (the padding shares the window's normalisation), to one length."""
        extractor = self.model.feature_extractor
        longest = max(len(req.audio) for req in batch)
        shortest = self.settings.min_window_seconds
        if not batch[0].final:
            shortest = self.settings.partial_window_seconds
        seconds = max(shortest, math.ceil(longest / SAMPLE_RATE))
        samples = int(min(30, seconds) * SAMPLE_RATE)
        frames = samples // extractor.hop_length
        out = np.empty((len(batch), extractor.mel_filters.shape[0], frames), dtype=np.float32)
        for i, req in enumerate(batch):
            audio = req.audio[:samples]
            padded = np.concatenate([audio, np.zeros(samples - len(audio), dtype=np.float32)])
            out[i] = extractor(padded)[:, :frames]
        lengths = [min(len(req.audio), samples) // extractor.hop_length for req in batch]
        return out, lengths

    def _languages(
        self, batch: list[AsrRequest], encoded: Any
    ) -> tuple[list[str], list[tuple[str, float] | None]]:
        """The language each window is decoded in (its own, else the detected one), and the
        detection (language, probability) of the windows that asked for it or had none."""
        detections: list[tuple[str, float] | None] = [None] * len(batch)
        if not self.multilingual:
            return ["en"] * len(batch), detections
        if any(req.language is None or req.detect for req in batch):
            for i, ranked in enumerate(self.model.model.detect_language(encoded)):
                if batch[i].language is None or batch[i].detect:
                    token, probability = ranked[0]
                    detections[i] = (token[2:-2], round(float(probability), 3))
        languages = [
            req.language or (found[0] if found else "en")
            for req, found in zip(batch, detections, strict=True)
        ]
        return languages, detections

    def _prompts(
        self, tokenizers: list[Any], batch: list[AsrRequest], prefixes: list[list[int]]
    ) -> list[list[int]]:
        """Start sequences: each call's recent text as the previous-text prompt, then the
        start of transcript, then the context's text as the prefix to write on from.

        CTranslate2 needs the start-of-transcript token at one position for the whole batch,
        so every prompt keeps the same number of its most recent tokens (none if any call has
        no text yet); prefixes may differ in length."""
        texts = [
            tok.encode(" " + req.prompt.strip()) if req.prompt.strip() else []
            for tok, req in zip(tokenizers, batch, strict=True)
        ]
        keep = min(MAX_PROMPT_TOKENS, *(len(t) for t in texts))
        return [
            [
                *([tok.sot_prev, *text[len(text) - keep :]] if keep else []),
                *tok.sot_sequence,
                tok.no_timestamps,
                *prefix,
            ]
            for tok, text, prefix in zip(tokenizers, texts, prefixes, strict=True)
        ]

    def run_batch(self, batch: list[AsrRequest]) -> list[AsrResult]:
        import ctranslate2
        from faster_whisper.transcribe import get_suppressed_tokens

        features, frames = self._features(batch)
        encoded = self.model.model.encode(
            ctranslate2.StorageView.from_array(features), to_cpu=False
        )
        languages, detections = self._languages(batch, encoded)
        tokenizers = [self.tokenizer(lang) for lang in languages]
        prefixes = [
            tok.encode(" " + req.prefix.strip()) if req.context and req.prefix.strip() else []
            for tok, req in zip(tokenizers, batch, strict=True)
        ]
        final, beam_size, _ = key = batch[0].batch_key
        if any(req.batch_key != key for req in batch):
            raise ValueError(f"a batch mixes {sorted({req.batch_key for req in batch})}")
        prompts = self._prompts(tokenizers, batch, prefixes)
        budgets = [token_budget(req) for req in batch]
        results = self.model.model.generate(
            encoded,
            prompts,
            beam_size=beam_size,
            max_length=max_length(prompts, max(budgets)),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            # the same for every language: the vocabulary's non-speech tokens
            suppress_tokens=get_suppressed_tokens(tokenizers[0], (-1,)),
        )
        out: list[AsrResult] = []
        token_lists: list[list[int]] = []
        for tok, lang, result, prefix, found, budget in zip(
            tokenizers, languages, results, prefixes, detections, budgets, strict=True
        ):
            # CTranslate2 returns the prefix with what it wrote after it
            tokens = [t for t in result.sequences_ids[0][len(prefix) :] if t < tok.eot]
            kept, guarded = self._result(tok, lang, result, tokens, budget)
            kept.detected = found
            out.append(kept)
            token_lists.append([] if guarded else tokens)
        if final:
            # each item aligned with its own tokenizer: a batch of detected languages may mix
            for language in dict.fromkeys(languages):
                mine = [
                    t if lang == language else []
                    for t, lang in zip(token_lists, languages, strict=True)
                ]
                tokenizer = self.tokenizer(language)
                self._add_words(tokenizer, batch, prefixes, mine, encoded, frames, out)
        return self._without_context_where_failed(batch, prefixes, out)

    def _result(
        self, tok: Any, language: str, result: Any, tokens: list[int], budget: int
    ) -> tuple[AsrResult, bool]:
        """One window's text and scores, and whether the hallucination guards emptied it: a
        decoding that used up its token budget ran away, whatever its text looks like cut."""
        text = tok.decode(tokens).strip()
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        ratio = compression_ratio(text)
        # Whisper's rule, plus: a window the model is all but sure is silence stays empty
        # even when its guess is fluent (the classic "you" or "Thank you." on silence).
        silent = result.no_speech_prob > self.settings.no_speech_threshold and (
            avg_logprob < self.settings.log_prob_threshold or result.no_speech_prob > 0.95
        )
        runaway = len(tokens) >= budget
        guarded = silent or runaway or ratio > self.settings.compression_ratio_threshold
        kept = AsrResult(
            "" if guarded else text, language, avg_logprob, result.no_speech_prob, ratio
        )
        return kept, guarded

    def _without_context_where_failed(
        self, batch: list[AsrRequest], prefixes: list[list[int]], out: list[AsrResult]
    ) -> list[AsrResult]:
        """A segment whose context misled the model (see _context_failed) is run again alone,
        as it would be without FINAL_CONTEXT."""
        again = [
            i
            for i, (req, prefix, result) in enumerate(zip(batch, prefixes, out, strict=True))
            if prefix and _context_failed(result.text, req.prefix)
        ]
        if again:
            alone = [
                replace(batch[i], audio=batch[i].audio[batch[i].context :], prefix="", context=0)
                for i in again
            ]
            for i, result in zip(again, self.run_batch(alone), strict=True):
                out[i] = result
        return out

    def _add_words(
        self,
        tokenizer: Any,
        batch: list[AsrRequest],
        prefixes: list[list[int]],
        token_lists: list[list[int]],
        encoded: Any,
        frames: list[int],
        out: list[AsrResult],
    ) -> None:
        """Word times from cross-attention alignment, relative to the segment's start: the
        prefix is aligned too (it shapes where the new words fall) and then left out. Items
        whose token list is empty keep the words they have."""
        if not any(token_lists):
            return
        texts = [
            [*prefix, *tokens] if tokens else []
            for prefix, tokens in zip(prefixes, token_lists, strict=True)
        ]
        aligned_lists = self.model.find_alignment(tokenizer, texts, encoded, frames)
        for req, prefix, result, aligned, text_tokens in zip(
            batch, prefixes, out, aligned_lists, texts, strict=True
        ):
            if not text_tokens:
                continue
            shift = req.context / SAMPLE_RATE if prefix else 0.0
            words: list[Word] = []
            consumed = 0
            for w in aligned:
                in_prefix = consumed < len(prefix)
                consumed += len(w["tokens"])
                text = w["word"].strip()
                if in_prefix:
                    continue
                if words and (not text or all(not ch.isalnum() for ch in text)):
                    last = words[-1]  # punctuation belongs to the word before it
                    words[-1] = Word(last.word + text, last.start, last.end, last.probability)
                elif text:
                    words.append(
                        Word(
                            text,
                            round(max(0.0, float(w["start"]) - shift), 2),
                            round(max(0.0, float(w["end"]) - shift), 2),
                            round(float(w["probability"]), 3),
                        )
                    )
            result.words = words
