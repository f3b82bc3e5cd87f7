"""One call's live transcript, without I/O: audio and speech probabilities in, requests to the
model out, model results in, partial and final events out.

- While a segment is spoken: a partial for the whole open segment once enough new audio has
  arrived (PARTIAL_INTERVAL, stretched under load up to STREAMING_CHUNK_SIZE), one at a time.
- When VAD closes the segment (or it grows past MAX_SEGMENT_SECONDS): one final for exactly
  that audio, led by the previous segments as context where they fit. Finals are never shed
  and come out strictly in segment order, whatever order their results arrive in.

Segment numbers are given out when a segment first shows text, so silence and noise use no
number. A partial shows only for the oldest segment without a final (the open one, or the one
whose final is pending), so numbers always follow the audio's order. A final with no text ends
a segment that had a partial.

The caller (streamsrv.call.Call) submits each Ask to the model and hands the result back with
partial_done / final_done; tests do the same with results of their own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog

from streamsrv import events
from streamsrv.asr.segmenter import Segment, Segmenter
from streamsrv.asr.vad import VadState
from streamsrv.asr.whisper import AsrRequest, AsrResult
from streamsrv.audio import MODEL_RATE, FloatArray, StreamResampler
from streamsrv.config import Settings
from streamsrv.language import LanguageDecider
from streamsrv.ringbuffer import RingBuffer

log = structlog.get_logger(__name__)

PROMPT_CHARS = 200
MIN_PARTIAL_SECONDS = 0.3
# With the language still to be decided, a closed sentence's final waits (see LiveTranscript.
# on_vad) for the decision, at most until this much audio has come since the sentence began.
LANGUAGE_HOLD_SECONDS = 10.0


@dataclass(eq=False)
class Ask:
    """One request for the model: a final (never shed) or a partial (may be shed)."""

    request: AsrRequest
    start: int
    end: int
    segment: Segment | None = None  # a final's segment
    number: int | None = None  # a final's segment number, once it showed text
    shown: str = ""  # the last partial text shown for a final's segment
    result: AsrResult | None = None
    landed: bool = False  # a final's result (or failure) is in

    @property
    def final(self) -> bool:
        return self.request.final


def _segment_start(ask: Ask) -> int | None:
    return ask.segment.start if ask.segment is not None else None


def final_context(
    recent: Sequence[tuple[Segment, str]], segment: Segment, window: int, held_from: int
) -> tuple[int, str] | None:
    """Where a final's window may start and the text said from there: the run of most recent
    finals whose audio is still held (from sample `held_from`) and fits, with `segment`, in
    `window` samples, the length every final window is padded to anyway, so the context costs
    no encoder time. None when not even the latest one fits."""
    start: int | None = None
    texts: list[str] = []
    for before, text in reversed(recent):
        if before.start < max(segment.end - window, held_from):
            break
        start = before.start
        texts.insert(0, text)
    return None if start is None else (start, " ".join(texts))


@dataclass
class LiveTranscript:
    call_id: str
    settings: Settings
    rate: int  # the call's sample rate
    final_beams: tuple[int, int]  # a final led by context, and one that is not
    load: Callable[[], float] = lambda: 0.0  # 0 idle .. 1 saturated, stretches partials
    language: str | None = None  # fixed (context, LANGUAGE); None: decided from the speech
    finals_text: list[str] = field(default_factory=list)
    segments_published: int = 0
    vad: VadState = field(default_factory=VadState)

    def __post_init__(self) -> None:
        st = self.settings
        self.segmenter = Segmenter(
            st.vad_threshold,
            st.vad_min_silence_ms,
            st.vad_speech_pad_ms,
            st.vad_min_speech_ms,
            st.max_segment_seconds,
            st.soft_segment_seconds,
        )
        self.ring = RingBuffer(int((st.max_segment_seconds + 10) * MODEL_RATE))
        self.resampler = StreamResampler(self.rate)
        # the latest finals with text, oldest first; a final without text empties it
        self.recent_finals: deque[tuple[Segment, str]] = deque(maxlen=st.final_context_segments)
        self.vad_pending: list[FloatArray] = []
        self.finals: deque[Ask] = deque()  # asked, not yet published, in segment order
        # closed before the call's language was decided: (segment, its number, its partial
        # text), oldest first, asked for once it is (see on_vad)
        self.held: deque[tuple[Segment, int | None, str]] = deque()
        self.partial: Ask | None = None  # the partial being made
        self.last_partial_end = 0
        self.open_number: int | None = None
        self.open_text = ""
        self.decider: LanguageDecider | None = None
        if self.language is None:
            self.decider = LanguageDecider(
                int(st.language_detect_seconds * MODEL_RATE), st.language_detect_probability
            )

    def fix_language(self, language: str) -> None:
        """The call's context says which language it is in: no more detection."""
        self.language, self.decider = language, None

    # -- audio and VAD -------------------------------------------------------------------------

    def push(self, samples: FloatArray) -> None:
        """Audio at the call's rate, as floats."""
        resampled = self.resampler.push(samples)
        self.ring.append(resampled)
        self.vad_pending.append(resampled)

    def flush_audio(self) -> None:
        """The call ended: what the resampler still holds joins the audio."""
        tail = self.resampler.flush()
        self.ring.append(tail)
        self.vad_pending.append(tail)

    @property
    def vad_backlog_seconds(self) -> float:
        return sum(len(a) for a in self.vad_pending) / MODEL_RATE

    def take_vad_audio(self) -> tuple[VadState, FloatArray] | None:
        """The audio VAD has not seen yet, for a VAD pass in a worker thread."""
        if not self.vad_pending:
            return None
        audio = np.concatenate(self.vad_pending)
        self.vad_pending.clear()
        return self.vad, audio

    def on_vad(self, probs: Sequence[float], *, ending: bool = False) -> list[Ask]:
        """New speech probabilities: the finals of the segments they close, then a partial if
        one is due. `ending`: the call is over, close the open segment too, no partial."""
        self.held.extend(self._close(segment) for segment in self.segmenter.push(list(probs)))
        if ending:
            self.held.extend(self._close(segment) for segment in self.segmenter.flush())
        asks = self._release(ending)
        if not ending:
            partial = self._partial()
            if partial is not None:
                asks.append(partial)
        return asks

    # -- asks ----------------------------------------------------------------------------------

    def _close(self, segment: Segment) -> tuple[Segment, int | None, str]:
        """A segment the VAD closed, with what its partials showed; the next partial is of
        the next segment."""
        closed = (segment, self.open_number, self.open_text)
        self.open_number, self.open_text = None, ""
        self.last_partial_end = segment.end
        return closed

    @property
    def _undecided(self) -> bool:
        return self.decider is not None and self.language is None

    def _release(self, ending: bool) -> list[Ask]:
        """The finals of the closed segments, unless the call's language is still to be
        decided: a sentence shorter than LANGUAGE_DETECT_SECONDS would be decoded in whatever
        its own few seconds sound like (Spanish heard as Italian), so it waits for the decision
        that the speech after it brings (partials then hear it too, see _partial), for at most
        LANGUAGE_HOLD_SECONDS, or for the end of the call."""
        if not self.held:
            return []
        waited = (self.ring.end - self.held[0][0].start) / MODEL_RATE
        if self._undecided and not ending and waited < LANGUAGE_HOLD_SECONDS:
            return []
        asks = [self._final(*closed) for closed in self.held]
        self.held.clear()
        return asks

    def _final(self, segment: Segment, number: int | None, shown: str) -> Ask:
        context = self._final_context(segment)
        start, prefix = context or (segment.start, "")
        request = AsrRequest(
            self.call_id,
            self.ring.read(start, segment.end),
            final=True,
            language=self.language,
            prompt=self._prompt(),
            prefix=prefix,
            context=segment.start - start,
            beam_size=self.final_beams[0 if context else 1],
            detect=self.decider is not None and self.decider.decided,  # evidence of a change
        )
        ask = Ask(request, start, segment.end, segment, number, shown)
        self.finals.append(ask)
        return ask

    def _final_context(self, segment: Segment) -> tuple[int, str] | None:
        """The previous FINAL_CONTEXT_SEGMENTS segments that fit (see final_context), once
        their finals are in (none pending). Two by default: on the corpus calls two gave fewer
        errors than one or three (benchmarks/RESULTS.md)."""
        if not self.settings.final_context or self.finals:
            return None
        window = int(self.settings.min_window_seconds * MODEL_RATE)
        return final_context(self.recent_finals, segment, window, self.ring.start)

    def _partial(self) -> Ask | None:
        start = self.segmenter.open_start
        if start is None or self.partial is not None:
            return None
        end = self.ring.end
        if end - start < MIN_PARTIAL_SECONDS * MODEL_RATE:
            return None
        if end - max(self.last_partial_end, start) < self._partial_interval() * MODEL_RATE:
            return None
        self.last_partial_end = end
        if self.held:  # it hears the held sentences too, for the language; shows nothing
            start = self.held[0][0].start
        request = AsrRequest(
            self.call_id,
            self.ring.read(start, end),
            final=False,
            language=self.language,
            prompt=self._prompt(),
        )
        self.partial = Ask(request, start, end)
        return self.partial

    def _partial_interval(self) -> float:
        """PARTIAL_INTERVAL when idle, up to STREAMING_CHUNK_SIZE's seconds when saturated."""
        longest = self.settings.streaming_chunk_size / 16000  # bytes of 8 kHz 16-bit audio
        shortest = min(self.settings.partial_interval, longest)
        return shortest + (longest - shortest) * self.load()

    def _prompt(self) -> str:
        if not self.settings.condition_on_previous_text:
            return ""
        return " ".join(self.finals_text)[-PROMPT_CHARS:]

    # -- results -------------------------------------------------------------------------------

    def partial_shed(self, ask: Ask) -> None:
        """The model had no room for the partial: the next one is asked when due."""
        if self.partial is ask:
            self.partial = None

    def partial_done(self, ask: Ask, result: AsrResult | None) -> list[events.Event]:
        """A partial's result (None: it failed): the partial to show, if it shows anything
        new for the oldest segment without a final."""
        self.partial_shed(ask)
        if result is None:
            return []
        out = self._learn_language(ask, result)
        if not result.text:
            return out
        if self.segmenter.open_start == ask.start and not self.finals and not self.held:
            if result.text == self.open_text:
                return out
            if self.open_number is None:
                self.open_number = self._next_segment()
            number, self.open_text = self.open_number, result.text
        elif self.finals and _segment_start(self.finals[0]) == ask.start:
            # The segment closed while its partial ran: until its final comes, the partial
            # still shows its words. Only the oldest pending segment, so numbers stay in order.
            head = self.finals[0]
            if result.text == head.shown:
                return out
            if head.number is None:
                head.number = self._next_segment()
            number, head.shown = head.number, result.text
        else:
            return out
        return [
            *out,
            events.Partial(
                call_id=self.call_id,
                segment=number,
                text=result.text,
                start=round(ask.start / MODEL_RATE, 3),
                end=round(ask.end / MODEL_RATE, 3),
                audio_end=round(self.ring.end / MODEL_RATE, 3),
            ),
        ]

    def final_done(self, ask: Ask, result: AsrResult | None) -> list[events.Event]:
        """A final's result (None: it failed): the finals now due, strictly in segment
        order. Handing the same ask in twice changes nothing."""
        if not ask.landed:
            ask.landed, ask.result = True, result
        out: list[events.Event] = []
        while self.finals and self.finals[0].landed:
            out += self._publish(self.finals.popleft())
        return out

    @property
    def finals_pending(self) -> int:
        return len(self.finals) + len(self.held)

    @property
    def settled_seconds(self) -> float:
        """Audio up to which every final is out: no later final can start before it."""
        bounds = [self.segmenter.position]
        if self.held:
            bounds.append(self.held[0][0].start)
        if self.finals and self.finals[0].segment is not None:
            bounds.append(self.finals[0].segment.start)
        if self.segmenter.open_start is not None:
            bounds.append(self.segmenter.open_start)
        return min(bounds) / MODEL_RATE

    def _publish(self, ask: Ask) -> list[events.Event]:
        segment, result = ask.segment, ask.result
        assert segment is not None
        out = self._learn_language(ask, result) if result is not None else []
        text = result.text if result is not None else ""
        if text:
            self.recent_finals.append((segment, text))
        else:  # what was not speech leads no later final
            self.recent_finals.clear()
        number = ask.number
        if number is None:
            if not text:
                return out
            number = self._next_segment()
        if text:
            self.finals_text.append(text)
        seconds = segment.start / MODEL_RATE
        final = events.Final(
            call_id=self.call_id,
            segment=number,
            text=text,
            start=round(seconds, 3),
            end=round(segment.end / MODEL_RATE, 3),
            language=result.language if result is not None else self.language,
            words=None
            if result is None
            else [
                events.WordTime(
                    w.word, round(seconds + w.start, 3), round(seconds + w.end, 3), w.probability
                )
                for w in result.words
            ],
            avg_logprob=None if result is None else round(result.avg_logprob, 4),
            no_speech_prob=None if result is None else round(result.no_speech_prob, 4),
        )
        return [*out, final]

    def _learn_language(self, ask: Ask, result: AsrResult) -> list[events.Event]:
        """What a result tells of the call's language (streamsrv.language): a decision, if it
        brings one. A model that detects nothing (English-only) names its language at once."""
        if self.decider is None:
            return []
        if result.detected is None:
            if self.language is None and result.language:
                self.language = result.language
            return []
        samples = len(ask.request.audio) - ask.request.context
        decision = self.decider.heard(result.detected, samples, ask.final)
        if decision is None:
            return []
        self.language = decision.language
        return [decision.event(self.call_id, at=round(ask.end / MODEL_RATE, 3))]

    def _next_segment(self) -> int:
        number = self.segments_published
        self.segments_published += 1
        return number
