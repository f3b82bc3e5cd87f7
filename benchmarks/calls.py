"""Calls to play: built from the corpus, sent as Asterisk does, and their Redis messages collected.

The player mirrors streamsrv.simulate.play_call (20 ms frames, paced in real time from the first
frame) but also records when each frame left, so a word's "spoken" time is when its audio was
really sent, and a benchmark client that falls behind shows up as pacing lateness instead of
silently inflating the server's lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import uuid
import wave
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lag import Arrival, RefUtterance
from streamsrv import audiosocket as aso
from streamsrv import corpus
from streamsrv.simulate import CallWatcher

RATE = corpus.RATE
FRAME_S = 0.02
# Asterisk's longest prompt: 73 s of one voice with no pause of VAD_MIN_SILENCE_MS, as a caller
# who talks on, or an agent reading out terms
MONOLOGUE = "demo-instruct"
FRAME_BYTES = int(RATE * FRAME_S) * 2


@dataclass(frozen=True)
class BenchCall:
    seed: int
    prompts: list[str]
    pcm: bytes  # 16-bit little-endian mono at 8 kHz
    utterances: list[RefUtterance]  # speech spans (prompt silence trimmed) and texts
    language: str = "en"  # what the prompts are spoken in

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / RATE

    @property
    def reference(self) -> str:
        return " ".join(u.text for u in self.utterances)


def speech_span(pcm: bytes, start: float, end: float) -> tuple[float, float]:
    """Where speech starts and ends inside [start, end] s of `pcm`: the first and last 10 ms
    with RMS above 3% of the loudest 10 ms. The prompts carry ~0.1 s of silence before and
    ~0.2 s after the speech; counting it would make words look spoken later than they were."""
    samples = np.frombuffer(pcm, dtype="<i2")[int(start * RATE) : int(end * RATE)]
    step = RATE // 100
    blocks = samples[: len(samples) // step * step].astype(np.float64).reshape(-1, step)
    if not len(blocks):
        return start, end
    rms = np.sqrt((blocks**2).mean(axis=1))
    loud = np.nonzero(rms > max(30.0, 0.03 * rms.max()))[0]
    if not len(loud):
        return start, end
    return start + loud[0] / 100, start + (loud[-1] + 1) / 100


def build_bench_call(
    seed: int,
    seconds: float,
    pause: float = 1.0,
    prompts: int | None = None,
    language: str = "en",
    also_in: tuple[str, ...] = (),
    lead: str | None = None,
) -> BenchCall:
    """Corpus prompts in a seed-dependent order with `pause` s between them: until about
    `seconds` of audio, or exactly `prompts` of them (a short call of a burst). Spoken in
    `language`, chosen among the prompts recorded in it and in `also_in` too: the same seed is
    then the same sentences in each of these languages. `lead`: a prompt said first (such as
    MONOLOGUE), then the others."""
    shared = tuple(sorted({language, *also_in} - {"en"}))
    names = corpus.pick_prompts(len(corpus.spoken_prompts(also_in=shared)), seed, also_in=shared)
    if lead:
        names = [lead, *(name for name in names if name != lead)]
    chosen: list[str] = []
    total = pause
    for name in names:
        if chosen and (len(chosen) == prompts if prompts else total >= seconds):
            break
        chosen.append(name)
        total += len(corpus.read_prompt(name, language)) / 2 / RATE + pause
    call = corpus.build_call(chosen, pause=pause, seed=seed, language=language)
    utterances = [
        RefUtterance(u.text, *speech_span(call.pcm, u.start, u.end)) for u in call.utterances
    ]
    return BenchCall(seed, chosen, call.pcm, utterances, language)


def synthetic_pcm(seconds: float, seed: int) -> bytes:
    """Speech-like energy without the corpus: tones under a syllable-rate envelope, plus noise.
    Enough for ingest, where nothing listens to the words."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) * (np.sin(2 * np.pi * 0.2 * t) > 0)
    signal = 6000 * envelope * np.sin(2 * np.pi * 300 * t) + rng.normal(0, 200, len(t))
    return np.clip(signal, -32768, 32767).astype("<i2").tobytes()


