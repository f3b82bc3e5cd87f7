"""Turns per-chunk speech probabilities into speech segments, as the audio streams in.

A segment opens on the first chunk above the threshold and closes after VAD_MIN_SILENCE_MS
below a lower threshold (hysteresis, as Silero's own get_speech_timestamps does), padded by
VAD_SPEECH_PAD_MS on both sides. Past SOFT_SEGMENT_SECONDS a segment also closes at a shorter
pause (SOFT_PAUSE_MS, the breath between two sentences of a monologue): each partial decodes its
whole open segment, and a partial of 20 s took four times what one of 8 s took (0.77 against
0.19 s, benchmarks/RESULTS.md), at every partial; the segment's final comes later too. A
segment that still grows past MAX_SEGMENT_SECONDS is cut at its quietest chunk in the last
third, so speech without any pause still gets finals, and the cut lands in a pause rather than
inside a word. Positions are absolute 16 kHz sample indices from the call's first frame. Pure
logic: no model, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamsrv.asr.vad import CHUNK

RATE = 16000
# Silero's runs below its lower threshold inside Asterisk's 73 s monologue demo-instruct: 49, of
# 32 to 384 ms. The 21 of 160 ms or more hold all 10 sentence ends that tiny.en's word times
# place (each in a run of 192 ms or more); the rest lie between words.
SOFT_PAUSE_MS = 160


@dataclass(frozen=True, slots=True)
class Segment:
    start: int
    end: int
    speech_samples: int
    forced: bool = False


class Segmenter:
    def __init__(
        self,
        threshold: float,
        min_silence_ms: int,
        speech_pad_ms: int,
        min_speech_ms: int,
        max_segment_seconds: float,
        soft_segment_seconds: float = 0.0,  # 0: no soft close
    ) -> None:
        self.threshold = threshold
        self.neg_threshold = max(threshold - 0.15, 0.01)
        self.min_silence = min_silence_ms * RATE // 1000
        self.pad = speech_pad_ms * RATE // 1000
        self.min_speech = min_speech_ms * RATE // 1000
        self.max_segment = int(max_segment_seconds * RATE)
        self.soft_segment = int(soft_segment_seconds * RATE) if soft_segment_seconds else None
        self.soft_pause = SOFT_PAUSE_MS * RATE // 1000
        self.position = 0  # absolute sample index of the next chunk
        self.open_start: int | None = None
        self._last_speech_end = 0
        self._speech_samples = 0
        self._floor = 0  # a new segment never starts before the end of the previous one
        self._probs: list[float] = []  # probabilities of the open segment's chunks

    @property
    def in_speech(self) -> bool:
        return self.open_start is not None

    def push(self, probs: list[float]) -> list[Segment]:
        """Feed the probabilities of the next chunks; returns the segments they closed."""
        closed: list[Segment] = []
        for p in probs:
            chunk_start = self.position
            self.position += CHUNK
            if self.open_start is None:
                if p >= self.threshold:
                    self.open_start = max(self._floor, chunk_start - self.pad)
                    self._last_speech_end = self.position
                    self._speech_samples = CHUNK
                    self._probs = [p]
                continue
            self._probs.append(p)
            if p >= self.neg_threshold:
                self._last_speech_end = self.position
                if p >= self.threshold:
                    self._speech_samples += CHUNK
            elif self._pause_closes():
                segment = self._close(min(self._last_speech_end + self.pad, self.position))
                if segment is not None:
                    closed.append(segment)
                continue
            if self.position - self.open_start >= self.max_segment:
                closed.extend(self._cut())
        return closed

    def _pause_closes(self) -> bool:
        """Whether the silence since the last speech closes the open segment: VAD_MIN_SILENCE_MS
        of it, or SOFT_PAUSE_MS once the segment is past SOFT_SEGMENT_SECONDS."""
        assert self.open_start is not None
        silence = self.position - self._last_speech_end
        if silence >= self.min_silence:
            return True
        soft = self.soft_segment
        return (
            soft is not None
            and silence >= self.soft_pause
            and (self._last_speech_end - self.open_start >= soft)
        )

    def flush(self) -> list[Segment]:
        """End of the call: close the open segment at the end of the audio."""
        if self.open_start is None:
            return []
        segment = self._close(min(self._last_speech_end + self.pad, self.position))
        return [segment] if segment is not None else []

    def _close(self, end: int) -> Segment | None:
        assert self.open_start is not None
        end = max(end, self.open_start)  # a segment cut inside a pause may hold no speech
        segment = Segment(self.open_start, end, self._speech_samples)
        self.open_start = None
        self._floor = max(self._floor, end)
        self._probs = []
        if segment.end <= segment.start or segment.speech_samples < self.min_speech:
            return None
        return segment

    def _cut(self) -> list[Segment]:
        """Close the overlong open segment at its quietest chunk of the last third."""
        assert self.open_start is not None
        n = len(self._probs)
        first = (2 * n) // 3
        tail = self._probs[first:]
        quietest = first + min(range(len(tail)), key=tail.__getitem__)
        chunk0 = self.position - n * CHUNK
        cut = chunk0 + (quietest + 1) * CHUNK
        rest = self._probs[quietest + 1 :]
        rest_speech = sum(CHUNK for p in rest if p >= self.threshold)
        segment = Segment(self.open_start, cut, self._speech_samples - rest_speech, forced=True)
        self.open_start = cut
        self._floor = cut
        self._probs = rest
        self._speech_samples = rest_speech
        return [segment]