def encode_frames(pcm: bytes) -> list[bytes]:
    """AudioSocket 0x10 messages of 20 ms each, encoded once (ingest shares them among calls)."""
    return [
        aso.encode(aso.Audio(aso.Kind.AUDIO_8K, pcm[i : i + FRAME_BYTES]))
        for i in range(0, len(pcm), FRAME_BYTES)
    ]


@dataclass
class Played:
    call_id: str
    frames_sent: int = 0
    bytes_sent: int = 0
    frame_walls: list[float] = field(default_factory=list)  # time.time() after each frame
    lateness: list[float] = field(default_factory=list)  # s behind schedule, per frame

    def clock(self, seconds: float) -> float:
        """Wall time at which the audio up to `seconds` had been sent."""
        if not self.frame_walls:
            return math.nan
        index = math.ceil(seconds / FRAME_S - 1e-9) - 1
        return self.frame_walls[max(0, min(len(self.frame_walls) - 1, index))]


async def play(
    host: str, port: int, frames: list[bytes], call_id: str | None = None, delay: float = 0.0
) -> Played:
    """Wait `delay` s, connect, send the call id, then the frames in real time; hang up."""
    await asyncio.sleep(delay)
    played = Played(call_id or str(uuid.uuid4()))
    _reader, writer = await asyncio.open_connection(host, port)
    writer.write(aso.encode(aso.CallId(played.call_id)))
    t0 = time.monotonic()
    for i, frame in enumerate(frames):
        writer.write(frame)
        now = time.monotonic()
        played.frame_walls.append(time.time())
        played.lateness.append(now - (t0 + i * FRAME_S))
        played.frames_sent += 1
        played.bytes_sent += len(frame) - 3
        wait = t0 + (i + 1) * FRAME_S - time.monotonic()
        if wait > 0:
            await writer.drain()
            await asyncio.sleep(wait)
    await writer.drain()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return played


STAGGER_SECONDS = 2.0  # calls start at random within this many seconds unless told otherwise
BURST_STAGGER_SECONDS = 0.2  # a burst: every call connects within this
BURST_PROMPTS = 4  # a burst's calls are this many prompts each


def stagger(count: int, seed: int, within: float = STAGGER_SECONDS) -> list[float]:
    """Start delays of `count` calls, uniformly random within the first `within` seconds."""
    rng = random.Random(seed)
    return [rng.uniform(0.0, within) for _ in range(count)]


class Collector:
    """Every message under a channel prefix, per call, with its arrival time (time.time())."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.watcher = CallWatcher(redis_url, f"{prefix}call*")
        self.prefix = prefix
        self.by_call: dict[str, list[Arrival]] = defaultdict(list)
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        await self.watcher.__aenter__()
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.watcher.__aexit__()

    async def _collect(self) -> None:
        async for channel, message in self.watcher.channel_messages(idle=1e9):
            if channel != f"{self.prefix}calls":  # lifecycle copies also come per call
                self.by_call[message["call_id"]].append((time.time(), message))
                self._arrived.set()

    def ended(self, call_id: str) -> bool:
        return any(m["type"] == "call_ended" for _, m in self.by_call.get(call_id, []))

    async def wait_ended(self, call_ids: list[str], within: float) -> bool:
        """True when every call's call_ended arrived within `within` seconds."""
        deadline = time.monotonic() + within
        while not all(self.ended(c) for c in call_ids):
            self._arrived.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return True


def recorded_seconds(recordings_dir: Path, call_ids: set[str] | None = None) -> float:
    """Seconds of audio in the WAV recordings (of `call_ids`, or all) under `recordings_dir`."""
    total = 0.0
    for path in recordings_dir.rglob("*.wav"):
        if call_ids is None or path.stem in call_ids:
            with wave.open(str(path), "rb") as w:
                total += w.getnframes() / w.getframerate()
    return total


def lateness_summary(lateness: list[float]) -> dict[str, Any]:
    """Client pacing: how far behind schedule frames left (ms); large values void a run."""
    if not lateness:
        return {"p99_ms": math.nan, "max_ms": math.nan}
    values = np.asarray(lateness) * 1000
    return {"p99_ms": float(np.percentile(values, 99)), "max_ms": float(values.max())}
